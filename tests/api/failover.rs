//! A database that answers but refuses writes, as a demoted primary or a
//! standby does while a proxy or a `-rw` Service still points at it: writes
//! are `UNAVAILABLE` (never `INTERNAL`), readiness turns `NOT_SERVING`, and
//! once the database takes writes again the service recovers by itself,
//! without reusing a single read-only session.

use sqlx::PgPool;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::for_each_kind;
use crate::helpers::*;

/// Makes every new session of the test's database read-only (as
/// `default_transaction_read_only` on a demoted primary), or undoes it.
async fn set_read_only(pool: &PgPool, read_only: bool) {
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let setting = if read_only {
        "SET default_transaction_read_only = on"
    } else {
        "RESET default_transaction_read_only"
    };
    // The test's own sessions may be read-only by now: ask for a writable
    // transaction explicitly.
    let statement =
        format!("START TRANSACTION READ WRITE; ALTER DATABASE \"{database}\" {setting}; COMMIT");
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
        .execute(pool)
        .await
        .unwrap();
}

/// Ends the service's sessions, so that its next ones are opened afresh.
async fn end_service_sessions(pool: &PgPool) {
    sqlx::query(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'channel-assignment'",
    )
    .execute(pool)
    .await
    .unwrap();
}

for_each_kind!(writes_to_a_read_only_database_are_unavailable_and_heal_without_a_restart);

async fn writes_to_a_read_only_database_are_unavailable_and_heal_without_a_restart(
    kind: Kind,
    pool: PgPool,
) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let first = kind.insert(&pool, ORG).await.to_string();
    let second = kind.insert(&pool, ORG).await.to_string();
    kind.assign(&app, ORG, "sales-agent", &first)
        .await
        .expect("served while writable");

    set_read_only(&pool, true).await;
    end_service_sessions(&pool).await;
    let before = snapshot(&pool).await;

    // Every answer while read-only is a retryable UNAVAILABLE, never INTERNAL.
    for _ in 0..5 {
        assert_error(
            kind.assign(&app, ORG, "sales-agent", &second).await,
            Code::Unavailable,
            "UNAVAILABLE",
        );
        assert_error(
            kind.unassign(&app, ORG, "sales-agent").await,
            Code::Unavailable,
            "UNAVAILABLE",
        );
    }
    wait_for(&app, "readiness", ServingStatus::NotServing).await;
    wait_for(&app, "", ServingStatus::NotServing).await;
    wait_for(&app, "liveness", ServingStatus::Serving).await;
    assert_eq!(snapshot(&pool).await, before);

    // Writable again; the sessions opened while read-only stay read-only for
    // their whole life, so any of them reused would fail the next writes.
    set_read_only(&pool, false).await;
    wait_for(&app, "readiness", ServingStatus::Serving).await;
    for _ in 0..5 {
        kind.unassign(&app, ORG, "sales-agent")
            .await
            .expect("served again without a restart");
        let identity = kind
            .assign(&app, ORG, "sales-agent", &second)
            .await
            .expect("served again without a restart");
        assert_eq!(kind.linked_in(&identity), Some(second.clone()));
    }
    assert_eq!(
        kind.linked_to(&pool, ORG, "sales-agent")
            .await
            .map(|id| id.to_string()),
        Some(second)
    );
}
