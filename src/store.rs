//! All SQL of the service: one statement per operation, one round trip on
//! every path. Outcomes are told apart from what the statement returns and
//! from the constraint it hit, never from extra queries beforehand.

use std::sync::Arc;

use tokio::time::Instant;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::database::{self, Database, Lease};
use crate::deadline::WriteWindow;
use crate::domain::{AgentHandle, ChannelId, ChannelKind, OrganizationId};
use crate::error::{DatabaseErrorClass, ServiceError};
use crate::metrics::Metrics;

/// The full identity detail, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRecord {
    pub id: Uuid,
    pub organization_id: String,
    pub agent_handle: String,
    pub display_name: Option<String>,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub mailbox: Option<MailboxRecord>,
    pub phone_number: Option<PhoneNumberRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxRecord {
    pub id: Uuid,
    pub email_address: String,
    pub display_name: Option<String>,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhoneNumberRecord {
    pub id: Uuid,
    pub number: String,
    pub number_type: String,
    pub status: String,
    pub incoming_call_action: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Links a channel to an identity of the same organization in one statement.
///
/// The `UPDATE` re-checks its conditions on the row's newest version (READ
/// COMMITTED), and the unique constraint on the link column decides between
/// concurrent claims of one channel, so the outcome is right under any
/// interleaving; the snapshot flags only explain a refusal.
///
/// The request's remaining time travels with the statement (`$4`, seconds):
/// sqlx cannot cancel a statement whose future is dropped, so a statement
/// that waited on a lock past the deadline must fail rather than write when it
/// resumes (`ensure_in_time`, see the migration).
macro_rules! assign_statement {
    ($channel_table:literal, $link_column:literal) => {
        concat!(
            "WITH target AS (
                SELECT * FROM identities
                WHERE organization_id = $1 AND agent_handle = $2
                  AND status IN ('active', 'paused')
            ),
            channel AS (
                SELECT id FROM ", $channel_table, "
                WHERE organization_id = $1 AND id = $3 AND status IN ('active', 'paused')
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
/// `$3` is the request's remaining time, guarded as for assign.
macro_rules! unassign_statement {
    ($link_column:literal) => {
        concat!(
            "WITH target AS (
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
                RETURNING i.id, ensure_in_time($3)
            )
            SELECT EXISTS (SELECT 1 FROM target) AS identity_found"
        )
    };
}

/// The columns of `identities`, in one order for both sides of a UNION.
macro_rules! identity_columns {
    () => {
        "SELECT organization_id, id, agent_handle, display_name, mailbox_id,
                phone_number_id, status, created_at, updated_at"
    };
}

/// The identity detail of row `r`, as read by `IdentityDetailRow`.
macro_rules! identity_detail_columns {
    () => {
        "
        r.id AS identity_id,
        r.organization_id,
        r.agent_handle,
        r.display_name,
        r.status AS identity_status,
        r.created_at AS identity_created_at,
        r.updated_at AS identity_updated_at,
        m.id AS mailbox_id,
        m.email_address AS mailbox_email_address,
        m.display_name AS mailbox_display_name,
        m.status AS mailbox_status,
        m.created_at AS mailbox_created_at,
        m.updated_at AS mailbox_updated_at,
        p.id AS phone_number_id,
        p.number AS phone_number_number,
        p.type AS phone_number_type,
        p.status AS phone_number_status,
        p.incoming_call_action AS phone_number_incoming_call_action,
        p.created_at AS phone_number_created_at,
        p.updated_at AS phone_number_updated_at
        "
    };
}

macro_rules! identity_detail_joins {
    () => {
        "
        LEFT JOIN mailboxes AS m
            ON m.organization_id = r.organization_id AND m.id = r.mailbox_id
        LEFT JOIN phone_numbers AS p
            ON p.organization_id = r.organization_id AND p.id = r.phone_number_id"
    };
}

/// The statements, public so that the benchmark runs exactly these in
/// pgbench. Parameters: `$1` organization, `$2` handle, then for assign `$3`
/// the channel id and `$4` the seconds left, for unassign `$3` the seconds left.
pub const ASSIGN_MAILBOX: &str = assign_statement!("mailboxes", "mailbox_id");
pub const ASSIGN_PHONE_NUMBER: &str = assign_statement!("phone_numbers", "phone_number_id");
pub const UNASSIGN_MAILBOX: &str = unassign_statement!("mailbox_id");
pub const UNASSIGN_PHONE_NUMBER: &str = unassign_statement!("phone_number_id");

/// How often an operation is tried when a concurrent change got in its way
/// (a serialization failure, a deadlock, or a row changed under the update),
/// or PostgreSQL ended the session in place of an answer.
const MAX_ATTEMPTS: u32 = 3;

#[derive(Clone)]
pub struct Store {
    database: Database,
    metrics: Arc<Metrics>,
}

impl Store {
    pub fn new(database: Database, metrics: Arc<Metrics>) -> Self {
        Self { database, metrics }
    }

    /// A connection from the pool, counting the wait in the metrics. Failing
    /// to get one, whatever the reason sqlx gives, means the database cannot
    /// be reached now.
    async fn connection(&self) -> Result<Lease, ServiceError> {
        let _waiting = self.metrics.waiting_for_connection();
        let started = Instant::now();
        let connection = self.database.connection().await;
        self.metrics.connection_acquired(started.elapsed());
        connection.map_err(|error| {
            self.metrics
                .database_error(DatabaseErrorClass::Unavailable.label());
            ServiceError::Unavailable(error)
        })
    }

    /// A connection for a statement of a request that is answered on a
    /// deadline: none once the waiter has answered DEADLINE_EXCEEDED, so that
    /// nothing is written after that answer (see `deadline::StatementGate`).
    async fn connection_within(&self, window: &WriteWindow) -> Result<Lease, ServiceError> {
        if window.gate.is_abandoned() {
            return Err(ServiceError::DeadlineExceeded);
        }
        let lease = self.connection().await?;
        if !window.gate.may_send() {
            // Unused: back to the pool as it came.
            lease.release();
            return Err(ServiceError::DeadlineExceeded);
        }
        Ok(lease)
    }

    pub fn database(&self) -> &Database {
        &self.database
    }

    /// Gives the connection back after a statement (see `Lease::settle`),
    /// counting a failure by kind.
    fn settle<T>(&self, lease: Lease, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if let Err(error) = &result {
            self.metrics
                .database_error(DatabaseErrorClass::of(error).label());
        }
        lease.settle(result)
    }

    #[tracing::instrument(name = "store.assign", skip_all, fields(kind = ?kind))]
    pub async fn assign(
        &self,
        organization: &OrganizationId,
        handle: &AgentHandle,
        kind: ChannelKind,
        channel: ChannelId,
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

/// A serialization failure or deadlock, or a statement PostgreSQL refused
/// before it changed anything (an ended session, a read-only server):
/// another attempt (on another connection) can succeed, and cannot apply the
/// change twice.
fn worth_another_attempt(error: &sqlx::Error) -> bool {
    DatabaseErrorClass::of(error) == DatabaseErrorClass::Conflict
        || database::refused_before_any_change(error)
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

/// An identity with its channels, every column nullable because the row is
/// left-joined (no identity: all NULL).
#[derive(sqlx::FromRow)]
struct IdentityDetailRow {
    identity_id: Option<Uuid>,
    organization_id: Option<String>,
    agent_handle: Option<String>,
    display_name: Option<String>,
    identity_status: Option<String>,
    identity_created_at: Option<DateTime<Utc>>,
    identity_updated_at: Option<DateTime<Utc>>,
    mailbox_id: Option<Uuid>,
    mailbox_email_address: Option<String>,
    mailbox_display_name: Option<String>,
    mailbox_status: Option<String>,
    mailbox_created_at: Option<DateTime<Utc>>,
    mailbox_updated_at: Option<DateTime<Utc>>,
    phone_number_id: Option<Uuid>,
    phone_number_number: Option<String>,
    phone_number_type: Option<String>,
    phone_number_status: Option<String>,
    phone_number_incoming_call_action: Option<String>,
    phone_number_created_at: Option<DateTime<Utc>>,
    phone_number_updated_at: Option<DateTime<Utc>>,
}

impl IdentityDetailRow {
    fn into_record(self) -> Option<IdentityRecord> {
        let mailbox = (|| {
            Some(MailboxRecord {
                id: self.mailbox_id?,
                email_address: self.mailbox_email_address?,
                display_name: self.mailbox_display_name,
                status: self.mailbox_status?,
                created_at: self.mailbox_created_at?,
                updated_at: self.mailbox_updated_at?,
            })
        })();
        let phone_number = (|| {
            Some(PhoneNumberRecord {
                id: self.phone_number_id?,
                number: self.phone_number_number?,
                number_type: self.phone_number_type?,
                status: self.phone_number_status?,
                incoming_call_action: self.phone_number_incoming_call_action,
                created_at: self.phone_number_created_at?,
                updated_at: self.phone_number_updated_at?,
            })
        })();
        Some(IdentityRecord {
            id: self.identity_id?,
            organization_id: self.organization_id?,
            agent_handle: self.agent_handle?,
            display_name: self.display_name,
            status: self.identity_status?,
            created_at: self.identity_created_at?,
            updated_at: self.identity_updated_at?,
            mailbox,
            phone_number,
        })
    }
}
