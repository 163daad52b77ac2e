//! The REST listener: HTTP/1.1 with keep-alive, with the bounds that
//! `axum::serve` does not set: at most `max_connections` open (one more is
//! closed at once), request headers within `header_timeout` of the
//! connection's start or of the previous response (so an idle or silent
//! connection is not held for ever), headers of at most `MAX_HEADER_BYTES`
//! (431 beyond). On drain it stops accepting, closes idle connections, lets
//! each in-flight request finish (answered with `Connection: close`) and
//! returns when the last connection has closed.

use std::{sync::Arc, time::Duration};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
    task::JoinSet,
};

use crate::api::grpc::connections::RateLimitedLog;
use crate::metrics::Metrics;

/// Room for an 8 KiB token and the usual headers, as on the gRPC port.
pub const MAX_HEADER_BYTES: usize = 4 * crate::auth::MAX_TOKEN_LEN;

/// How long accepting pauses after the process ran out of file descriptors
/// (or another resource): retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` until `draining` turns true, then drains.
/// Dropping the future (the drain took too long) closes every connection.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    metrics: Arc<Metrics>,
    mut draining: watch::Receiver<bool>,
) {
    let connections = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused_log = RateLimitedLog::default();
    let mut accept_error_log = RateLimitedLog::default();
    // Aborted when dropped: no connection outlives the server.
    let mut tasks = JoinSet::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Dropped sender: the server is going away all the same.
            _ = draining.wait_for(|draining| *draining) => break,
        };
        while tasks.try_join_next().is_some() {}
        let (stream, remote_addr) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and the like: the connection waits in the backlog.
                if let Some(suppressed) = accept_error_log.should_log() {
                    tracing::warn!(%error, suppressed, "cannot accept REST connections");
                }
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            metrics.http_connection_refused();
            if let Some(suppressed) = refused_log.should_log() {
                tracing::warn!(
                    limit = limits.max_connections,
                    suppressed,
                    "REST connection limit reached: closing new connections"
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let open = metrics.http_connection_opened();
        let connection = connections.watch(builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        ));
        tasks.spawn(async move {
            if let Err(error) = connection.await {
                // A client that went away, sent garbage or was too slow:
                // theirs to know, not an operations matter.
                tracing::debug!(%error, %remote_addr, "REST connection ended with an error");
            }
            drop(open);
            drop(slot);
        });
    }
    drop(listener);
    connections.shutdown().await;
}
