//! Accepting connections, with the bounds hyper and tonic do not set: at most
//! `max_connections` open at once (one more is closed at once, with a
//! rate-limited log line), and each must start HTTP/2 (the client preface and
//! its first frame header) within the handshake timeout, or it is closed.
//! Without these, silent or half-open connections are held forever and run
//! the process out of file descriptors and memory.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::AtomicUsize},
    task::{Context, Poll},
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
            let Ok(slot) = Arc::clone(&this.slots).try_acquire_owned() else {
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
            return Poll::Ready(Some(Ok(Connection::new(
                stream,
                remote_addr,
                slot,
                this.limits.handshake_timeout,
                Arc::clone(&this.metrics),
            ))));
        }
    }
}

/// An accepted connection: its slot is given back when it is dropped, and
/// reading fails once the handshake timeout passed before the client started.
pub struct Connection {
    stream: TcpStream,
    info: ConnectionInfo,
    handshake: Option<Pin<Box<Sleep>>>,
    read_so_far: usize,
    metrics: Arc<Metrics>,
    _slot: OwnedSemaphorePermit,
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
            handshake: Some(Box::pin(tokio::time::sleep_until(
                Instant::now() + handshake_timeout,
            ))),
            read_so_far: 0,
            metrics,
            _slot: slot,
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
        if let Some(handshake) = &mut this.handshake
            && handshake.as_mut().poll(cx).is_ready()
        {
            this.handshake = None;
            this.metrics.connection_refused("handshake_timeout");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within the handshake timeout",
            )));
        }
        let filled_before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if this.handshake.is_some() && matches!(read, Poll::Ready(Ok(()))) {
            this.read_so_far += buf.filled().len() - filled_before;
            if this.read_so_far >= HANDSHAKE_BYTES {
                this.handshake = None;
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
