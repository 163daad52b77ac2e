//! Linking and unlinking a channel: one statement each.

use uuid::Uuid;

use super::{IdentityDetailRow, IdentityRecord, MAX_ATTEMPTS, Store, worth_another_attempt};
use crate::domain::{AgentHandle, ChannelId, ChannelKind, OrganizationId};
use crate::error::ServiceError;
use crate::operations::deadline::WriteWindow;

/// Links a channel to an identity of the same organization in one statement.
///
/// The `UPDATE` re-checks its conditions on the row's newest version (READ
/// COMMITTED), and the unique constraint on the link column decides between
/// concurrent claims of one channel, so the outcome is right under any
/// interleaving; the snapshot flags only explain a refusal. The channel row
/// is locked `FOR SHARE` (its status re-read if it changed meanwhile), so a
/// concurrent deletion or release either comes first (and this finds the
/// channel gone) or waits for this to commit (and its unlinking trigger then
/// sees the new link).
///
/// `$5` is the caller's subject, the actor of the change event the link's
/// trigger records (set for the statement before its update runs).
///
/// The request's remaining time travels with the statement (`$4`, seconds):
/// sqlx cannot cancel a statement whose future is dropped, so a statement
/// that waited on a lock past the deadline must fail rather than write when it
/// resumes (`ensure_in_time`, see the migration).
macro_rules! assign_statement {
    ($channel_table:literal, $link_column:literal) => {
        concat!(
            "WITH caller AS (
                SELECT set_config('channels.actor', $5, true) AS actor
            ),
            target AS (
                SELECT * FROM identities
                WHERE organization_id = $1 AND agent_handle = $2
                  AND status IN ('active', 'paused')
            ),
            channel AS (
                SELECT id FROM ", $channel_table, "
                WHERE organization_id = $1 AND id = $3 AND status IN ('active', 'paused')
                FOR SHARE
            ),
            holder AS (
                SELECT id FROM identities WHERE organization_id = $1 AND ", $link_column, " = $3
            ),
            linked AS (
                UPDATE identities AS i SET ", $link_column, " = $3
                FROM target, channel
                WHERE i.organization_id = target.organization_id AND i.id = target.id
                  AND i.status IN ('active', 'paused')
                  AND i.", $link_column, " IS DISTINCT FROM $3
                  AND NOT EXISTS (SELECT 1 FROM holder WHERE holder.id <> i.id)
                  AND (SELECT actor FROM caller) IS NOT NULL
                RETURNING i.*, ensure_in_time($4)
            ),
            result AS (",
            identity_columns!(), " FROM linked
                UNION ALL
                ", identity_columns!(), " FROM target WHERE NOT EXISTS (SELECT 1 FROM linked)
            )
            SELECT
                EXISTS (SELECT 1 FROM channel) AS channel_found,
                EXISTS (SELECT 1 FROM holder JOIN target ON holder.id <> target.id) AS held_by_other,
                r.", $link_column, " AS linked_channel_id,",
            identity_detail_columns!(),
            "FROM (VALUES (1)) AS one (x)
            LEFT JOIN result AS r ON true",
            identity_detail_joins!()
        )
    };
}

/// Unlinks an identity's channel; a no-op (and no write) when none is linked.
/// `$3` is the request's remaining time, guarded as for assign; `$4` the
/// actor of the change event.
macro_rules! unassign_statement {
    ($link_column:literal) => {
        concat!(
            "WITH caller AS (
                SELECT set_config('channels.actor', $4, true) AS actor
            ),
            target AS (
                SELECT organization_id, id FROM identities
                WHERE organization_id = $1 AND agent_handle = $2
                  AND status IN ('active', 'paused')
            ),
            unlinked AS (
                UPDATE identities AS i SET ",
            $link_column,
            " = NULL
                FROM target
                WHERE i.organization_id = target.organization_id AND i.id = target.id
                  AND i.status IN ('active', 'paused')
                  AND i.",
            $link_column,
            " IS NOT NULL
                  AND (SELECT actor FROM caller) IS NOT NULL
                RETURNING i.id, ensure_in_time($3)
            )
            SELECT EXISTS (SELECT 1 FROM target) AS identity_found"
        )
    };
}

/// The statements, public so that the benchmark runs exactly these in
/// pgbench. Parameters: `$1` organization, `$2` handle, then for assign `$3`
/// the channel id, `$4` the seconds left and `$5` the actor, for unassign `$3`
/// the seconds left and `$4` the actor.
pub const ASSIGN_MAILBOX: &str = assign_statement!("mailboxes", "mailbox_id");
pub const ASSIGN_PHONE_NUMBER: &str = assign_statement!("phone_numbers", "phone_number_id");
pub const UNASSIGN_MAILBOX: &str = unassign_statement!("mailbox_id");
pub const UNASSIGN_PHONE_NUMBER: &str = unassign_statement!("phone_number_id");

