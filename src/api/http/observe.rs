//! Every REST request ends in one `http` log line and in the metrics, as
//! every gRPC call ends in an `rpc` line: the operation (the gRPC method's
//! name, from a fixed set), the gRPC code and HTTP status of the answer, the
//! latency and the caller's organization; a W3C `traceparent` puts its
//! trace id on the line and parents the span.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::Code;
use tracing::{Instrument as _, field};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::error::ErrorCode;
use crate::api::grpc::connections::RateLimitedLog;
use crate::api::grpc::observe::{HeaderExtractor, trace_id};
use crate::error::code_name;
use crate::metrics::Metrics;
use crate::operations::deadline::Arrival;

/// The `method` label of a request that matched no operation.
pub const UNKNOWN_OPERATION: &str = "unknown";
/// The `method` label of `GET /openapi.json`.
pub const OPENAPI_OPERATION: &str = "OpenApiDocument";

/// Which operation answered (a response extension, set by `name_operation`).
#[derive(Clone, Copy, Debug)]
struct Operation(&'static str);

#[derive(Clone)]
pub struct Observer {
    metrics: Arc<Metrics>,
    shed_log: Arc<Mutex<RateLimitedLog>>,
}

impl Observer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            shed_log: Arc::default(),
        }
    }
}

/// The outermost layer: notes the arrival (the deadline counts from it),
/// opens the span, and logs and counts the answer.
pub async fn observe(
    State(observer): State<Observer>,
    mut request: Request,
    next: Next,
) -> Response {
    request
        .extensions_mut()
        .insert(Arrival(tokio::time::Instant::now()));
    let trace_id = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(trace_id);
    let span = tracing::info_span!(
        "http",
        operation = field::Empty,
        organization = field::Empty,
        trace_id = trace_id.map(field::display),
    );
    if trace_id.is_some() {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
        let _ = span.set_parent(parent);
    }
    let started = Instant::now();
    let in_flight = observer.metrics.http_started();
    let response = next.run(request).instrument(span.clone()).await;
    let latency = started.elapsed();
    let latency_ms = latency.as_secs_f64() * 1000.0;
    let operation = response
        .extensions()
        .get::<Operation>()
        .map_or(UNKNOWN_OPERATION, |operation| operation.0);
    let code = response
        .extensions()
        .get::<ErrorCode>()
        .map_or(Code::Ok, |code| code.0);
    let status = response.status().as_u16();
    observer
        .metrics
        .http_finished(operation, code_name(code), status, latency);
    let _entered = span.enter();
    match code {
        Code::Internal | Code::Unknown | Code::DataLoss => {
            tracing::error!(status, code = code_name(code), latency_ms, "http");
        }
        // As for gRPC: a line per shed request would multiply the load.
        Code::ResourceExhausted => {
            tracing::debug!(status, code = code_name(code), latency_ms, "http");
            if let Some(suppressed) = observer
                .shed_log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .should_log()
            {
                tracing::warn!(
                    suppressed,
                    "shedding REST requests with 429 (each at debug; counted in rpc_shed_total)"
                );
            }
        }
        _ => tracing::info!(status, code = code_name(code), latency_ms, "http"),
    }
    drop(in_flight);
    response
}

/// Inside the router, on matched routes only: names the operation from the
/// matched path template and method, as the OpenAPI document does.
pub async fn name_operation(
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let operation = match matched.as_ref().map(MatchedPath::as_str) {
        Some(super::OPENAPI_PATH) => OPENAPI_OPERATION,
        Some(path) => super::operation_id(request.method(), path).unwrap_or(UNKNOWN_OPERATION),
        None => UNKNOWN_OPERATION,
    };
    tracing::Span::current().record("operation", operation);
    let mut response = next.run(request).await;
    response.extensions_mut().insert(Operation(operation));
    response
}
