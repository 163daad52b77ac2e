//! Steady load for fault tests. Each worker owns one identity and a few
//! mailboxes, so what the database holds at the end can be checked against
//! the answers the worker received.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use channel_assignment::proto::{
    AssignMailboxRequest, UnassignMailboxRequest,
    channel_assignment_client::ChannelAssignmentClient,
};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tonic::{Code, transport::Channel};
use uuid::Uuid;

use crate::helpers::*;

const MAILBOXES_PER_WORKER: usize = 3;

/// What one request asked for: the mailbox to link, or none (unassign).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted(pub Option<Uuid>);

#[derive(Clone, Debug)]
pub struct Outcome {
    pub wanted: Wanted,
    pub code: Code,
    pub latency: Duration,
    pub finished: Instant,
}

pub struct Worker {
    pub handle: String,
    pub mailboxes: Vec<Uuid>,
    pub outcomes: Vec<Outcome>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Worker>>,
}

/// Seeds `workers` identities with their mailboxes in ORG.
pub async fn seed_workers(pool: &PgPool, workers: usize) -> Vec<Worker> {
    let mut seeded = Vec::new();
    for index in 0..workers {
        let handle = format!("worker-{index}");
        insert_identity(pool, ORG, &handle).await;
        let mut mailboxes = Vec::new();
        for _ in 0..MAILBOXES_PER_WORKER {
            mailboxes.push(insert_mailbox(pool, ORG).await);
        }
        seeded.push(Worker {
            handle,
            mailboxes,
            outcomes: Vec::new(),
        });
    }
    seeded
}

