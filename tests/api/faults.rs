//! Faults: the database goes away, connections die mid-statement, the pool
//! runs dry, and requests race. Each test prints its figures (see
//! RELIABILITY.md) and checks the database against the answers afterwards.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use sqlx::PgPool;
use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use uuid::Uuid;

use crate::helpers::*;
use crate::load::{Load, assert_all_served_after, ok_or_unavailable_only, seed_workers, verify};
use crate::proxy::Proxy;

async fn health_stream(
    app: &TestApp,
    service: &str,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    HealthClient::new(app.channel.clone())
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn until_status(
    stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    wanted: ServingStatus,
) {
    tokio::time::timeout(Duration::from_secs(15), async {
        while stream.next().await.unwrap().unwrap().status() != wanted {}
    })
    .await
    .unwrap_or_else(|_| panic!("health never became {wanted:?}"));
}

#[sqlx::test]
async fn a_database_outage_fails_fast_and_heals_by_itself(pool: PgPool) {
    let proxy = Proxy::start(database_address(&pool).await).await;
    let request_timeout = Duration::from_secs(2);
    let app = spawn_app_via_port(&pool, proxy.port, |settings| {
        settings.request_timeout = request_timeout;
        settings.database.database_acquire_timeout = Duration::from_secs(1);
    })
    .await;
    let workers = seed_workers(&pool, 8).await;
    let mut health = health_stream(&app, "").await;
    until_status(&mut health, ServingStatus::Serving).await;

    let load = Load::start(
        workers,
        format!("http://{}", app.address),
        Duration::from_secs(10),
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let cut_at = Instant::now();
    proxy.cut();
    until_status(&mut health, ServingStatus::NotServing).await;
    let not_serving_after = cut_at.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restored_at = Instant::now();
    proxy.restore();
    until_status(&mut health, ServingStatus::Serving).await;
    let recovered_after = restored_at.elapsed();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let workers = load.stop().await;

    let codes = ok_or_unavailable_only(&workers);
    let outage: Vec<_> = workers
        .iter()
        .flat_map(|w| &w.outcomes)
        .filter(|o| o.code != Code::Ok)
        .collect();
    assert!(!outage.is_empty(), "the cut was felt");
    let slowest_failure = outage.iter().map(|o| o.latency).max().unwrap_or_default();
    assert!(
        slowest_failure <= request_timeout,
        "failures are bounded by the request timeout, not hung: {slowest_failure:?}"
    );
    assert_all_served_after(&workers, restored_at, "the restore (no restart)");
    let verdict = verify(&pool, &workers).await;
    drop(health);
    app.stop().await;
    println!(
        "outage: {} requests ({codes:?}), NOT_SERVING {not_serving_after:?} after the cut, \
         SERVING {recovered_after:?} after the restore, slowest failure {slowest_failure:?}, \
         lost: 0, changed by an error: 0 (applied though UNAVAILABLE, connection lost after \
         commit: {})",
        verdict.requests, verdict.applied_despite_unavailable
    );
}

#[sqlx::test]
async fn connections_killed_mid_statement_are_mapped_and_the_pool_heals(pool: PgPool) {
    let port = pool.connect_options().get_port();
    let app = spawn_app_via_port(&pool, port, |_| {}).await;
    let workers = seed_workers(&pool, 6).await;
    let load = Load::start(
        workers,
        format!("http://{}", app.address),
        Duration::from_secs(10),
    );

    let mut killed = 0_i64;
    let killing = Instant::now();
    while killing.elapsed() < Duration::from_secs(2) {
        killed += sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'channel-assignment'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopped_killing = Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let workers = load.stop().await;

    let codes = ok_or_unavailable_only(&workers);
    assert!(killed > 0, "connections were killed");
    assert_all_served_after(
        &workers,
        stopped_killing,
        "the killing stopped (pool healed)",
    );
    let verdict = verify(&pool, &workers).await;
    app.stop().await;
    println!(
        "killed connections: {killed} backends terminated under {} requests ({codes:?}), \
         no panic, applied though UNAVAILABLE: {}",
        verdict.requests, verdict.applied_despite_unavailable
    );
}

#[sqlx::test]
async fn an_exhausted_pool_answers_within_the_deadline_and_recovers(pool: PgPool) {
    let port = pool.connect_options().get_port();
    let app = spawn_app_via_port(&pool, port, |settings| {
        settings.database.database_max_connections = 2;
        // Longer than any client deadline here: the deadline must decide.
        settings.database.database_acquire_timeout = Duration::from_secs(30);
    })
    .await;
    let handles: Vec<String> = (0..32).map(|i| format!("agent-{i}")).collect();
    let mut mailboxes = Vec::new();
    for handle in &handles {
        insert_identity(&pool, ORG, handle).await;
        mailboxes.push(insert_mailbox(&pool, ORG).await.to_string());
    }
    let before = snapshot(&pool).await;

    // Every statement blocks, so the two connections stay taken.
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM identities FOR UPDATE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    let results = tokio::time::timeout(
        Duration::from_secs(10),
        join_all(handles.iter().zip(&mailboxes).map(|(handle, mailbox)| {
            let mut client = app.client.clone();
            let mut request = authorized(
                channel_assignment::proto::AssignMailboxRequest {
                    agent_handle: handle.clone(),
                    mailbox_id: mailbox.clone(),
                },
                ORG,
            );
            request.set_timeout(deadline);
            async move { client.assign_mailbox(request).await }
        })),
    )
    .await
    .expect("no request hangs");
    let all_answered_after = started.elapsed();

    // The server answers a margin before the deadline; on a starved machine
    // the client's own timer can still fire first ("Timeout expired"). Either
    // way the caller is answered by its deadline, which is what is tested.
    let mut answered_by_server = 0;
    let mut client_timeouts = 0;
    for result in results {
        let status = result.expect_err("nothing can be served");
        match status.code() {
            Code::DeadlineExceeded | Code::ResourceExhausted => answered_by_server += 1,
            Code::Cancelled if status.message() == "Timeout expired" => client_timeouts += 1,
            _ => panic!("{status:?}"),
        }
    }
    assert!(answered_by_server > 0, "the server answers by itself");
    lock.rollback().await.unwrap();
    wait_until_quiet(&pool).await;
    assert_eq!(snapshot(&pool).await, before, "no timed-out request wrote");

    let served = join_all(
        handles
            .iter()
            .zip(&mailboxes)
            .map(|(handle, mailbox)| app.assign_mailbox(ORG, handle, mailbox)),
    )
    .await;
    let failures: Vec<_> = served.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "served normally afterwards: {failures:?}"
    );
    app.stop().await;
    println!(
        "pool exhaustion: 32 requests on 2 connections, all answered in {all_answered_after:?} \
         (deadline {deadline:?}; by the server {answered_by_server}, by the client's timer {client_timeouts})"
    );
}

/// One request of the race matrix, and what it asked for.
struct Raced {
    identity: usize,
    kind: Kind,
    wanted: Option<Uuid>,
    code: Code,
}

#[sqlx::test]
async fn randomized_races_keep_invariants_and_agree_with_the_answers(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let identities = ["ana", "ben", "cy"];
    for handle in identities {
        insert_identity(&pool, ORG, handle).await;
        insert_identity(&pool, OTHER_ORG, handle).await;
    }
    let mut channels = Vec::new();
    for kind in [Kind::Mailbox, Kind::PhoneNumber] {
        for _ in 0..3 {
            channels.push((kind, kind.insert(&pool, ORG).await));
        }
        channels.push((kind, kind.insert(&pool, OTHER_ORG).await));
    }

    let (rounds, per_round) = (25, 32);
    let mut answered = 0;
    for round in 0..rounds {
        let mut start = Vec::new();
        for (index, handle) in identities.iter().enumerate() {
            for kind in [Kind::Mailbox, Kind::PhoneNumber] {
                start.push(((index, kind), kind.linked_to(&pool, ORG, handle).await));
            }
        }
        let requests = (0..per_round).map(|_| {
            let dice = Uuid::new_v4().into_bytes();
            let identity = usize::from(dice[0]) % identities.len();
            let (kind, channel) = channels[usize::from(dice[1]) % channels.len()];
            let wanted = (!dice[2].is_multiple_of(4)).then_some(channel);
            let app = &app;
            async move {
                let handle = identities[identity];
                let result = match wanted {
                    Some(channel) => kind
                        .assign(app, ORG, handle, &channel.to_string())
                        .await
                        .map(drop),
                    None => kind.unassign(app, ORG, handle).await,
                };
                Raced {
                    identity,
                    kind,
                    wanted,
                    code: result.map_or_else(|status| status.code(), |()| Code::Ok),
                }
            }
        });
        let raced = join_all(requests).await;
        answered += raced.len();

        for request in &raced {
            assert!(
                matches!(
                    request.code,
                    Code::Ok | Code::AlreadyExists | Code::NotFound
                ),
                "round {round}: {:?}",
                request.code
            );
        }
        // A link changes only through requests for that identity: what it
        // holds is what one of its OK requests asked for, or, with none,
        // what it held before.
        for ((identity, kind), before) in start {
            let held = kind.linked_to(&pool, ORG, identities[identity]).await;
            let ok_wants: Vec<Option<Uuid>> = raced
                .iter()
                .filter(|r| r.identity == identity && r.kind == kind && r.code == Code::Ok)
                .map(|r| r.wanted)
                .collect();
            if ok_wants.is_empty() {
                assert_eq!(held, before, "round {round}: changed with no OK request");
            } else {
                assert!(
                    ok_wants.contains(&held),
                    "round {round}: holds {held:?}, OK asked {ok_wants:?}"
                );
            }
        }
        let doubled: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (
                 SELECT mailbox_id FROM identities WHERE mailbox_id IS NOT NULL GROUP BY 1 HAVING count(*) > 1
                 UNION ALL
                 SELECT phone_number_id FROM identities WHERE phone_number_id IS NOT NULL GROUP BY 1 HAVING count(*) > 1
             ) AS d",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(doubled, 0);
        let foreign: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM identities WHERE organization_id = $1
               AND (mailbox_id IS NOT NULL OR phone_number_id IS NOT NULL)",
        )
        .bind(OTHER_ORG)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(foreign, 0, "the other organization is untouched");
    }
    println!("race matrix: {rounds} rounds, {answered} concurrent requests, invariants broken: 0");
}
