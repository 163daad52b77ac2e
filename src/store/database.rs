//! The connections the service's statements run on.
//!
//! sqlx's own pool makes a round trip to PostgreSQL when it hands a
//! connection out (`test_before_acquire`) and another, unconditionally in
//! sqlx 0.9, when it takes it back. With one statement per request that is
//! three round trips where one does, and the two pings cost PostgreSQL about
//! as much as the statement's own messages (BENCHMARKS.md). This pool
//! (deadpool, over sqlx connections) hands connections out and takes them
//! back without any I/O; instead, a connection is judged by how its last
//! statement ended, and one that may be broken is closed, never reused.

use std::time::Duration;

use deadpool::managed::{self, Metrics, PoolError, RecycleError, RecycleResult, TimeoutType};
use sqlx::{ConnectOptions as _, Connection as _, PgConnection, postgres::PgConnectOptions};

use crate::config::DatabaseSettings;
use crate::error::DatabaseErrorClass;

/// Connections are replaced after this long, so that PostgreSQL can free
/// what a long session accumulates (as sqlx's pool does by default).
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// Idle connections are closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// How long a graceful close (PostgreSQL's Terminate message) may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

type Pooled = managed::Object<Manager>;

struct Manager {
    options: PgConnectOptions,
}

impl managed::Manager for Manager {
    type Type = PgConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<PgConnection, sqlx::Error> {
        self.options.connect().await
    }

    async fn recycle(&self, _: &mut PgConnection, metrics: &Metrics) -> RecycleResult<sqlx::Error> {
        if metrics.age() > MAX_LIFETIME {
            return Err(RecycleError::message(
                "connection reached its maximum lifetime",
            ));
        }
        Ok(())
    }
}

/// The pool: lazy (the service starts, and reports NOT_SERVING, while the
/// database is down) and cheap to clone.
#[derive(Clone)]
pub struct Database {
    pool: managed::Pool<Manager>,
}

/// What the pool holds now, for the metrics.
pub struct PoolStatus {
    pub connections: usize,
    pub idle: usize,
}

