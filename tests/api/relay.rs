//! The change-event relay against the real NATS server with JetStream on
//! 127.0.0.1:4222: every event published once, in order, with its message
//! id; a restart of the service resumes without a gap and without a
//! duplicate.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use channel_assignment::{config::AuthSettings, proto::AssignmentEvent};
use futures::StreamExt as _;
use prost::Message as _;
use sqlx::PgPool;

use crate::helpers::*;

const NATS_URL: &str = "nats://127.0.0.1:4222";

/// An organization no other test (or earlier run) has used: the stream is
/// shared, and message ids are `<organization>:<sequence>`.
fn fresh_organization() -> String {
    format!("relay_{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

async fn spawn_relaying(pool: &PgPool) -> TestApp {
    let mut settings = test_settings(AuthSettings::hs256(SECRET));
    settings.events_nats_url = Some(NATS_URL.to_owned());
    spawn_app_with_settings(pool, settings).await
}

/// Every message JetStream holds for `org` (waiting up to a few seconds for
/// `expected` of them), as (message id, event).
async fn published(org: &str, expected: usize) -> Vec<(String, AssignmentEvent)> {
    let client = async_nats::connect(NATS_URL).await.expect("NATS is up");
    let jetstream = jetstream::new(client);
    let mut received = Vec::new();
    for _ in 0..50 {
        let stream = match jetstream.get_stream("CHANNELS_ASSIGNMENT_EVENTS").await {
            Ok(stream) => stream,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: format!("channels.v1.assignment_events.{org}"),
                ack_policy: jetstream::consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_millis(300))
            .messages()
            .await
            .unwrap();
        received.clear();
        while let Some(message) = messages.next().await {
            let message = message.unwrap();
            let id = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get("Nats-Msg-Id"))
                .map(|value| value.to_string())
                .unwrap_or_default();
            let event = AssignmentEvent::decode(message.payload.clone()).unwrap();
            received.push((id, event));
        }
        if received.len() >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    received
}

async fn table_events(pool: &PgPool, org: &str) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT sequence FROM assignment_events WHERE organization_id = $1 ORDER BY sequence",
    )
    .bind(org)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn events_are_published_once_in_order_and_a_restart_leaves_no_gap(pool: PgPool) {
    let org = fresh_organization();
    let app = spawn_relaying(&pool).await;
    let handles: Vec<String> = (0..3).map(|i| format!("agent-{i}")).collect();
    for handle in &handles {
        insert_identity(&pool, &org, handle).await;
    }
    let mut mailboxes = Vec::new();
    for _ in 0..5 {
        mailboxes.push(insert_mailbox(&pool, &org).await.to_string());
    }
    let write = |round: usize| {
        let app = &app;
        let handle = handles[round % handles.len()].clone();
        let mailbox = mailboxes[round % mailboxes.len()].clone();
        let org = org.clone();
        async move {
            let _ = app.assign_mailbox(&org, &handle, &mailbox).await;
        }
    };
    futures::future::join_all((0..12).map(write)).await;

    let table = table_events(&pool, &org).await;
    assert!(!table.is_empty());
    let seen = published(&org, table.len()).await;
    assert_eq!(
        seen.iter().map(|(_, e)| e.sequence).collect::<Vec<_>>(),
        table
    );
    for (id, event) in &seen {
        assert_eq!(*id, format!("{org}:{}", event.sequence));
        assert_eq!(event.organization_id, org);
    }

    // The service stops; changes go on; a new one relays the rest.
    app.stop().await;
    app_writes_without_relay(&pool, &org, &handles, &mailboxes).await;
    let app = spawn_relaying(&pool).await;
    let table = table_events(&pool, &org).await;
    let seen = published(&org, table.len()).await;
    assert_eq!(
        seen.iter().map(|(_, e)| e.sequence).collect::<Vec<_>>(),
        table,
        "every event once, in order, after the restart"
    );
    let metrics = crate::metrics::scrape(app.metrics_addr).await;
    assert!(
        metrics.contains("channel_assignment_events_relay_lag"),
        "{metrics}"
    );
}

/// Changes while no service relays: a service without the relay makes them.
async fn app_writes_without_relay(
    pool: &PgPool,
    org: &str,
    handles: &[String],
    mailboxes: &[String],
) {
    let app = spawn_app(pool).await;
    for (round, handle) in handles.iter().enumerate() {
        let _ = app
            .assign_mailbox(org, handle, &mailboxes[(round + 2) % mailboxes.len()])
            .await;
        app.unassign_mailbox(org, handle).await.unwrap();
    }
}
