//! A JetStream consumer of the change events, as a downstream system (a mail
//! router's cache, say) would write one: a durable consumer per organization
//! that acknowledges each event once applied, so that a restart resumes
//! where it stopped.
//!
//! ```sh
//! cargo run --example consume_events -- org_demo [nats://127.0.0.1:4222]
//! ```

use async_nats::jetstream::{self, consumer::pull};
use channel_assignment::proto::AssignmentEvent;
use futures_util::StreamExt as _;
use prost::Message as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let organization = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: consume_events <organization_id> [nats_url]"))?;
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());

    let jetstream = jetstream::new(async_nats::connect(url.as_str()).await?);
    let stream = jetstream.get_stream("CHANNELS_ASSIGNMENT_EVENTS").await?;
    // Durable: JetStream remembers what this consumer acknowledged.
    let consumer = stream
        .get_or_create_consumer(
            &format!("example-{organization}"),
            pull::Config {
                durable_name: Some(format!("example-{organization}")),
                filter_subject: format!("channels.v1.assignment_events.{organization}"),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    println!("consuming the change events of {organization} from {url} (Ctrl-C stops)");
    let mut messages = consumer.messages().await?;
    let mut last_sequence = 0;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|error| anyhow::anyhow!(error))?;
        let event = AssignmentEvent::decode(message.payload.clone())?;
        // Per organization, sequences only grow: anything at or below the
        // last one applied is a redelivery.
        if event.sequence > last_sequence {
            println!(
                "#{} {} {:?} {:?} channel={:?} previous={:?} cause={:?} actor={:?}",
                event.sequence,
                event.agent_handle,
                event.kind(),
                event.action(),
                event.channel_id,
                event.previous_channel_id,
                event.cause(),
                event.actor,
            );
            last_sequence = event.sequence;
        }
        message
            .ack()
            .await
            .map_err(|error| anyhow::anyhow!(error))?;
    }
    Ok(())
}