impl Database {
    pub fn new(options: PgConnectOptions, settings: &DatabaseSettings) -> anyhow::Result<Self> {
        let max_size = usize::try_from(settings.database_max_connections)?;
        anyhow::ensure!(max_size > 0, "DATABASE_MAX_CONNECTIONS must be at least 1");
        let pool = managed::Pool::builder(Manager { options })
            .max_size(max_size)
            // Hot connections first, so that the ones a quieter time does
            // not need go idle and are closed.
            .queue_mode(deadpool::managed::QueueMode::Lifo)
            .wait_timeout(Some(settings.database_acquire_timeout))
            .create_timeout(Some(settings.database_acquire_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            .build()?;
        Ok(Self { pool })
    }

    /// What the pool connects with: for a connection of its own elsewhere
    /// (the events listener).
    pub fn connect_options(&self) -> PgConnectOptions {
        self.pool.manager().options.clone()
    }

    /// A connection, without a round trip unless one must be opened.
    pub async fn connection(&self) -> Result<Lease, sqlx::Error> {
        let pooled = self.pool.get().await.map_err(|error| match error {
            PoolError::Backend(error) => error,
            PoolError::Timeout(TimeoutType::Wait | TimeoutType::Create) => {
                sqlx::Error::PoolTimedOut
            }
            PoolError::Closed => sqlx::Error::PoolClosed,
            // No hooks are configured, and recycling never times out.
            other => sqlx::Error::Configuration(other.to_string().into()),
        })?;
        Ok(Lease {
            pooled: Some(pooled),
            pool: self.pool.clone(),
        })
    }

    /// Whether the database answers now and would take the service's
    /// writes: a server in recovery (a standby) or in read-only mode (a
    /// demoted primary) answers `SELECT 1` as happily as the primary, yet
    /// fails every write; so does a role without privileges on the tables.
    pub async fn check_writable(&self) -> Result<(), HealthError> {
        let mut lease = self.connection().await.map_err(HealthError::Database)?;
        let result = sqlx::query_scalar::<_, bool>(
            "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::boolean",
        )
        .fetch_one(lease.connection())
        .await;
        let read_only = lease.settle(result).map_err(HealthError::Database)?;
        if read_only {
            // Its sessions are of no use for writes: drop the idle ones, so
            // that the next requests connect afresh (and reach the primary
            // once the endpoint has moved).
            let idle = self.pool.retain(|_, _| false).removed;
            close_gracefully(idle).await;
            return Err(HealthError::ReadOnly);
        }
        let mut lease = self.connection().await.map_err(HealthError::Database)?;
        let result = super::privileges::missing(lease.connection()).await;
        let missing = lease.settle(result).map_err(HealthError::Database)?;
        if !missing.is_empty() {
            return Err(HealthError::Privileges(missing.join(", ")));
        }
        Ok(())
    }

    /// Closes connections unused for `IDLE_TIMEOUT`.
    pub async fn close_idle(&self) {
        let idle = self
            .pool
            .retain(|_, metrics| metrics.last_used() < IDLE_TIMEOUT)
            .removed;
        close_gracefully(idle).await;
    }

    pub fn status(&self) -> PoolStatus {
        let status = self.pool.status();
        PoolStatus {
            connections: status.size,
            idle: status.available,
        }
    }

    /// Closes the pool: idle connections now, with a Terminate message so
    /// that PostgreSQL sees an orderly end; connections still in use when
    /// they come back.
    pub async fn close(&self) {
        let idle = self.pool.retain(|_, _| false).removed;
        self.pool.close();
        close_gracefully(idle).await;
    }
}

/// A connection taken from the pool. It goes back only through `settle`,
/// after its statement ended: one dropped mid-statement (a cancelled future)
/// may have an answer still on its way, and is closed instead.
pub struct Lease {
    pooled: Option<Pooled>,
    pool: managed::Pool<Manager>,
}

impl Lease {
    pub fn connection(&mut self) -> &mut PgConnection {
        // `pooled` is only taken by `settle` (which consumes the lease) and `drop`.
        self.pooled
            .as_deref_mut()
            .expect("a lease holds its connection until settled")
    }

    /// Gives back a connection that was not used.
    pub fn release(mut self) {
        drop(self.pooled.take());
    }

    /// Gives the connection back after a statement that ended with `result`.
    ///
    /// A failure of the statement itself (a constraint, a timeout) leaves the
    /// connection usable. One that may have broken it (a lost connection, the
    /// server ending the session) closes it, and the idle ones with it: they
    /// usually share its fate (a restart, a failover, a cut network), and
    /// each would otherwise fail a request of its own before being replaced.
    pub fn settle<T>(mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        let pooled = self.pooled.take();
        if let Err(error) = &result
            && DatabaseErrorClass::of(error) == DatabaseErrorClass::Unavailable
        {
            drop(pooled.map(Pooled::take));
            let idle = self.pool.retain(|_, _| false).removed;
            tracing::info!(
                %error,
                closed_idle = idle.len(),
                "database connection may be broken: closed it and the idle ones"
            );
        }
        result
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            drop(Pooled::take(pooled));
        }
    }
}

async fn close_gracefully(connections: Vec<PgConnection>) {
    for connection in connections {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close()).await;
    }
}

/// Why the database is not fit to serve.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("database unreachable")]
    Database(#[source] sqlx::Error),
    #[error("database refuses writes (a standby or a read-only primary)")]
    ReadOnly,
    #[error(
        "the database role lacks privileges the service needs (SQLSTATE 42501 on every call): \
         {0}; run `channel-assignment migrate` with DATABASE_APP_ROLE naming this role"
    )]
    Privileges(String),
}

/// Whether PostgreSQL refused the statement without changing anything: it
/// ended the session in place of an answer (an operator's
/// `pg_terminate_backend`, a shutdown or restart, `idle_session_timeout`), or
/// the server is read-only (a demoted primary or a standby, SQLSTATE 25006).
/// The statement's transaction was then rolled back, so running it again on
/// another connection is safe; after a lost connection, by contrast, nobody
/// knows whether it committed.
pub fn refused_before_any_change(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(error) = error else {
        return false;
    };
    matches!(
        error.code().as_deref(),
        Some("57P01" | "57P02" | "57P05" | "25006")
    )
}