impl Load {
    /// Each worker sends one request after another, over its own connection,
    /// each with a client deadline, until stopped.
    pub fn start(workers: Vec<Worker>, endpoint: String, deadline: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = workers
            .into_iter()
            .map(|mut worker| {
                let stop = Arc::clone(&stop);
                let endpoint = endpoint.clone();
                tokio::spawn(async move {
                    let channel = Channel::from_shared(endpoint).unwrap().connect_lazy();
                    let mut client = ChannelAssignmentClient::new(channel);
                    while !stop.load(Ordering::Relaxed) {
                        let dice = Uuid::new_v4().as_u128();
                        let wanted = match (dice % 4) as usize {
                            3 => Wanted(None),
                            pick => Wanted(Some(worker.mailboxes[pick % worker.mailboxes.len()])),
                        };
                        let started = Instant::now();
                        let code = match wanted.0 {
                            Some(mailbox) => {
                                let mut request = authorized(
                                    AssignMailboxRequest {
                                        agent_handle: worker.handle.clone(),
                                        mailbox_id: mailbox.to_string(),
                                    },
                                    ORG,
                                );
                                request.set_timeout(deadline);
                                client.assign_mailbox(request).await.map(drop)
                            }
                            None => {
                                let mut request = authorized(
                                    UnassignMailboxRequest {
                                        agent_handle: worker.handle.clone(),
                                    },
                                    ORG,
                                );
                                request.set_timeout(deadline);
                                client.unassign_mailbox(request).await.map(drop)
                            }
                        }
                        .map_or_else(|status| client_code(&status), |()| Code::Ok);
                        worker.outcomes.push(Outcome {
                            wanted,
                            code,
                            latency: started.elapsed(),
                            finished: Instant::now(),
                        });
                        if code != Code::Ok {
                            // Failing fast must not turn into a busy loop.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    worker
                })
            })
            .collect();
        Self { stop, tasks }
    }

    pub async fn stop(self) -> Vec<Worker> {
        self.stop.store(true, Ordering::Relaxed);
        let mut workers = Vec::new();
        for task in self.tasks {
            workers.push(task.await.expect("a worker does not panic"));
        }
        workers
    }
}

/// What the database must hold for each worker, given its answers.
#[derive(Debug, Default)]
pub struct Verdict {
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    /// Errors after the last OK whose change is what the database holds: a
    /// connection lost after the commit and before the answer. Only
    /// UNAVAILABLE may be one (the statement's fate is unknown to the
    /// server too); anything else is a broken promise.
    pub applied_despite_unavailable: usize,
}

/// Checks every worker: the database holds the effect of its last OK
/// request, or (only after UNAVAILABLE) of a later one whose connection was
/// lost after the commit. No other error may have changed anything.
pub async fn verify(pool: &PgPool, workers: &[Worker]) -> Verdict {
    let mut verdict = Verdict::default();
    for worker in workers {
        verdict.requests += worker.outcomes.len();
        verdict.ok += worker
            .outcomes
            .iter()
            .filter(|o| o.code == Code::Ok)
            .count();
        let held: Option<Uuid> = sqlx::query_scalar(
            "SELECT mailbox_id FROM identities WHERE organization_id = $1 AND agent_handle = $2",
        )
        .bind(ORG)
        .bind(&worker.handle)
        .fetch_one(pool)
        .await
        .unwrap();
        let last_ok = worker.outcomes.iter().rposition(|o| o.code == Code::Ok);
        let expected = last_ok.map_or(Wanted(None), |index| worker.outcomes[index].wanted);
        if Wanted(held) == expected {
            continue;
        }
        let after_last_ok = &worker.outcomes[last_ok.map_or(0, |index| index + 1)..];
        let explained = after_last_ok
            .iter()
            .any(|o| o.code == Code::Unavailable && o.wanted == Wanted(held));
        assert!(
            explained,
            "{}: holds {held:?}, but its last OK request asked for {expected:?} and no later \\
             UNAVAILABLE one asked for what it holds: {:?}",
            worker.handle,
            after_last_ok
                .iter()
                .map(|o| (o.wanted, o.code))
                .collect::<Vec<_>>()
        );
        verdict.applied_despite_unavailable += 1;
    }
    verdict.errors = verdict.requests - verdict.ok;
    verdict
}

/// Codes seen, with counts, for the test's printed figures.
pub fn code_counts(workers: &[Worker]) -> Vec<(Code, usize)> {
    let mut counts: Vec<(Code, usize)> = Vec::new();
    for outcome in workers.iter().flat_map(|w| &w.outcomes) {
        match counts.iter_mut().find(|(code, _)| *code == outcome.code) {
            Some((_, count)) => *count += 1,
            None => counts.push((outcome.code, 1)),
        }
    }
    counts
}

/// The codes seen, with counts, after checking that every answer was OK or
/// UNAVAILABLE: the only ones a fault may cause.
pub fn ok_or_unavailable_only(workers: &[Worker]) -> Vec<(Code, usize)> {
    let codes = code_counts(workers);
    for (code, _) in &codes {
        assert!(
            matches!(code, Code::Ok | Code::Unavailable),
            "unexpected {code:?} in {codes:?}"
        );
    }
    codes
}

/// Every worker got an OK answer for a request finished after `since`.
pub fn assert_all_served_after(workers: &[Worker], since: Instant, what: &str) {
    for worker in workers {
        assert!(
            worker
                .outcomes
                .iter()
                .any(|o| o.code == Code::Ok && o.finished > since),
            "{}: not served again after {what}",
            worker.handle
        );
    }
}

/// The code a request failed with, as a gRPC client should see it.
///
/// A stream the server refused during its graceful shutdown (opened after
/// the GOAWAY's last stream id, so never processed) reaches tonic's client
/// as a hyper error, which it reports as INTERNAL; gRPC implementations
/// report it as UNAVAILABLE (grpc/grpc-java#1355), and so does this.
fn client_code(status: &tonic::Status) -> Code {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = cause {
        if let Some(h2) = error.downcast_ref::<h2::Error>()
            && h2.is_go_away()
            && h2.reason() == Some(h2::Reason::NO_ERROR)
        {
            return Code::Unavailable;
        }
        cause = error.source();
    }
    status.code()
}
