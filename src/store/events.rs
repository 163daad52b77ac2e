//! Reading the change events the database records with every link change
//! (see the migration `assignment_events`: numbered per organization in
//! commit order).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Store;
use crate::domain::OrganizationId;
use crate::error::ServiceError;

/// A change of a link, as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct EventRecord {
    pub organization_id: String,
    pub sequence: i64,
    pub identity_id: Uuid,
    pub agent_handle: String,
    pub kind: String,
    pub action: String,
    pub channel_id: Option<Uuid>,
    pub previous_channel_id: Option<Uuid>,
    pub cause: String,
    pub actor: String,
    pub occurred_at: DateTime<Utc>,
}

/// `$2` the sequence to resume after, `$3` how many. The first row says
/// whether retention removed an event above `$2` (then the reader missed
/// some, and is told so rather than given a silent gap): read in the same
/// snapshot as the events, and retention moves the mark and deletes in one
/// transaction. `after = 0` means from the oldest kept event.
const LIST_EVENTS: &str = "
    WITH mark AS (
        SELECT coalesce(
            (SELECT removed_through FROM event_sequences WHERE organization_id = $1), 0
        ) AS removed_through
    )
    SELECT (SELECT removed_through FROM mark) > $2 AND $2 > 0 AS expired,
           e.organization_id, e.sequence, e.identity_id, e.agent_handle, e.kind, e.action,
           e.channel_id, e.previous_channel_id, e.cause, e.actor, e.occurred_at
    FROM (VALUES (1)) AS one (x)
    LEFT JOIN LATERAL (
        SELECT * FROM assignment_events
        WHERE organization_id = $1 AND sequence > $2
        ORDER BY sequence
        LIMIT $3
    ) AS e ON true
    ORDER BY e.sequence";

#[derive(sqlx::FromRow)]
struct EventRow {
    expired: bool,
    organization_id: Option<String>,
    sequence: Option<i64>,
    identity_id: Option<Uuid>,
    agent_handle: Option<String>,
    kind: Option<String>,
    action: Option<String>,
    channel_id: Option<Uuid>,
    previous_channel_id: Option<Uuid>,
    cause: Option<String>,
    actor: Option<String>,
    occurred_at: Option<DateTime<Utc>>,
}

impl EventRow {
    fn into_record(self) -> Option<EventRecord> {
        Some(EventRecord {
            organization_id: self.organization_id?,
            sequence: self.sequence?,
            identity_id: self.identity_id?,
            agent_handle: self.agent_handle?,
            kind: self.kind?,
            action: self.action?,
            channel_id: self.channel_id,
            previous_channel_id: self.previous_channel_id,
            cause: self.cause?,
            actor: self.actor?,
            occurred_at: self.occurred_at?,
        })
    }
}

impl Store {
    /// Up to `size` events of the organization after `after`, oldest first;
    /// `EventsExpired` when retention removed one the reader has not seen.
    #[tracing::instrument(name = "store.list_events", skip_all)]
    pub async fn list_events(
        &self,
        organization: &OrganizationId,
        after: i64,
        size: usize,
    ) -> Result<Vec<EventRecord>, ServiceError> {
        let limit = i64::try_from(size).unwrap_or(i64::MAX);
        let rows = self
            .fetch_rows(None, || {
                sqlx::query_as::<_, EventRow>(LIST_EVENTS)
                    .bind(organization.as_str())
                    .bind(after)
                    .bind(limit)
            })
            .await
            .map_err(|error| error.into_service_error(|_| None))?;
        if rows.first().is_some_and(|row| row.expired) {
            return Err(ServiceError::EventsExpired);
        }
        Ok(rows.into_iter().filter_map(EventRow::into_record).collect())
    }
}
