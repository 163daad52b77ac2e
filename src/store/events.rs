//! Reading the change events the database records with every link change
//! (see the migrations `assignment_events` and `20261207000004`: numbered
//! per organization in commit order).

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

/// Every organization with kept events, one probe of the primary key each
/// (a loose index scan): the relay and retention start from it. Listing
/// them nowhere else keeps the writes free of a row per organization to
/// update (migration 20261207000004).
macro_rules! organizations_with_events {
    () => {
        "organizations (organization_id) AS (
            (SELECT organization_id FROM assignment_events ORDER BY organization_id LIMIT 1)
            UNION ALL
            SELECT (SELECT e.organization_id FROM assignment_events AS e
                    WHERE e.organization_id > o.organization_id
                    ORDER BY e.organization_id
                    LIMIT 1)
            FROM organizations AS o
            WHERE o.organization_id IS NOT NULL
        )"
    };
}

/// Removes events older than `$1` seconds, as whole prefixes of each
/// organization's sequence (an event is kept while an older-numbered one
/// is; so no hole can open), at most `$2` per organization per call, and
/// moves the organization's "removed through" mark in the same statement.
/// An organization has a prefix to remove exactly when its lowest-numbered
/// kept event is old, so it is found by a probe of the primary key per
/// organization with kept events, without an index on `occurred_at` (why
/// none: migration 20261207000001).
const PRUNE_EVENTS: &str = concat!(
    "WITH RECURSIVE ",
    organizations_with_events!(),
    ",
    cutoff AS (
        SELECT now() - make_interval(secs => $1) AS at
    ),
    stale AS (
        SELECT o.organization_id FROM organizations AS o
        WHERE o.organization_id IS NOT NULL
          AND (SELECT e.occurred_at FROM assignment_events AS e
               WHERE e.organization_id = o.organization_id
               ORDER BY e.sequence
               LIMIT 1) < (SELECT at FROM cutoff)
    ),
    bounds AS (
        SELECT s.organization_id,
               least(
                   -- The last event before the first one to keep: the
                   -- numbers are not contiguous, so the mark is an event's.
                   coalesce(
                       (SELECT e.sequence FROM assignment_events AS e
                        WHERE e.organization_id = s.organization_id
                          AND e.sequence < (
                              SELECT min(f.sequence) FROM assignment_events AS f
                              WHERE f.organization_id = s.organization_id
                                AND f.occurred_at >= (SELECT at FROM cutoff))
                        ORDER BY e.sequence DESC
                        LIMIT 1),
                       (SELECT max(e.sequence) FROM assignment_events AS e
                        WHERE e.organization_id = s.organization_id)),
                   -- At most $2 events: the $2nd lowest.
                   (SELECT e.sequence FROM assignment_events AS e
                    WHERE e.organization_id = s.organization_id
                    ORDER BY e.sequence
                    OFFSET $2 - 1
                    LIMIT 1)
               ) AS through
        FROM stale AS s
    ),
    removed AS (
        DELETE FROM assignment_events AS e USING bounds AS b
        WHERE e.organization_id = b.organization_id AND e.sequence <= b.through
        RETURNING 1
    ),
    marked AS (
        INSERT INTO event_sequences AS counter (organization_id, removed_through)
        SELECT organization_id, through FROM bounds
        ON CONFLICT (organization_id) DO UPDATE
            SET removed_through = greatest(counter.removed_through, EXCLUDED.removed_through)
        RETURNING 1
    )
    SELECT count(*) FROM removed"
);