impl Store {
    #[tracing::instrument(name = "store.assign", skip_all, fields(kind = ?kind))]
    pub async fn assign(
        &self,
        organization: &OrganizationId,
        handle: &AgentHandle,
        kind: ChannelKind,
        channel: ChannelId,
        actor: &str,
        window: &WriteWindow,
    ) -> Result<IdentityRecord, ServiceError> {
        let statement = match kind {
            ChannelKind::Mailbox => ASSIGN_MAILBOX,
            ChannelKind::PhoneNumber => ASSIGN_PHONE_NUMBER,
        };
        let mut attempt = 1;
        loop {
            let mut lease = self.connection_within(window).await?;
            let result = sqlx::query_as::<_, AssignRow>(statement)
                .bind(organization.as_str())
                .bind(handle.as_str())
                .bind(channel.as_uuid())
                .bind(window.remaining_seconds())
                .bind(actor)
                .fetch_one(lease.connection())
                .await;
            let outcome = match self.settle(lease, result) {
                Ok(row) => row.outcome(handle, kind, channel),
                Err(error) => Err(assign_error(error, kind, channel)),
            };
            match outcome {
                Err(ServiceError::Unavailable(ref error))
                    if worth_another_attempt(error) && attempt < MAX_ATTEMPTS => {}
                Ok(AssignOutcome::Raced) if attempt < MAX_ATTEMPTS => {}
                Ok(AssignOutcome::Linked(identity)) => return Ok(*identity),
                Ok(AssignOutcome::Raced) => {
                    return Err(ServiceError::Internal(anyhow::anyhow!(
                        "assign kept racing with concurrent changes after {MAX_ATTEMPTS} attempts"
                    )));
                }
                Err(error) => return Err(error),
            }
            tracing::debug!(attempt, "retrying after a concurrent change");
            attempt += 1;
        }
    }

    #[tracing::instrument(name = "store.unassign", skip_all, fields(kind = ?kind))]
    pub async fn unassign(
        &self,
        organization: &OrganizationId,
        handle: &AgentHandle,
        kind: ChannelKind,
        actor: &str,
        window: &WriteWindow,
    ) -> Result<(), ServiceError> {
        let statement = match kind {
            ChannelKind::Mailbox => UNASSIGN_MAILBOX,
            ChannelKind::PhoneNumber => UNASSIGN_PHONE_NUMBER,
        };
        let mut attempt = 1;
        loop {
            let mut lease = self.connection_within(window).await?;
            let result = sqlx::query_scalar::<_, bool>(statement)
                .bind(organization.as_str())
                .bind(handle.as_str())
                .bind(window.remaining_seconds())
                .bind(actor)
                .fetch_one(lease.connection())
                .await;
            match self.settle(lease, result) {
                Ok(true) => return Ok(()),
                Ok(false) => return Err(ServiceError::IdentityNotFound(handle.clone())),
                Err(error) if worth_another_attempt(&error) && attempt < MAX_ATTEMPTS => {}
                Err(error) => return Err(ServiceError::from_database(error)),
            }
            attempt += 1;
        }
    }
}

enum AssignOutcome {
    Linked(Box<IdentityRecord>),
    /// The identity changed between the statement's snapshot and its update
    /// (deleted, or linked by a concurrent request): the snapshot cannot say
    /// what happened, a fresh attempt can.
    Raced,
}

fn assign_error(error: sqlx::Error, kind: ChannelKind, channel: ChannelId) -> ServiceError {
    if let sqlx::Error::Database(db) = &error {
        match db.constraint() {
            // A concurrent request linked the channel to another identity
            // between this statement's snapshot and its update.
            Some("identities_mailbox_unique" | "identities_phone_number_unique") => {
                return ServiceError::ChannelAlreadyAssigned(kind, channel);
            }
            // The channel row was removed (not soft-deleted) meanwhile.
            Some("identities_mailbox_fkey" | "identities_phone_number_fkey") => {
                return ServiceError::ChannelNotFound(kind, channel);
            }
            _ => {}
        }
    }
    ServiceError::from_database(error)
}

#[derive(sqlx::FromRow)]
struct AssignRow {
    channel_found: bool,
    held_by_other: bool,
    linked_channel_id: Option<Uuid>,
    #[sqlx(flatten)]
    identity: IdentityDetailRow,
}

impl AssignRow {
    fn outcome(
        self,
        handle: &AgentHandle,
        kind: ChannelKind,
        channel: ChannelId,
    ) -> Result<AssignOutcome, ServiceError> {
        // The order is the REST origin's: the identity, then the channel,
        // then whether the channel is free.
        let Some(identity) = self.identity.into_record() else {
            return Err(ServiceError::IdentityNotFound(handle.clone()));
        };
        if !self.channel_found {
            return Err(ServiceError::ChannelNotFound(kind, channel));
        }
        if self.held_by_other {
            return Err(ServiceError::ChannelAlreadyAssigned(kind, channel));
        }
        if self.linked_channel_id != Some(channel.as_uuid()) {
            return Ok(AssignOutcome::Raced);
        }
        Ok(AssignOutcome::Linked(Box::new(identity)))
    }
}
