//! The change-event relay against the real NATS server with JetStream on
//! 127.0.0.1:4222 (or a nats-server process of the test's own, to stop and
//! start): every event published once, in order, with its message id; a
//! restart of the service (graceful or killed) or of NATS resumes without a
//! gap and without a duplicate.

use std::{path::PathBuf, process::Stdio, time::Duration};

use async_nats::jetstream::{self, consumer::pull};
use channel_assignment::{config::AuthSettings, proto::AssignmentEvent};
use futures_util::{StreamExt as _, TryStreamExt as _};
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
    published_at(NATS_URL, org, expected).await
}

/// As `published`, from the NATS server at `url`, reading in batches and
/// waiting up to 30 s for `expected` messages.
async fn published_at(url: &str, org: &str, expected: usize) -> Vec<(String, AssignmentEvent)> {
    let client = async_nats::connect(url).await.expect("NATS is up");
    let jetstream = jetstream::new(client);
    let mut received = Vec::new();
    for _ in 0..300 {
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
        loop {
            let before = received.len();
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
            if received.len() == before {
                break;
            }
            messages = consumer
                .fetch()
                .max_messages(1000)
                .expires(Duration::from_millis(300))
                .messages()
                .await
                .unwrap();
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
    futures_util::future::join_all((0..12).map(write)).await;

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
        metrics.contains("channel_assignment_events_relay_lag 0"),
        "{metrics}"
    );
    app.stop().await;
    wait_until_service_gone(&pool).await;
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

/// A nats-server process of the test's own (JetStream, file storage in a
/// directory of its own), to stop and start under a running relay.
struct OwnNats {
    port: u16,
    store: PathBuf,
    process: Option<tokio::process::Child>,
}

impl OwnNats {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = std::env::temp_dir().join(format!("relay-nats-{}", uuid::Uuid::new_v4()));
        let mut nats = Self {
            port,
            store,
            process: None,
        };
        nats.restart().await;
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|path| std::path::Path::new(path).exists())
            .unwrap_or("nats-server");
        let process = tokio::process::Command::new(binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server runs (machines of this kind have it)");
        self.process = Some(process);
        for _ in 0..100 {
            if async_nats::connect(self.url()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nats-server on port {} did not answer", self.port);
    }

    /// SIGKILL: no orderly shutdown, as a crashed or evicted NATS pod.
    async fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().await.unwrap();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// Every event of `org` in the table is in JetStream exactly once, in order,
/// under its message id.
async fn assert_published_exactly(pool: &PgPool, url: &str, org: &str) -> usize {
    let table = table_events(pool, org).await;
    let seen = published_at(url, org, table.len()).await;
    let sequences: Vec<i64> = seen.iter().map(|(_, event)| event.sequence).collect();
    assert_eq!(sequences, table, "{org}: every event once, in commit order");
    for (id, event) in &seen {
        assert_eq!(*id, format!("{org}:{}", event.sequence));
    }
    table.len()
}

#[sqlx::test]
async fn a_nats_restart_mid_relay_loses_nothing_and_duplicates_nothing(pool: PgPool) {
    let mut nats = OwnNats::start().await;
    let mut settings = test_settings(AuthSettings::hs256(SECRET));
    settings.events_nats_url = Some(nats.url());
    let app = std::sync::Arc::new(spawn_app_with_settings(&pool, settings).await);
    let organizations = [fresh_organization(), fresh_organization()];
    let handles: Vec<String> = (0..4).map(|i| format!("agent-{i}")).collect();
    let mut mailboxes = Vec::new();
    for org in &organizations {
        for handle in &handles {
            insert_identity(&pool, org, handle).await;
        }
        let mut own = Vec::new();
        for _ in 0..6 {
            own.push(insert_mailbox(&pool, org).await.to_string());
        }
        mailboxes.push(own);
    }
    let mut watchers = Vec::new();
    for org in &organizations {
        watchers.push(
            app.client
                .clone()
                .watch_assignment_events(authorized(
                    channel_assignment::proto::WatchAssignmentEventsRequest { after_sequence: 0 },
                    org,
                ))
                .await
                .unwrap()
                .into_inner(),
        );
    }

    // Eight writers on overlapping identities of both organizations, in
    // tasks of their own, while NATS is killed and started again.
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let app = std::sync::Arc::clone(&app);
            let writing = std::sync::Arc::clone(&writing);
            let org = organizations[writer % 2].clone();
            let mailboxes = mailboxes[writer % 2].clone();
            let handles = handles.clone();
            tokio::spawn(async move {
                let mut round = 0;
                while writing.load(std::sync::atomic::Ordering::Relaxed) {
                    let handle = &handles[(writer + round) % handles.len()];
                    let _ = if round % 4 == 3 {
                        app.unassign_mailbox(&org, handle).await.map(drop)
                    } else {
                        let mailbox = &mailboxes[(writer * 5 + round) % mailboxes.len()];
                        app.assign_mailbox(&org, handle, mailbox).await.map(drop)
                    };
                    round += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.kill().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.restart().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }

    for (org, watcher) in organizations.iter().zip(&mut watchers) {
        let published = assert_published_exactly(&pool, &nats.url(), org).await;
        assert!(
            published > 20,
            "{org}: only {published} events were written"
        );
        let table = table_events(&pool, org).await;
        let mut watched = Vec::new();
        while watched.len() < table.len() {
            let event = tokio::time::timeout(Duration::from_secs(5), watcher.message())
                .await
                .expect("the watcher keeps up")
                .unwrap()
                .unwrap();
            watched.push(event.sequence);
        }
        assert_eq!(
            watched, table,
            "{org}: the watcher saw every event once, in order"
        );
        println!("{org}: {published} events published across a NATS restart");
    }
}

#[sqlx::test]
async fn a_killed_service_resumes_relaying_without_gap_or_duplicate(pool: PgPool) {
    const CHANGES: usize = 3000;
    let nats = OwnNats::start().await;
    let org = fresh_organization();
    insert_identity(&pool, &org, "agent").await;
    let mailbox = insert_mailbox(&pool, &org).await;
    // A backlog of link changes made by SQL (the trigger records them as it
    // does the service's), for the relay to be caught in the middle of. The
    // organization and the id are the test's own, safe to inline.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DO $$ BEGIN FOR i IN 1..{CHANGES} LOOP
            UPDATE identities
            SET mailbox_id = CASE WHEN mailbox_id IS NULL THEN '{mailbox}'::uuid END
            WHERE organization_id = '{org}' AND agent_handle = 'agent';
         END LOOP; END $$"
    )))
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(table_events(&pool, &org).await.len(), CHANGES);

    let url = nats.url();
    let (mut first, _, _logs) = crate::binary::serve(&pool, &[("EVENTS_NATS_URL", &url)]).await;
    // SIGKILL once part of the backlog is in JetStream: no drain, no last
    // position saved.
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let jetstream = jetstream::new(client);
    let subject = format!("channels.v1.assignment_events.{org}");
    let mut at_kill = 0;
    for _ in 0..2000 {
        if let Ok(stream) = jetstream.get_stream("CHANNELS_ASSIGNMENT_EVENTS").await {
            at_kill = stream
                .info_with_subjects(&subject)
                .await
                .unwrap()
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
                .into_iter()
                .map(|(_, count)| count)
                .sum::<usize>();
            // Past two saved batches (of 100), inside a third.
            if at_kill >= 250 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill().await.unwrap();
    assert!(
        (250..CHANGES).contains(&at_kill),
        "killed mid-relay: {at_kill} of {CHANGES} published"
    );
    let positions: Vec<i64> = sqlx::query_scalar(
        "SELECT relayed_through FROM event_relay_positions WHERE organization_id = $1",
    )
    .bind(&org)
    .fetch_all(&pool)
    .await
    .unwrap();
    println!("killed with {at_kill} of {CHANGES} published, saved position {positions:?}");
    assert!(
        positions.first().is_some_and(|&saved| saved > 0),
        "a position was saved before the kill"
    );

    let (mut second, _, _logs) = crate::binary::serve(&pool, &[("EVENTS_NATS_URL", &url)]).await;
    assert_eq!(assert_published_exactly(&pool, &url, &org).await, CHANGES);
    // An orderly end, so that its connections are gone with the test.
    let pid = second.id().unwrap().to_string();
    tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    second.wait().await.unwrap();
    wait_until_service_gone(&pool).await;
}

/// The relay lag of a scrape, if reported.
fn relay_lag(metrics: &str) -> Option<i64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix("channel_assignment_events_relay_lag ")?
            .parse()
            .ok()
    })
}

#[sqlx::test]
async fn the_relay_lag_grows_while_nats_is_down_and_returns_to_zero(pool: PgPool) {
    let mut nats = OwnNats::start().await;
    let mut settings = test_settings(AuthSettings::hs256(SECRET));
    settings.events_nats_url = Some(nats.url());
    let app = spawn_app_with_settings(&pool, settings).await;
    let org = fresh_organization();
    insert_identity(&pool, &org, "agent").await;
    let mailbox = insert_mailbox(&pool, &org).await.to_string();
    nats.kill().await;

    app.assign_mailbox(&org, "agent", &mailbox).await.unwrap();
    app.unassign_mailbox(&org, "agent").await.unwrap();
    // Long enough for the relay's publish to time out (5 s) and for it to
    // fail to reconnect: events committed from now on are seen only by a
    // relay that still reads the backlog while NATS is away.
    tokio::time::sleep(Duration::from_secs(8)).await;
    for _ in 0..2 {
        app.assign_mailbox(&org, "agent", &mailbox).await.unwrap();
        app.unassign_mailbox(&org, "agent").await.unwrap();
    }
    // What an alert on the lag sees during the outage: the six events.
    let mut lag = None;
    for _ in 0..100 {
        lag = relay_lag(&crate::metrics::scrape(app.metrics_addr).await);
        if lag == Some(6) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(lag, Some(6), "the lag while NATS is down");

    nats.restart().await;
    assert_eq!(assert_published_exactly(&pool, &nats.url(), &org).await, 6);
    for _ in 0..100 {
        lag = relay_lag(&crate::metrics::scrape(app.metrics_addr).await);
        if lag == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(lag, Some(0), "the lag once NATS is back");
    app.stop().await;
    wait_until_service_gone(&pool).await;
}
