//! The health service: what it reports (the database's fitness, followed in
//! the background) and the bound on its long-lived `Watch` streams.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::Service;

use crate::api::grpc::assignment::ChannelAssignmentService;
use crate::api::grpc::body::GuardedBody;
use crate::api::grpc::connections::ConnectionInfo;
use crate::api::grpc::inventory::ChannelInventoryService;
use crate::error::{ServiceError, anyhow_chain};
use crate::proto::channel_assignment_server::ChannelAssignmentServer;
use crate::proto::channel_inventory_server::ChannelInventoryServer;
use crate::store::Store;

/// Health service names that follow the database.
pub const DATABASE_DEPENDENT_SERVICES: [&str; 4] = [
    "",
    <ChannelAssignmentServer<ChannelAssignmentService> as tonic::server::NamedService>::NAME,
    <ChannelInventoryServer<ChannelInventoryService> as tonic::server::NamedService>::NAME,
    "readiness",
];
/// SERVING while the process can serve at all: a database outage must not get
/// the pod restarted.
pub const LIVENESS: &str = "liveness";

/// Follows the database's fitness to serve in the health service.
///
/// A check that takes longer than an interval is reported NOT_SERVING at
/// once, but is let finish (up to `check_timeout`) rather than restarted:
/// opening a connection on a busy machine can take longer than an interval,
/// and a check cut short every time would never see the database again.
pub async fn monitor_database(
    store: Store,
    reporter: HealthReporter,
    interval: Duration,
    check_timeout: Duration,
) {
    let mut reported = Reported::default();
    loop {
        let check = tokio::time::timeout(
            check_timeout.max(interval),
            store.database().check_writable(),
        );
        tokio::pin!(check);
        let outcome = match tokio::time::timeout(interval, &mut check).await {
            Ok(checked) => checked,
            Err(_slow) => {
                reported
                    .report(&reporter, Err("the database check is slow".to_owned()))
                    .await;
                check.await
            }
        };
        let outcome = match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(anyhow_chain(&error)),
            Err(_timed_out) => Err(format!(
                "the database check took longer than {check_timeout:?}"
            )),
        };
        reported.report(&reporter, outcome).await;
        store.database().close_idle().await;
        tokio::time::sleep(interval).await;
    }
}

/// What the health service was last told, and when its cause was logged.
#[derive(Default)]
struct Reported {
    serving: Option<bool>,
    cause: Option<String>,
    logged_at: Option<tokio::time::Instant>,
}

/// While the database stays unfit for the same reason, the cause is logged
/// again this often: an unready pod gets no calls, so its log is the only
/// place that says why.
const UNFIT_RELOG_INTERVAL: Duration = Duration::from_secs(5 * 60);

impl Reported {
    async fn report(&mut self, reporter: &HealthReporter, outcome: Result<(), String>) {
        let serving = outcome.is_ok();
        match outcome {
            Ok(()) if self.serving != Some(true) => {
                tracing::info!("database reachable and writable: SERVING");
                self.cause = None;
            }
            Ok(()) => {}
            Err(cause) => {
                let due = self
                    .logged_at
                    .is_none_or(|at| at.elapsed() >= UNFIT_RELOG_INTERVAL);
                if self.cause.as_deref() != Some(cause.as_str()) || due {
                    tracing::warn!(%cause, "database not fit to serve: NOT_SERVING");
                    self.logged_at = Some(tokio::time::Instant::now());
                    self.cause = Some(cause);
                }
            }
        }
        if self.serving == Some(serving) {
            return;
        }
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in DATABASE_DEPENDENT_SERVICES {
            reporter.set_service_status(name, status).await;
        }
        self.serving = Some(serving);
    }
}

const WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";

/// The health service with at most `max_per_connection` `Watch` streams
/// open on one connection: each is held until the client leaves, and a
/// probe or a client-side load balancer needs one per service, not
/// thousands. One more is answered RESOURCE_EXHAUSTED at once.
#[derive(Clone)]
pub struct LimitWatchStreams<S> {
    inner: S,
    max_per_connection: usize,
}

impl<S> LimitWatchStreams<S> {
    pub fn new(inner: S, max_per_connection: usize) -> Self {
        Self {
            inner,
            max_per_connection,
        }
    }
}

impl<S: NamedService> NamedService for LimitWatchStreams<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for LimitWatchStreams<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let watching = (request.uri().path() == WATCH_PATH)
            .then(|| request.extensions().get::<ConnectionInfo>())
            .flatten()
            .map(|connection| Arc::clone(&connection.watch_streams));
        let Some(watching) = watching else {
            return Box::pin(self.inner.call(request));
        };
        if watching.fetch_add(1, Ordering::AcqRel) >= self.max_per_connection {
            watching.fetch_sub(1, Ordering::AcqRel);
            let status = tonic::Status::from(ServiceError::TooManyWatchStreams);
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let slot = WatchSlot(watching);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| GuardedBody::wrap(body, slot)))
        })
    }
}

/// Frees its place among the connection's `Watch` streams when dropped.
struct WatchSlot(Arc<AtomicUsize>);

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
