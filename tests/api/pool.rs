//! The service's own connection pool: one round trip per request, sessions
//! that PostgreSQL ends are replaced without failing a request, a failed
//! statement keeps its connection, and a connection abandoned mid-statement
//! is closed, never reused.

use std::time::Duration;

use channel_assignment::{
    config::AuthSettings,
    store::database::{Database, Lease},
};
use futures_util::future::join_all;
use sqlx::PgPool;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::*;
use crate::proxy::Proxy;

/// The service's sessions on the test's database.
async fn service_backends(pool: &PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'channel-assignment'
         ORDER BY pid",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn a_request_costs_one_round_trip_to_the_database(pool: PgPool) {
    let proxy = Proxy::start(database_address(&pool).await).await;
    let app = spawn_app_via_port(&pool, proxy.port, |settings| {
        settings.database.database_max_connections = 1;
        // One check at start, none while counting.
        settings.health_check_interval = Duration::from_secs(3600);
    })
    .await;
    wait_for(&app, "readiness", ServingStatus::Serving).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailboxes = [
        insert_mailbox(&pool, ORG).await.to_string(),
        insert_mailbox(&pool, ORG).await.to_string(),
    ];
    // The first use of a statement on a connection also prepares it.
    app.assign_mailbox(ORG, "sales-agent", &mailboxes[0])
        .await
        .unwrap();
    app.unassign_mailbox(ORG, "sales-agent").await.unwrap();

    let before = proxy.sends();
    let mut requests = 0_u64;
    for mailbox in mailboxes.iter().cycle().take(20) {
        app.assign_mailbox(ORG, "sales-agent", mailbox)
            .await
            .unwrap();
        app.unassign_mailbox(ORG, "sales-agent").await.unwrap();
        requests += 2;
    }
    let sends = proxy.sends() - before;

    // sqlx's own pool would have added a ping on taking the connection and
    // another on giving it back: three round trips per request.
    assert!(
        (requests..2 * requests).contains(&sends),
        "{sends} sends to the database for {requests} requests"
    );
    println!("round trips: {sends} sends to the database for {requests} requests");
}

#[sqlx::test]
async fn sessions_the_database_ends_are_replaced_without_failing_a_request(pool: PgPool) {
    let mut settings = test_settings(AuthSettings::hs256(SECRET));
    // So that the requests, not a health check, meet the ended sessions.
    settings.health_check_interval = Duration::from_secs(3600);
    let app = spawn_app_with_settings(&pool, settings).await;
    let handles: Vec<String> = (0..8).map(|i| format!("agent-{i}")).collect();
    let mut mailboxes = Vec::new();
    for handle in &handles {
        insert_identity(&pool, ORG, handle).await;
        mailboxes.push(insert_mailbox(&pool, ORG).await.to_string());
    }
    // Several connections, idle in the pool afterwards.
    for result in join_all(
        handles
            .iter()
            .zip(&mailboxes)
            .map(|(handle, mailbox)| app.assign_mailbox(ORG, handle, mailbox)),
    )
    .await
    {
        result.unwrap();
    }
    let ended = service_backends(&pool).await;
    assert!(!ended.is_empty());

    // As an operator's pg_terminate_backend, a restart or a failover would.
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'channel-assignment'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(terminated, i64::try_from(ended.len()).unwrap());

    for handle in &handles {
        app.unassign_mailbox(ORG, handle)
            .await
            .expect("served on a new connection");
    }
    let replaced = service_backends(&pool).await;
    assert!(!replaced.is_empty());
    assert!(
        replaced.iter().all(|pid| !ended.contains(pid)),
        "no ended session is used again: {ended:?} then {replaced:?}"
    );
    for handle in &handles {
        assert_eq!(Kind::Mailbox.linked_to(&pool, ORG, handle).await, None);
    }
}

/// The PostgreSQL session behind a leased connection.
async fn backend_pid(lease: &mut Lease) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(lease.connection())
        .await
        .unwrap()
}

/// The session the pool hands out next, given back after use.
async fn next_session(database: &Database) -> i32 {
    let mut lease = database.connection().await.unwrap();
    let pid = backend_pid(&mut lease).await;
    lease.settle(Ok(())).unwrap();
    pid
}

#[sqlx::test]
async fn a_failed_statement_keeps_its_connection(pool: PgPool) {
    let database = database_for(&pool, &test_settings(AuthSettings::hs256(SECRET)));
    let mut lease = database.connection().await.unwrap();
    let first = backend_pid(&mut lease).await;
    let failed = sqlx::query("SELECT 1 / 0")
        .execute(lease.connection())
        .await;
    assert!(lease.settle(failed).is_err());
    assert_eq!(database.status().idle, 1, "given back");

    assert_eq!(
        next_session(&database).await,
        first,
        "the same session, still usable"
    );
    database.close().await;
}

#[sqlx::test]
async fn a_connection_abandoned_mid_statement_is_closed_not_reused(pool: PgPool) {
    let database = database_for(&pool, &test_settings(AuthSettings::hs256(SECRET)));
    let mut lease = database.connection().await.unwrap();
    let abandoned = backend_pid(&mut lease).await;
    let statement = sqlx::query("SELECT pg_sleep(30)").execute(lease.connection());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), statement)
            .await
            .is_err(),
        "still running when abandoned"
    );
    drop(lease);
    assert_eq!(database.status().connections, 0, "closed, not given back");

    assert_ne!(next_session(&database).await, abandoned, "a new session");
    database.close().await;
    sqlx::query("SELECT pg_cancel_backend($1)")
        .bind(abandoned)
        .execute(&pool)
        .await
        .unwrap();
}