/// Organizations with events the relay has not published: where it stands,
/// where retention stands, and how many kept events it has still to publish.
const RELAY_BACKLOG: &str = concat!(
    "WITH RECURSIVE ",
    organizations_with_events!(),
    ",
    positions AS (
        SELECT o.organization_id,
               coalesce(relay.relayed_through, 0) AS relayed_through,
               coalesce(counter.removed_through, 0) AS removed_through
        FROM organizations AS o
        LEFT JOIN event_relay_positions AS relay USING (organization_id)
        LEFT JOIN event_sequences AS counter USING (organization_id)
        WHERE o.organization_id IS NOT NULL
    ),
    backlog AS (
        SELECT p.*,
               (SELECT count(*) FROM assignment_events AS e
                WHERE e.organization_id = p.organization_id
                  AND e.sequence > p.relayed_through) AS unrelayed
        FROM positions AS p
    )
    SELECT * FROM backlog WHERE unrelayed > 0 ORDER BY organization_id"
);

const SAVE_RELAY_POSITION: &str = "
    INSERT INTO event_relay_positions AS relay (organization_id, relayed_through)
    VALUES ($1, $2)
    ON CONFLICT (organization_id) DO UPDATE
        SET relayed_through = greatest(relay.relayed_through, EXCLUDED.relayed_through)";

/// An organization the relay is behind on.
#[derive(Debug, sqlx::FromRow)]
pub struct RelayBacklog {
    pub organization_id: String,
    pub relayed_through: i64,
    pub removed_through: i64,
    pub unrelayed: i64,
}

/// Events removed per organization by one statement: keeps each one short.
const PRUNE_BATCH: i64 = 10_000;

impl Store {
    /// Every organization with events not yet relayed.
    pub async fn relay_backlog(&self) -> Result<Vec<RelayBacklog>, ServiceError> {
        self.fetch_rows(None, || sqlx::query_as::<_, RelayBacklog>(RELAY_BACKLOG))
            .await
            .map_err(|error| error.into_service_error(|_| None))
    }

    /// Records that the organization's events up to `sequence` are published.
    pub async fn save_relay_position(
        &self,
        organization: &str,
        sequence: i64,
    ) -> Result<(), ServiceError> {
        self.fetch_rows(None, || {
            sqlx::query_as::<_, ()>(SAVE_RELAY_POSITION)
                .bind(organization)
                .bind(sequence)
        })
        .await
        .map(drop)
        .map_err(|error| error.into_service_error(|_| None))
    }

    /// How many change events were ever recorded, kept or pruned, without
    /// reading the events: each took a number from `assignment_event_numbers`
    /// (a change rolled back after its event was numbered, rare, counts
    /// too), and the counters of the scheme before it (migration
    /// 20261207000004) hold the count of the events numbered before.
    pub async fn events_written(&self) -> Result<u64, ServiceError> {
        let rows = self
            .fetch_rows(None, || {
                sqlx::query_as::<_, (i64,)>(
                    "SELECT ((SELECT coalesce(sum(last_sequence), 0) FROM event_sequences)
                           + coalesce((SELECT last_value - start_value + 1 FROM pg_sequences
                                       WHERE schemaname = current_schema()
                                         AND sequencename = 'assignment_event_numbers'), 0)
                           )::bigint",
                )
            })
            .await
            .map_err(|error| error.into_service_error(|_| None))?;
        Ok(rows
            .first()
            .map_or(0, |(total,)| u64::try_from(*total).unwrap_or(0)))
    }

    /// Removes events older than `retention`, a batch at a time, and returns
    /// how many were removed.
    #[tracing::instrument(name = "store.prune_events", skip_all)]
    pub async fn prune_events(&self, retention: std::time::Duration) -> Result<u64, ServiceError> {
        let mut removed_in_all = 0;
        loop {
            let removed = self
                .fetch_rows(None, || {
                    sqlx::query_as::<_, (i64,)>(PRUNE_EVENTS)
                        .bind(retention.as_secs_f64())
                        .bind(PRUNE_BATCH)
                })
                .await
                .map_err(|error| error.into_service_error(|_| None))?
                .into_iter()
                .next()
                .map_or(0, |(removed,)| removed);
            removed_in_all += u64::try_from(removed).unwrap_or(0);
            if removed < PRUNE_BATCH {
                return Ok(removed_in_all);
            }
        }
    }

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
