//! Accepting connections, with the bounds hyper and tonic do not set: at most
//! `max_connections` open at once, and each must start HTTP/2 (the client
//! preface and its first frame header) within the handshake timeout, or it
//! is closed. Without these, silent or half-open connections are held
//! forever and run the process out of file descriptors and memory.
//!
//! At the cap, a new connection takes the place of the oldest one that has
//! still not started HTTP/2 (which is closed), so that a flood of silent
//! connections cannot keep real clients out; only when every open
//! connection has started is the new one closed at once (with a rate-limited
//! log line).

use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, Weak, atomic::AtomicUsize},
    task::{Context, Poll, Waker},
    time::Duration,
};

use futures_core::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::transport::server::Connected;

use crate::metrics::Metrics;

/// The HTTP/2 client preface (24 bytes) and the header of the SETTINGS frame
/// that must follow it (9 bytes): a client that sent these has started.
const HANDSHAKE_BYTES: usize = 24 + 9;

/// How long accepting pauses after the process ran out of file descriptors
/// (or another resource): retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// At most one log line per this interval for each kind of refusal, with a
/// count of what it did not log.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

/// What a request knows of its connection (a request extension).
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub remote_addr: Option<SocketAddr>,
    /// Health `Watch` streams open on this connection.
    pub watch_streams: Arc<AtomicUsize>,
}

/// The listener as a stream of admitted connections, for
/// `serve_with_incoming_shutdown`. Dropping it closes the listening socket.
pub struct Incoming {
    listener: TcpListener,
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    paused: Option<Pin<Box<Sleep>>>,
    /// Connections that had not started HTTP/2 when last looked at, oldest
    /// first: the ones a new connection may take the place of.
    handshaking: VecDeque<Weak<Handshake>>,
    refused_log: RateLimitedLog,
    accept_error_log: RateLimitedLog,
}

impl Incoming {
    pub fn new(listener: TcpListener, limits: ConnectionLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            metrics,
            paused: None,
            handshaking: VecDeque::new(),
            refused_log: RateLimitedLog::default(),
            accept_error_log: RateLimitedLog::default(),
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(pause) = &mut this.paused {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.paused = None;
            }
            let (stream, remote_addr) = match this.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(accepted)) => accepted,
                Poll::Ready(Err(error)) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the pending connection
                    // stays in the backlog; try again shortly.
                    if let Some(suppressed) = this.accept_error_log.should_log() {
                        tracing::warn!(%error, suppressed, "cannot accept connections");
                    }
                    this.paused = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
                    continue;
                }
            };
            let slot = Arc::clone(&this.slots)
                .try_acquire_owned()
                .ok()
                .or_else(|| this.evict_oldest_handshaking());
            let Some(slot) = slot else {
                drop(stream);
                this.metrics.connection_refused("limit");
                if let Some(suppressed) = this.refused_log.should_log() {
                    tracing::warn!(
                        limit = this.limits.max_connections,
                        suppressed,
                        "connection limit reached: closing new connections"
                    );
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            let connection = Connection::new(
                stream,
                remote_addr,
                slot,
                this.limits.handshake_timeout,
                Arc::clone(&this.metrics),
            );
            if let Some(handshake) = &connection.handshake {
                this.remember_handshaking(handshake);
            }
            return Poll::Ready(Some(Ok(connection)));
        }
    }
}

impl Incoming {
    /// Closes the oldest connection that has not started HTTP/2 yet, and
    /// hands its place over.
    fn evict_oldest_handshaking(&mut self) -> Option<OwnedSemaphorePermit> {
        while let Some(oldest) = self.handshaking.pop_front() {
            if let Some(slot) = oldest.upgrade().and_then(|handshake| handshake.evict()) {
                self.metrics.connection_refused("evicted");
                return Some(slot);
            }
        }
        None
    }

    fn remember_handshaking(&mut self, handshake: &Arc<Handshake>) {
        // Entries of connections that started (or closed) are dropped now
        // and then, so that the queue stays about as long as the cap.
        if self.handshaking.len() >= 2 * self.limits.max_connections.max(1) {
            self.handshaking.retain(|entry| {
                entry
                    .upgrade()
                    .is_some_and(|handshake| handshake.is_pending())
            });
        }
        self.handshaking.push_back(Arc::downgrade(handshake));
    }
}

