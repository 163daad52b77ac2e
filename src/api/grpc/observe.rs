//! The layer that ends every `ChannelAssignment` call in one `rpc` log line
//! and in the metrics, with the RPC's name from a fixed set.

use std::{
    pin::Pin,
    sync::{Arc, LazyLock, Mutex, PoisonError},
    task::{Context, Poll},
    time::Instant,
};

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use prost::Message as _;
use tonic::{Code, server::NamedService};
use tower::{Layer, Service};
use tracing::{Instrument as _, Span, field};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::api::grpc::connections::RateLimitedLog;
use crate::error::code_name;
use crate::metrics::Metrics;

/// Wraps the gRPC service so that every call ends in one `rpc` log line and
/// in the metrics: method, gRPC code, latency, and the caller's organization
/// (recorded into the span by the auth interceptor). A W3C `traceparent`
/// puts its trace id on the span, so log lines join the caller's trace.
#[derive(Clone)]
pub struct ObserveRpcLayer {
    metrics: Arc<Metrics>,
    shed_log: Arc<Mutex<RateLimitedLog>>,
}

impl ObserveRpcLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            shed_log: Arc::default(),
        }
    }
}

impl<S> Layer<S> for ObserveRpcLayer {
    type Service = ObserveRpc<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ObserveRpc {
            inner,
            metrics: Arc::clone(&self.metrics),
            shed_log: Arc::clone(&self.shed_log),
        }
    }
}

#[derive(Clone)]
pub struct ObserveRpc<S> {
    inner: S,
    metrics: Arc<Metrics>,
    shed_log: Arc<Mutex<RateLimitedLog>>,
}

impl<S: NamedService> NamedService for ObserveRpc<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> Service<http::Request<B>> for ObserveRpc<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request
            .extensions_mut()
            .insert(crate::operations::deadline::Arrival(
                tokio::time::Instant::now(),
            ));
        // From a fixed set, never from the raw path: a caller (with or
        // without credentials) must not be able to mint metric series or
        // log fields.
        let method = method_name(request.uri().path());
        let trace_id = request
            .headers()
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .and_then(trace_id);
        let span = tracing::info_span!(
            "rpc",
            method = %method,
            organization = field::Empty,
            trace_id = trace_id.map(field::display),
        );
        if trace_id.is_some() {
            // The caller's span becomes this one's parent in exported traces.
            let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
            let _ = span.set_parent(parent);
        }
        let started = Instant::now();
        let in_flight = self.metrics.rpc_started();
        let metrics = Arc::clone(&self.metrics);
        let shed_log = Arc::clone(&self.shed_log);
        // The interceptor runs inside `call`, so it can record the organization.
        let response = span.in_scope(|| self.inner.call(request));
        Box::pin(
            async move {
                let result = response.await;
                let latency = started.elapsed();
                let latency_ms = latency.as_secs_f64() * 1000.0;
                match &result {
                    Ok(response) => {
                        let code = response_code(response);
                        metrics.rpc_finished(method, code_name(code), latency);
                        match code {
                            Code::Internal | Code::Unknown | Code::DataLoss => {
                                tracing::error!(code = code_name(code), latency_ms, "rpc");
                            }
                            // Under overload or a flood, a line per shed request
                            // would multiply the load: one line now and then says
                            // it is happening; the metrics count every one.
                            Code::ResourceExhausted => {
                                tracing::debug!(code = code_name(code), latency_ms, "rpc");
                                if let Some(suppressed) = shed_log
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .should_log()
                                {
                                    tracing::warn!(
                                        suppressed,
                                        "shedding requests with RESOURCE_EXHAUSTED (each at debug; counted in rpc_shed_total)"
                                    );
                                }
                            }
                            _ => tracing::info!(code = code_name(code), latency_ms, "rpc"),
                        }
                    }
                    Err(error) => {
                        metrics.rpc_finished(method, "TRANSPORT_ERROR", latency);
                        tracing::error!(%error, latency_ms, "rpc failed in transport");
                    }
                }
                drop(in_flight);
                result
            }
            .instrument(span),
        )
    }
}

/// The `method` of anything that is not one of the service's RPCs.
pub const UNKNOWN_METHOD: &str = "unknown";

/// `/package.Service/Method` of every RPC of `channels.v1`, read once from
/// the descriptor set that reflection serves, so that a new RPC is known
/// without a list to keep up to date.
static KNOWN_METHODS: LazyLock<Vec<(String, String)>> = LazyLock::new(|| {
    let Ok(files) = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
    else {
        return Vec::new();
    };
    let mut known = Vec::new();
    for file in files.file {
        let package = file.package();
        for service in &file.service {
            for method in &service.method {
                known.push((
                    format!("/{package}.{}/{}", service.name(), method.name()),
                    method.name().to_owned(),
                ));
            }
        }
    }
    known
});

/// The name of every RPC of `channels.v1`, so that its series exist from the
/// start.
pub fn known_method_names() -> impl Iterator<Item = &'static str> {
    KNOWN_METHODS.iter().map(|(_, method)| method.as_str())
}

/// The RPC's name for metrics and logs: one of the service's own methods,
/// else `unknown`.
pub fn method_name(path: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|(known, _)| known == path)
        .map_or(UNKNOWN_METHOD, |(_, method)| method.as_str())
}

/// Reads W3C trace context from HTTP headers.
pub(crate) struct HeaderExtractor<'a>(pub(crate) &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Records the caller's organization on the current RPC's log line.
pub fn record_organization(organization: &str) {
    Span::current().record("organization", organization);
}

/// A unary error is sent trailers-only, its `grpc-status` in the headers; a
/// success has none there (its OK status follows in the trailers).
fn response_code<R>(response: &http::Response<R>) -> Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if
/// well formed and not all zeros.
pub(crate) fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let well_formed = hex(version, 2)
        && version != "ff"
        && hex(trace_id, 32)
        && hex(parent_id, 16)
        && hex(flags, 2)
        && trace_id.bytes().any(|b| b != b'0')
        // Version 00 has exactly four fields; later versions may add more.
        && (version != "00" || parts.next().is_none());
    well_formed.then_some(trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_named_from_the_service_definition_only() {
        assert_eq!(
            method_name("/channels.v1.ChannelAssignment/AssignMailbox"),
            "AssignMailbox"
        );
        assert_eq!(
            method_name("/channels.v1.ChannelAssignment/UnassignPhoneNumber"),
            "UnassignPhoneNumber"
        );
        for made_up in [
            "/channels.v1.ChannelAssignment/Nope",
            "/channels.v1.ChannelAssignment/",
            "/channels.v1.Other/AssignMailbox",
            "/channels.v1.ChannelAssignment/AssignMailbox/extra",
            "",
        ] {
            assert_eq!(method_name(made_up), UNKNOWN_METHOD, "{made_up:?}");
        }
    }

    #[test]
    fn trace_ids_come_from_well_formed_traceparents_only() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace_id(&format!("00-{id}-00f067aa0ba902b7-01")), Some(id));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(trace_id(bad), None, "{bad:?}");
        }
    }
}
