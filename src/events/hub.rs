//! Wake-ups for watchers and the relay: a write of this process wakes them
//! at once, and other replicas' writes arrive as notifications on one
//! `LISTEN` connection for the whole process, fanned out to watchers.
//!
//! A wake-up is not the data: it names an organization, and a woken watcher
//! re-reads its events by sequence. The notifications are sent here, not by
//! the writing transaction: a transaction that notifies holds a
//! database-wide lock from its commit until its commit record is flushed, so
//! notifying from the link trigger made every write commit alone and cost
//! 40-72 % of the write throughput (BENCHMARKS.md, "Change events"). One task
//! sends the organizations this process wrote, a batch per transaction (at
//! most one every `ANNOUNCE_INTERVAL`), with `synchronous_commit` off, on a
//! connection of its own. Notifications sent while the listening connection
//! was down are lost, so after every reconnection every watcher is woken to
//! re-read; a batch that cannot be sent leaves other replicas' watchers to
//! their fallback read.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use sqlx::{
    Connection as _, PgConnection,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};
use tokio::sync::{Notify, broadcast};

/// The channel replicas notify each other's watchers on.
pub const CHANNEL: &str = "channels_assignment_events";

/// How many wake-ups may wait for the relay before it is told to re-read
/// everything instead.
const BACKLOG: usize = 1024;
/// The same for one organization's watchers: any wake-up means "re-read",
/// so a few are as good as many.
const ORGANIZATION_BACKLOG: usize = 8;
/// Wait between attempts while the listening connection cannot be opened.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// The least time between two batches of announcements. Without it the
/// sender started a batch as soon as the last one ended: about one
/// transaction per write, 3,500 a second under bench/run's write rows, each
/// also waking every replica's listener. With it at most 100 a second, and
/// another replica's watchers wake at most this much later.
const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(10);

/// What a watcher is woken for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wake {
    /// This organization has new events.
    Organization(String),
    /// Anything may have happened (the listener reconnected, or this
    /// watcher fell behind): every watcher re-reads.
    Everyone,
}

impl Wake {
    pub fn concerns(&self, organization: &str) -> bool {
        match self {
            Self::Organization(woken) => woken == organization,
            Self::Everyone => true,
        }
    }
}

#[derive(Clone)]
pub struct EventHub {
    wakes: Arc<Wakes>,
    watchers: Arc<AtomicUsize>,
    announcements: Arc<Announcements>,
}

/// Where wake-ups go: every one to the relay (`all`), and each
/// organization's only to that organization's watchers, so that a commit
/// wakes its own watchers, not every watcher of the process.
struct Wakes {
    all: broadcast::Sender<Wake>,
    by_organization: Mutex<HashMap<String, broadcast::Sender<Wake>>>,
}

impl Wakes {
    fn send(&self, wake: Wake) {
        let watched = self
            .by_organization
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &wake {
            Wake::Organization(organization) => {
                if let Some(watchers) = watched.get(organization) {
                    let _ = watchers.send(wake.clone());
                }
            }
            Wake::Everyone => {
                for watchers in watched.values() {
                    let _ = watchers.send(Wake::Everyone);
                }
            }
        }
        drop(watched);
        let _ = self.all.send(wake);
    }
}

/// Organizations written by this process, not yet announced to the others.
#[derive(Default)]
struct Announcements {
    pending: Mutex<BTreeSet<String>>,
    ready: Notify,
    /// The backend that sends them: the listener skips its notifications,
    /// whose watchers here were woken already.
    sender_pid: AtomicU32,
}

/// Counts a watcher for as long as it lives, and forgets its
/// organization's channel when its last watcher is gone (after the
/// watcher's receiver was dropped).
pub struct Watching {
    watchers: Arc<AtomicUsize>,
    wakes: Arc<Wakes>,
    organization: String,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.watchers.fetch_sub(1, Ordering::Relaxed);
        let mut watched = self
            .wakes
            .by_organization
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if watched
            .get(&self.organization)
            .is_some_and(|watchers| watchers.receiver_count() == 0)
        {
            watched.remove(&self.organization);
        }
    }
}

impl EventHub {
    /// Starts listening on a connection of its own (not one of the pool's);
    /// the task ends with the returned handle.
    pub fn start(options: PgConnectOptions) -> (Self, tokio::task::JoinHandle<()>) {
        let wakes = Arc::new(Wakes {
            all: broadcast::channel(BACKLOG).0,
            by_organization: Mutex::default(),
        });
        let announcements = Arc::new(Announcements::default());
        let listening = listen(
            options.clone(),
            Arc::clone(&wakes),
            Arc::clone(&announcements),
        );
        let announcing = announce(options, Arc::clone(&announcements));
        let task = tokio::spawn(async move {
            tokio::join!(listening, announcing);
        });
        (
            Self {
                wakes,
                watchers: Arc::default(),
                announcements,
            },
            task,
        )
    }

    /// A write of `organization` by this process ended (however it ended:
    /// it may have recorded events). Its watchers here wake now; the other
    /// replicas' are notified with the next batch.
    pub fn written(&self, organization: &str) {
        self.wakes.send(Wake::Organization(organization.to_owned()));
        let mut pending = self
            .announcements
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !pending.contains(organization) {
            pending.insert(organization.to_owned());
        }
        drop(pending);
        self.announcements.ready.notify_one();
    }

    /// Every wake-up (the relay's).
    pub fn subscribe(&self) -> broadcast::Receiver<Wake> {
        self.wakes.all.subscribe()
    }

