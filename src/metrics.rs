//! Prometheus metrics, served over plain HTTP on their own port.
//!
//! One registry per application (not a process-global recorder), so that
//! tests that run several servers in one process each see their own figures.

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::error::DatabaseErrorClass;
use crate::events::hub::EventHub;
use crate::store::Store;

/// How long a scrape waits for the database's count of events.
const EVENTS_COUNT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// REST requests: the operation (the gRPC method's name, or `unknown`),
/// the gRPC code of the answer and its HTTP status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: &'static str,
    code: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatabaseErrorLabels {
    kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: Family<MethodLabels, Histogram>,
    rpc_in_flight: Gauge,
    pool_connections: Gauge,
    pool_idle: Gauge,
    pool_waiting: Gauge,
    pool_acquire_duration: Histogram,
    database_errors: Family<DatabaseErrorLabels, Counter>,
    connections_open: Gauge,
    connections_refused: Family<ReasonLabels, Counter>,
    requests_shed: Family<ReasonLabels, Counter>,
    relay_lag: Gauge,
    watchers: Gauge,
    events_written: Counter,
    http: HttpMetrics,
}

/// The REST API's series, beside the gRPC ones (README, "REST").
struct HttpMetrics {
    requests: Family<HttpLabels, Counter>,
    duration: Family<MethodLabels, Histogram>,
    in_flight: Gauge,
    connections: Gauge,
    connections_refused: Counter,
}

impl HttpMetrics {
    fn register(registry: &mut Registry) -> Self {
        let requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "REST requests handled, by operation (the gRPC method's name, or unknown), gRPC code and HTTP status",
            requests.clone(),
        );
        let duration =
            Family::<MethodLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "http_request_duration_seconds",
            "REST request latency, from request headers to response headers",
            duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "http_in_flight",
            "REST requests being handled now",
            in_flight.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "http_connections",
            "Open REST (HTTP/1.1) connections",
            connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "http_connections_refused",
            "REST connections closed at once because the connection limit was reached",
            connections_refused.clone(),
        );
        Self {
            requests,
            duration,
            in_flight,
            connections,
            connections_refused,
        }
    }
}

