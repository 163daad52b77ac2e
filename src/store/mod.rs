//! All SQL of the service: one statement per operation, one round trip on
//! every path. Outcomes are told apart from what the statement returns and
//! from the constraint it hit, never from extra queries beforehand.
//!
//! `database` is the connection pool; `identities` the statements that link
//! and unlink channels.

pub mod database;
pub mod privileges;

use std::sync::Arc;

use tokio::time::Instant;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::{DatabaseErrorClass, ServiceError};
use crate::metrics::Metrics;
use crate::operations::deadline::WriteWindow;
use database::{Database, Lease};
use sqlx::{
    Postgres,
    postgres::{PgArguments, PgRow},
    query::QueryAs,
};

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

mod events;
mod identities;
mod inventory;
mod reads;

pub use events::{EventRecord, RelayBacklog};
pub use identities::{
    ASSIGN_MAILBOX, ASSIGN_PHONE_NUMBER, UNASSIGN_MAILBOX, UNASSIGN_PHONE_NUMBER,
};
pub use inventory::{MailboxUpsert, PhoneNumberUpsert};
pub use reads::{GET_IDENTITY, LOOKUP_BY_EMAIL_ADDRESS, ListCursor, Page};

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

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MailboxRecord {
    pub id: Uuid,
    pub email_address: String,
    pub display_name: Option<String>,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PhoneNumberRecord {
    pub id: Uuid,
    pub number: String,
    #[sqlx(rename = "type")]
    pub number_type: String,
    pub status: String,
    pub incoming_call_action: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

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

    /// Runs one statement (built afresh by `query` for each attempt) on a
    /// pooled connection, and again on a fresh one when PostgreSQL refused it
    /// before it changed anything. A write passes its request's window, so
    /// that nothing is sent after the request was answered
    /// DEADLINE_EXCEEDED; a read passes none.
    async fn fetch_rows<'q, O>(
        &self,
        window: Option<&WriteWindow>,
        query: impl Fn() -> QueryAs<'q, Postgres, O, PgArguments>,
    ) -> Result<Vec<O>, StatementError>
    where
        O: Send + Unpin + for<'r> sqlx::FromRow<'r, PgRow>,
    {
        let mut attempt = 1;
        loop {
            let mut lease = match window {
                Some(window) => self.connection_within(window).await?,
                None => self.connection().await?,
            };
            let result = query().fetch_all(lease.connection()).await;
            match self.settle(lease, result) {
                Ok(rows) => return Ok(rows),
                Err(error) if worth_another_attempt(&error) && attempt < MAX_ATTEMPTS => {
                    attempt += 1;
                }
                Err(error) => return Err(StatementError::Database(error)),
            }
        }
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
}

/// Why `Store::run` gave up: before the statement ran (no connection, the
/// deadline), or because of the statement's own error, which the caller
/// maps (a constraint's name means something to it).
enum StatementError {
    Service(ServiceError),
    Database(sqlx::Error),
}

impl From<ServiceError> for StatementError {
    fn from(error: ServiceError) -> Self {
        Self::Service(error)
    }
}

impl StatementError {
    /// The error as callers see it, with `constraint` naming what a unique
    /// violation means to this statement.
    fn into_service_error(
        self,
        constraint: impl FnOnce(&str) -> Option<ServiceError>,
    ) -> ServiceError {
        match self {
            Self::Service(error) => error,
            Self::Database(error) => {
                if let sqlx::Error::Database(db) = &error
                    && let Some(mapped) = db.constraint().and_then(constraint)
                {
                    return mapped;
                }
                ServiceError::from_database(error)
            }
        }
    }
}

/// A serialization failure or deadlock, or a statement PostgreSQL refused
/// before it changed anything (an ended session, a read-only server):
/// another attempt (on another connection) can succeed, and cannot apply the
/// change twice.
fn worth_another_attempt(error: &sqlx::Error) -> bool {
    DatabaseErrorClass::of(error) == DatabaseErrorClass::Conflict
        || database::refused_before_any_change(error)
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