/// A connection's place while it has not started HTTP/2: the acceptor may
/// take the place away (evicting it), until the connection claims it back
/// once its preface has arrived.
struct Handshake {
    slot: Mutex<Option<OwnedSemaphorePermit>>,
    waker: Mutex<Option<Waker>>,
}

impl Handshake {
    fn lock_slot(&self) -> std::sync::MutexGuard<'_, Option<OwnedSemaphorePermit>> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_pending(&self) -> bool {
        self.lock_slot().is_some()
    }

    /// Takes the place away and wakes the connection, which then closes.
    fn evict(&self) -> Option<OwnedSemaphorePermit> {
        let slot = self.lock_slot().take()?;
        if let Some(waker) = self
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            waker.wake();
        }
        Some(slot)
    }
}

/// An accepted connection: its slot is given back when it is dropped, and
/// reading fails once the handshake timeout passed before the client started.
pub struct Connection {
    stream: TcpStream,
    info: ConnectionInfo,
    /// Until HTTP/2 has started: the deadline, and the place that can be
    /// taken away.
    handshake_deadline: Option<Pin<Box<Sleep>>>,
    handshake: Option<Arc<Handshake>>,
    read_so_far: usize,
    metrics: Arc<Metrics>,
    /// The place, once HTTP/2 has started (before that, in `handshake`).
    slot: Option<OwnedSemaphorePermit>,
}

impl Connection {
    fn new(
        stream: TcpStream,
        remote_addr: SocketAddr,
        slot: OwnedSemaphorePermit,
        handshake_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.connection_opened();
        Self {
            stream,
            info: ConnectionInfo {
                remote_addr: Some(remote_addr),
                watch_streams: Arc::default(),
            },
            handshake_deadline: Some(Box::pin(tokio::time::sleep_until(
                Instant::now() + handshake_timeout,
            ))),
            handshake: Some(Arc::new(Handshake {
                slot: Mutex::new(Some(slot)),
                waker: Mutex::new(None),
            })),
            read_so_far: 0,
            metrics,
            slot: None,
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.metrics.connection_closed();
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(handshake) = &this.handshake {
            if !handshake.is_pending() {
                this.handshake = None;
                this.handshake_deadline = None;
                return Poll::Ready(Err(evicted()));
            }
            *handshake
                .waker
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
        }
        if let Some(deadline) = &mut this.handshake_deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.handshake_deadline = None;
            this.metrics.connection_refused("handshake_timeout");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within the handshake timeout",
            )));
        }
        let filled_before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if this.handshake_deadline.is_some() && matches!(read, Poll::Ready(Ok(()))) {
            this.read_so_far += buf.filled().len() - filled_before;
            if this.read_so_far >= HANDSHAKE_BYTES {
                this.handshake_deadline = None;
                // Started: the place is this connection's for good.
                this.slot = this
                    .handshake
                    .take()
                    .and_then(|handshake| handshake.evict());
                if this.slot.is_none() {
                    return Poll::Ready(Err(evicted()));
                }
            }
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

fn evicted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed before HTTP/2 started, to make room for another connection",
    )
}

/// Says when a repeated event is due a log line again, and how many
/// occurrences went unlogged since the last one.
#[derive(Default)]
pub struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn should_log(&mut self) -> Option<u64> {
        self.should_log_at(Instant::now())
    }

    fn should_log_at(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < REFUSAL_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_event_is_logged_once_per_interval_with_a_count() {
        let start = Instant::now();
        let mut log = RateLimitedLog::default();
        assert_eq!(log.should_log_at(start), Some(0));
        assert_eq!(log.should_log_at(start), None);
        assert_eq!(log.should_log_at(start + Duration::from_secs(1)), None);
        let later = start + REFUSAL_LOG_INTERVAL;
        assert_eq!(log.should_log_at(later), Some(2));
        assert_eq!(log.should_log_at(later), None);
    }
}
