//! One `LISTEN` connection for the whole process, fanned out to watchers.
//!
//! A notification is a wake-up, not the data: the triggers notify the
//! organization's id at commit, and a woken watcher re-reads its events by
//! sequence. Notifications sent while the listening connection was down are
//! lost, so after every reconnection every watcher is woken to re-read.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::broadcast;

/// The channel the `assignment_events` trigger notifies.
pub const CHANNEL: &str = "channels_assignment_events";

/// How many wake-ups may wait for a slow watcher before it is told to
/// re-read everything instead.
const BACKLOG: usize = 1024;
/// Wait between attempts while the listening connection cannot be opened.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

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
    wakes: broadcast::Sender<Wake>,
    watchers: Arc<AtomicUsize>,
}

/// Counts a watcher for as long as it lives.
pub struct Watching(Arc<AtomicUsize>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EventHub {
    /// Starts listening on a connection of its own (not one of the pool's);
    /// the task ends with the returned handle.
    pub fn start(options: PgConnectOptions) -> (Self, tokio::task::JoinHandle<()>) {
        let (wakes, _) = broadcast::channel(BACKLOG);
        let task = tokio::spawn(listen(options, wakes.clone()));
        (
            Self {
                wakes,
                watchers: Arc::default(),
            },
            task,
        )
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Wake> {
        self.wakes.subscribe()
    }

    /// Wake-ups for a watcher, and the guard that counts it while it lives.
    pub fn watch(&self) -> (broadcast::Receiver<Wake>, Watching) {
        self.watchers.fetch_add(1, Ordering::Relaxed);
        (self.subscribe(), Watching(Arc::clone(&self.watchers)))
    }

    /// Watchers connected now, for the metrics.
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }
}

async fn listen(options: PgConnectOptions, wakes: broadcast::Sender<Wake>) {
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
        let _ = wakes.send(Wake::Everyone);
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => {
                    let _ = wakes.send(Wake::Organization(notification.payload().to_owned()));
                }
                // The connection was lost; the next call reconnects and
                // listens again, but what was sent meanwhile is gone.
                Ok(None) => {
                    tracing::info!("events listener reconnecting");
                    let _ = wakes.send(Wake::Everyone);
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