/// 0.5 ms … ~16 s: the service answers in about a millisecond when healthy,
/// and within its request timeout (seconds) when not.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Metrics {
    pub fn new(max_connections: u32) -> Arc<Self> {
        let mut registry = Registry::with_prefix("channel_assignment");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rpc_requests",
            "ChannelAssignment RPCs handled, by method and gRPC code",
            rpc_requests.clone(),
        );
        let rpc_duration =
            Family::<MethodLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "rpc_duration_seconds",
            "ChannelAssignment RPC latency, from request to response headers",
            rpc_duration.clone(),
        );
        let rpc_in_flight = Gauge::default();
        registry.register(
            "rpc_in_flight",
            "ChannelAssignment RPCs being handled now",
            rpc_in_flight.clone(),
        );
        let pool_connections = Gauge::default();
        registry.register(
            "db_pool_connections",
            "Open database connections",
            pool_connections.clone(),
        );
        let pool_idle = Gauge::default();
        registry.register(
            "db_pool_idle_connections",
            "Open database connections not in use",
            pool_idle.clone(),
        );
        let pool_max = Gauge::<i64>::default();
        pool_max.set(i64::from(max_connections));
        registry.register(
            "db_pool_max_connections",
            "Most database connections the pool opens",
            pool_max,
        );
        let pool_waiting = Gauge::default();
        registry.register(
            "db_pool_waiting",
            "Requests waiting for a database connection",
            pool_waiting.clone(),
        );
        let pool_acquire_duration = latency_histogram();
        registry.register(
            "db_pool_acquire_duration_seconds",
            "Time spent waiting for a database connection",
            pool_acquire_duration.clone(),
        );
        let database_errors = Family::<DatabaseErrorLabels, Counter>::default();
        registry.register(
            "db_errors",
            "Database errors, by kind (unavailable, timeout, conflict, constraint, privilege, other)",
            database_errors.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "grpc_connections",
            "Open gRPC (HTTP/2) connections",
            connections_open.clone(),
        );
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "grpc_connections_refused",
            "gRPC connections closed by the server's bounds, by reason (limit, handshake_timeout, evicted)",
            connections_refused.clone(),
        );
        let requests_shed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rpc_shed",
            "RPCs refused with RESOURCE_EXHAUSTED, by the limit that refused them (server, organization, streams)",
            requests_shed.clone(),
        );
        for reason in ["limit", "handshake_timeout", "evicted"] {
            drop(connections_refused.get_or_create(&ReasonLabels { reason }));
        }
        for reason in ["server", "organization", "streams"] {
            drop(requests_shed.get_or_create(&ReasonLabels { reason }));
        }
        // Every documented series exists from the start, at zero: a
        // dashboard or an alert on a series that appears only with its
        // first event shows "no data" where it should show 0.
        for kind in DatabaseErrorClass::ALL {
            drop(database_errors.get_or_create(&DatabaseErrorLabels { kind: kind.label() }));
        }
        for method in crate::api::grpc::observe::known_method_names() {
            drop(rpc_requests.get_or_create(&RpcLabels { method, code: "OK" }));
            drop(rpc_duration.get_or_create(&MethodLabels { method }));
        }
        let relay_lag = Gauge::default();
        registry.register(
            "events_relay_lag",
            "Change events committed but not yet published to NATS JetStream (0 when the relay is off)",
            relay_lag.clone(),
        );
        let watchers = Gauge::default();
        registry.register(
            "events_watchers",
            "WatchAssignmentEvents streams open now",
            watchers.clone(),
        );
        let events_written = Counter::default();
        registry.register(
            "events_written",
            "Change events recorded in the database, by every replica (the same figure on each: \
             aggregate with max, not sum)",
            events_written.clone(),
        );
        let http = HttpMetrics::register(&mut registry);
        for (method, status) in crate::api::http::documented_operations() {
            drop(http.requests.get_or_create(&HttpLabels {
                method,
                code: "OK",
                status,
            }));
            drop(http.duration.get_or_create(&MethodLabels { method }));
        }
        Arc::new(Self {
            http,
            registry,
            events_written,
            relay_lag,
            watchers,
            connections_open,
            connections_refused,
            requests_shed,
            rpc_requests,
            rpc_duration,
            rpc_in_flight,
            pool_connections,
            pool_idle,
            pool_waiting,
            pool_acquire_duration,
            database_errors,
        })
    }

    pub fn rpc_started(self: &Arc<Self>) -> InFlight {
        self.rpc_in_flight.inc();
        InFlight(Arc::clone(self))
    }

    /// `method` comes from a fixed set (`telemetry::method_name`), so the
    /// series stay bounded whatever paths callers send.
    pub fn rpc_finished(&self, method: &'static str, code: &'static str, latency: Duration) {
        self.rpc_requests
            .get_or_create(&RpcLabels { method, code })
            .inc();
        self.rpc_duration
            .get_or_create(&MethodLabels { method })
            .observe(latency.as_secs_f64());
    }

    pub fn http_started(self: &Arc<Self>) -> HttpInFlight {
        self.http.in_flight.inc();
        HttpInFlight(Arc::clone(self))
    }

    /// `method` (an operation id or `unknown`), `code` and `status` come
    /// from fixed sets, so the series stay bounded whatever callers send.
    pub fn http_finished(
        &self,
        method: &'static str,
        code: &'static str,
        status: u16,
        latency: Duration,
    ) {
        self.http
            .requests
            .get_or_create(&HttpLabels {
                method,
                code,
                status,
            })
            .inc();
        self.http
            .duration
            .get_or_create(&MethodLabels { method })
            .observe(latency.as_secs_f64());
    }

    pub fn http_connection_opened(self: &Arc<Self>) -> HttpConnection {
        self.http.connections.inc();
        HttpConnection(Arc::clone(self))
    }

    pub fn http_connection_refused(&self) {
        self.http.connections_refused.inc();
    }

    /// Counts a request waiting for a connection until the guard is dropped.
    pub fn waiting_for_connection(self: &Arc<Self>) -> WaitingForConnection {
        self.pool_waiting.inc();
        WaitingForConnection(Arc::clone(self))
    }

    pub fn connection_acquired(&self, waited: Duration) {
        self.pool_acquire_duration.observe(waited.as_secs_f64());
    }

    pub fn relay_lag(&self, events: i64) {
        self.relay_lag.set(events);
    }

    pub fn connection_opened(&self) {
        self.connections_open.inc();
    }

    pub fn connection_closed(&self) {
        self.connections_open.dec();
    }

    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn request_shed(&self, reason: &'static str) {
        self.requests_shed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn database_error(&self, kind: &'static str) {
        self.database_errors
            .get_or_create(&DatabaseErrorLabels { kind })
            .inc();
    }

    /// Brings the events counter up to the database's count (a counter
    /// never goes down: a smaller figure is ignored).
    fn events_recorded(&self, total: u64) {
        let known = self.events_written.get();
        if total > known {
            self.events_written.inc_by(total - known);
        }
    }

    /// The text exposition, with the pool's gauges read now.
    pub fn render(&self, store: &Store, events: &EventHub) -> String {
        let database = store.database();
        self.watchers
            .set(i64::try_from(events.watchers()).unwrap_or(i64::MAX));
        let pool = database.status();
        self.pool_connections
            .set(i64::try_from(pool.connections).unwrap_or(i64::MAX));
        self.pool_idle
            .set(i64::try_from(pool.idle).unwrap_or(i64::MAX));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Decrements the in-flight gauge however the RPC ends (even if cancelled).
pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.rpc_in_flight.dec();
    }
}

/// Decrements the REST in-flight gauge however the request ends.
pub struct HttpInFlight(Arc<Metrics>);

impl Drop for HttpInFlight {
    fn drop(&mut self) {
        self.0.http.in_flight.dec();
    }
}

/// Counts an open REST connection until dropped.
pub struct HttpConnection(Arc<Metrics>);

impl Drop for HttpConnection {
    fn drop(&mut self) {
        self.0.http.connections.dec();
    }
}

pub struct WaitingForConnection(Arc<Metrics>);

impl Drop for WaitingForConnection {
    fn drop(&mut self) {
        self.0.pool_waiting.dec();
    }
}

/// The `/metrics` endpoint.
pub fn router(metrics: Arc<Metrics>, store: Store, events: EventHub) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move {
            // The events are written by the database's trigger, so the
            // database counts them; a scrape while it is down keeps the last
            // count rather than failing.
            match tokio::time::timeout(EVENTS_COUNT_TIMEOUT, store.events_written()).await {
                Ok(Ok(total)) => metrics.events_recorded(total),
                Ok(Err(error)) => tracing::debug!(%error, "cannot count the change events"),
                Err(_) => tracing::debug!("counting the change events took too long"),
            }
            (
                [(
                    http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                metrics.render(&store, &events),
            )
        }),
    )
}
