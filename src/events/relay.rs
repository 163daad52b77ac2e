//! Publishes change events to NATS JetStream (`EVENTS_NATS_URL`): subject
//! `channels.v1.assignment_events.<organization_id>`, the protobuf
//! `AssignmentEvent` as payload, `Nats-Msg-Id: <organization_id>:<sequence>`.
//!
//! At least once and in order per organization: each organization's events
//! are published one after another, each acknowledged by JetStream before
//! the next, and the position is saved (in PostgreSQL) after the batch. A
//! crash between a publish and the save publishes those events again, with
//! the same message ids, which JetStream drops as duplicates. Only one
//! replica relays at a time: the one holding a PostgreSQL advisory lock on a
//! connection of its own (released when that connection goes), so that
//! scaling out neither multiplies nor reorders messages.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream;
use prost::Message as _;
use sqlx::{Connection as _, PgConnection, postgres::PgConnectOptions};
use tokio::sync::{broadcast, watch};

use crate::domain::OrganizationId;
use crate::error::ServiceError;
use crate::events::hub::{EventHub, Wake};
use crate::metrics::Metrics;
use crate::proto;
use crate::store::Store;

/// The stream, created when missing.
pub const STREAM: &str = "CHANNELS_ASSIGNMENT_EVENTS";
pub const SUBJECT_PREFIX: &str = "channels.v1.assignment_events";
/// `pg_try_advisory_lock` key of the relay: "chan" "rely" in ASCII.
const LOCK_KEY: i64 = 0x6368_616e_7265_6c79;
/// Events published per organization before the position is saved.
const BATCH: usize = 100;
/// Rounds without a wake-up, and pauses after a failure.
const IDLE_POLL: Duration = Duration::from_secs(1);
const RETRY_PAUSE: Duration = Duration::from_secs(2);

pub struct Relay {
    pub store: Store,
    pub options: PgConnectOptions,
    pub nats_url: String,
    pub events: EventHub,
    pub stopping: watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
}

impl Relay {
    /// Relays until the server drains (after the batch in progress).
    pub async fn run(mut self) {
        while !*self.stopping.borrow() {
            if let Err(error) = self.relay_while_leader().await {
                tracing::warn!(error = %error, "event relay paused; retrying");
                // NATS (or the database) is down: the lag still grows, and
                // an alert on it must see that, not the last figure.
                if let Ok(backlog) = self.store.relay_backlog().await {
                    self.metrics.relay_lag(lag_of(&backlog));
                }
                self.pause(RETRY_PAUSE).await;
            }
        }
        tracing::info!("event relay stopped");
    }

    async fn relay_while_leader(&mut self) -> anyhow::Result<()> {
        let mut lock = PgConnection::connect_with(&self.options).await?;
        let leader: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK_KEY)
            .fetch_one(&mut lock)
            .await?;
        if !leader {
            // Another replica relays (and reports the lag); look again later.
            self.metrics.relay_lag(0);
            self.pause(RETRY_PAUSE * 5).await;
            return Ok(());
        }
        tracing::info!("relaying change events to NATS JetStream");
        let client = async_nats::connect(self.nats_url.as_str()).await?;
        let jetstream = jetstream::new(client);
        jetstream
            .get_or_create_stream(jetstream::stream::Config {
                name: STREAM.to_owned(),
                subjects: vec![format!("{SUBJECT_PREFIX}.>")],
                ..Default::default()
            })
            .await
            .map_err(|error| anyhow::anyhow!("cannot create the JetStream stream: {error}"))?;
        let mut wakes = self.events.subscribe();
        while !*self.stopping.borrow() {
            self.relay_backlog(&jetstream).await?;
            // Still the leader: the lock's connection is alive.
            lock.ping().await?;
            self.wait(&mut wakes).await;
        }
        Ok(())
    }

    async fn relay_backlog(&self, jetstream: &jetstream::Context) -> anyhow::Result<()> {
        let backlog = self.store.relay_backlog().await?;
        let mut lag = lag_of(&backlog);
        self.metrics.relay_lag(lag);
        for behind in backlog {
            let Some(organization) = OrganizationId::parse(&behind.organization_id) else {
                continue;
            };
            let mut after = behind.relayed_through;
            if after < behind.removed_through {
                tracing::warn!(
                    organization = %organization,
                    from = after,
                    to = behind.removed_through,
                    "events were removed by retention before they were relayed"
                );
                after = behind.removed_through;
            }
            loop {
                let events = match self.store.list_events(&organization, after, BATCH).await {
                    Ok(events) => events,
                    // Retention moved on meanwhile: start at its mark.
                    Err(ServiceError::EventsExpired) => break,
                    Err(error) => return Err(error.into()),
                };
                let Some(last) = events.last().map(|event| event.sequence) else {
                    break;
                };
                let full = events.len() == BATCH;
                let published = i64::try_from(events.len()).unwrap_or(i64::MAX);
                for event in events {
                    publish(jetstream, event).await?;
                }
                self.store
                    .save_relay_position(organization.as_str(), last)
                    .await?;
                // Events committed since the backlog was read are counted
                // at the next round.
                lag = lag.saturating_sub(published).max(0);
                self.metrics.relay_lag(lag);
                after = last;
                if !full || *self.stopping.borrow() {
                    break;
                }
            }
        }
        Ok(())
    }

    async fn wait(&mut self, wakes: &mut broadcast::Receiver<Wake>) {
        tokio::select! {
            _ = wakes.recv() => {}
            () = tokio::time::sleep(IDLE_POLL) => {}
            _ = self.stopping.wait_for(|stopping| *stopping) => {}
        }
    }

    async fn pause(&mut self, pause: Duration) {
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = self.stopping.wait_for(|stopping| *stopping) => {}
        }
    }
}

/// Events committed and not yet published, over every organization.
fn lag_of(backlog: &[crate::store::RelayBacklog]) -> i64 {
    backlog.iter().map(|behind| behind.unrelayed).sum()
}

/// Publishes one event and waits for JetStream to store it.
async fn publish(
    jetstream: &jetstream::Context,
    event: crate::store::EventRecord,
) -> anyhow::Result<()> {
    let subject = format!("{SUBJECT_PREFIX}.{}", event.organization_id);
    let message_id = format!("{}:{}", event.organization_id, event.sequence);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", message_id.as_str());
    let payload = proto::AssignmentEvent::from(event).encode_to_vec();
    jetstream
        .publish_with_headers(subject, headers, payload.into())
        .await
        .map_err(|error| anyhow::anyhow!("cannot publish {message_id}: {error}"))?
        .await
        .map_err(|error| anyhow::anyhow!("{message_id} not acknowledged: {error}"))?;
    Ok(())
}