    /// Wake-ups for a watcher of `organization`, and the guard that counts
    /// it while it lives. The guard must outlive the receiver.
    pub fn watch(&self, organization: &str) -> (broadcast::Receiver<Wake>, Watching) {
        self.watchers.fetch_add(1, Ordering::Relaxed);
        let receiver = self
            .wakes
            .by_organization
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(organization.to_owned())
            .or_insert_with(|| broadcast::channel(ORGANIZATION_BACKLOG).0)
            .subscribe();
        let watching = Watching {
            watchers: Arc::clone(&self.watchers),
            wakes: Arc::clone(&self.wakes),
            organization: organization.to_owned(),
        };
        (receiver, watching)
    }

    /// Watchers connected now, for the metrics.
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }
}

async fn listen(options: PgConnectOptions, wakes: Arc<Wakes>, announcements: Arc<Announcements>) {
    // sqlx's listener wants a pool; this one holds the single connection.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "cannot open the events listener; retrying");
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(CHANNEL).await {
            tracing::warn!(%error, "cannot listen for events; retrying");
            tokio::time::sleep(RECONNECT_PAUSE).await;
            continue;
        }
        // Whatever was notified before this point is not known: re-read.
        wakes.send(Wake::Everyone);
        loop {
            match listener.try_recv().await {
                Ok(Some(notification))
                    if notification.process_id()
                        == announcements.sender_pid.load(Ordering::Relaxed) => {}
                Ok(Some(notification)) => {
                    wakes.send(Wake::Organization(notification.payload().to_owned()));
                }
                // The connection was lost; the next call reconnects and
                // listens again, but what was sent meanwhile is gone.
                Ok(None) => {
                    tracing::info!("events listener reconnecting");
                    wakes.send(Wake::Everyone);
                }
                Err(error) => {
                    tracing::warn!(%error, "events listener failed; reopening it");
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    break;
                }
            }
        }
    }
}

/// Sends the organizations this process wrote to the other replicas, a
/// batch per transaction and at most one per `ANNOUNCE_INTERVAL`: what was
/// written while a batch was being sent, or since, goes with the next.
async fn announce(options: PgConnectOptions, announcements: Arc<Announcements>) {
    let mut connection: Option<PgConnection> = None;
    let mut batches = tokio::time::interval(ANNOUNCE_INTERVAL);
    batches.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        announcements.ready.notified().await;
        batches.tick().await;
        let organizations: Vec<String> = std::mem::take(
            &mut *announcements
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
        .into_iter()
        .collect();
        if organizations.is_empty() {
            continue;
        }
        if let Err(error) = send(&mut connection, &options, &announcements, &organizations).await {
            // Other replicas' watchers of these organizations read at their
            // fallback instead; this process's were woken already.
            tracing::warn!(%error, organizations = organizations.len(), "cannot notify other replicas of new events");
            connection = None;
            tokio::time::sleep(RECONNECT_PAUSE).await;
        }
    }
}

async fn send(
    connection: &mut Option<PgConnection>,
    options: &PgConnectOptions,
    announcements: &Announcements,
    organizations: &[String],
) -> Result<(), sqlx::Error> {
    let connection = match connection {
        Some(connection) => connection,
        None => {
            let mut opened = PgConnection::connect_with(options).await?;
            // The commit need not wait for its flush: a notification lost
            // in a crash costs a fallback read, never an event.
            sqlx::query("SET synchronous_commit = off")
                .execute(&mut opened)
                .await?;
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut opened)
                .await?;
            // Backend pids are positive.
            announcements
                .sender_pid
                .store(u32::try_from(pid).unwrap_or_default(), Ordering::Relaxed);
            connection.insert(opened)
        }
    };
    sqlx::query("SELECT pg_notify($1, organization) FROM unnest($2::text[]) AS organization")
        .bind(CHANNEL)
        .bind(organizations)
        .execute(connection)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> EventHub {
        EventHub {
            wakes: Arc::new(Wakes {
                all: broadcast::channel(BACKLOG).0,
                by_organization: Mutex::default(),
            }),
            watchers: Arc::default(),
            announcements: Arc::default(),
        }
    }

    fn watched(hub: &EventHub) -> Vec<String> {
        let mut organizations: Vec<String> = hub
            .wakes
            .by_organization
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        organizations.sort();
        organizations
    }

    #[tokio::test]
    async fn a_write_wakes_its_organizations_watchers_and_the_relay_only() {
        let hub = hub();
        let mut relay = hub.subscribe();
        let (mut alpha, _alpha_guard) = hub.watch("org_alpha");
        let (mut beta, _beta_guard) = hub.watch("org_beta");

        hub.written("org_alpha");
        assert_eq!(
            alpha.try_recv().unwrap(),
            Wake::Organization("org_alpha".into())
        );
        assert!(
            beta.try_recv().is_err(),
            "another organization's watcher sleeps on"
        );
        assert_eq!(
            relay.try_recv().unwrap(),
            Wake::Organization("org_alpha".into())
        );

        hub.wakes.send(Wake::Everyone);
        assert_eq!(alpha.try_recv().unwrap(), Wake::Everyone);
        assert_eq!(beta.try_recv().unwrap(), Wake::Everyone);
        assert_eq!(hub.watchers(), 2);
    }

    #[tokio::test]
    async fn an_organizations_channel_goes_with_its_last_watcher() {
        let hub = hub();
        let first = hub.watch("org_alpha");
        let second = hub.watch("org_alpha");
        drop(first);
        assert_eq!(watched(&hub), ["org_alpha"]);
        // As a watcher drops them: the receiver, then the guard.
        let (receiver, guard) = second;
        drop(receiver);
        drop(guard);
        assert!(watched(&hub).is_empty());
        assert_eq!(hub.watchers(), 0);
    }
}
