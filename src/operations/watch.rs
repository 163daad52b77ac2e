//! Watching an organization's change events: the stored ones after the
//! caller's position, then each new one as it commits.

use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};

use super::{Call, Operations};
use crate::error::{FieldViolation, ServiceError};
use crate::events::hub::{Wake, Watching};
use crate::store::EventRecord;

/// Events read per round trip while catching up.
const BATCH: usize = 100;
/// A watcher re-reads this often even without a wake-up: the safety net
/// under notifications (which a restarting listener can lose), not the way
/// events normally arrive (within milliseconds of their commit).
const FALLBACK_POLL: Duration = Duration::from_secs(30);

pub type EventSink = mpsc::Sender<Result<EventRecord, ServiceError>>;

impl Operations {
    /// Checks the request and reads the first batch (so that an invalid or
    /// expired position is the call's answer, not a broken stream), then
    /// sends everything after `after_sequence` to `sink`, and each new event
    /// as it commits, until the client goes away or the server drains; a
    /// drain ends the stream with UNAVAILABLE, after which the client
    /// resumes elsewhere from its last sequence.
    pub async fn watch_events(
        &self,
        call: &Call,
        after_sequence: i64,
        sink: EventSink,
    ) -> Result<(), ServiceError> {
        if after_sequence < 0 {
            return Err(ServiceError::InvalidArgument(vec![FieldViolation {
                field: "after_sequence",
                description: "after_sequence must not be negative".to_owned(),
            }]));
        }
        // Subscribed before the first read: a commit between the two still
        // wakes this watcher.
        let (wakes, watching) = self.events.watch(call.organization.as_str());
        let first = self
            .store
            .list_events(&call.organization, after_sequence, BATCH)
            .await?;
        let watcher = Watcher {
            operations: self.clone(),
            organization: call.organization.clone(),
            after: after_sequence,
            sink,
            wakes,
            stopping: self.stopping.clone(),
            _watching: watching,
        };
        tokio::spawn(watcher.run(first));
        Ok(())
    }
}

struct Watcher {
    operations: Operations,
    organization: crate::domain::OrganizationId,
    after: i64,
    sink: EventSink,
    wakes: broadcast::Receiver<Wake>,
    stopping: watch::Receiver<bool>,
    // Declared after `wakes`, so dropped after it: the guard forgets the
    // organization's channel once no receiver is left.
    _watching: Watching,
}

impl Watcher {
    async fn run(mut self, first: Vec<EventRecord>) {
        let mut batch = first;
        loop {
            // Catch up, a batch at a time.
            while !batch.is_empty() {
                let full = batch.len() == BATCH;
                for event in batch {
                    self.after = event.sequence;
                    if self.sink.send(Ok(event)).await.is_err() {
                        return; // the client went away
                    }
                }
                if !full {
                    break;
                }
                batch = match self.read().await {
                    Some(batch) => batch,
                    None => return,
                };
            }
            // Then wait for this organization's next commit.
            if !self.wait().await {
                let _ = self.sink.send(Err(ServiceError::Draining)).await;
                return;
            }
            batch = match self.read().await {
                Some(batch) => batch,
                None => return,
            };
        }
    }

    /// The next batch, or `None` once the stream has ended with an error.
    async fn read(&mut self) -> Option<Vec<EventRecord>> {
        match self
            .operations
            .store
            .list_events(&self.organization, self.after, BATCH)
            .await
        {
            Ok(batch) => Some(batch),
            Err(error) => {
                let _ = self.sink.send(Err(error)).await;
                None
            }
        }
    }

    /// Waits until there may be new events (`true`), or the server drains
    /// (`false`). A client that left is noticed at the next send.
    async fn wait(&mut self) -> bool {
        let fallback = tokio::time::sleep(FALLBACK_POLL);
        tokio::pin!(fallback);
        loop {
            tokio::select! {
                changed = self.stopping.wait_for(|stopping| *stopping) => {
                    let _ = changed;
                    return false;
                }
                wake = self.wakes.recv() => match wake {
                    Ok(wake) if wake.concerns(self.organization.as_str()) => return true,
                    Ok(_) => {}
                    // Fell behind: anything may have happened.
                    Err(broadcast::error::RecvError::Lagged(_)) => return true,
                    Err(broadcast::error::RecvError::Closed) => return true,
                },
                () = &mut fallback => return true,
                () = self.sink.closed() => return false,
            }
        }
    }
}
