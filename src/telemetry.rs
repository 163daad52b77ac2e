//! Logging set-up, and the layer that writes one line per RPC.

use std::{
    io::IsTerminal as _,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use tonic::{Code, server::NamedService};
use tower::{Layer, Service};
use tracing::{Instrument as _, Span, field};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` overrides the default levels.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,h2=warn,tower=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    // Logs go to stderr: stdout carries what `dev` and `token` print.
    let installed = match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_target(false),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init(),
    };
    // A subscriber set earlier (a test harness) is kept.
    drop(installed);
}

/// Wraps a gRPC service so every call ends in one `rpc` log line with its
/// method, gRPC code, latency and the caller's organization (recorded into the
/// span by the auth interceptor).
#[derive(Clone, Copy, Default)]
pub struct RpcLogLayer;

impl<S> Layer<S> for RpcLogLayer {
    type Service = RpcLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcLog { inner }
    }
}

#[derive(Clone)]
pub struct RpcLog<S> {
    inner: S,
}

impl<S: NamedService> NamedService for RpcLog<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> Service<http::Request<B>> for RpcLog<S>
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

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let span = tracing::info_span!("rpc", method = %method, organization = field::Empty);
        let started = Instant::now();
        // The interceptor runs inside `call`, so it can record the organization.
        let response = span.in_scope(|| self.inner.call(request));
        Box::pin(
            async move {
                let result = response.await;
                let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
                match &result {
                    Ok(response) => {
                        let code = response_code(response);
                        if matches!(code, Code::Internal | Code::Unknown | Code::DataLoss) {
                            tracing::error!(code = ?code, latency_ms, "rpc");
                        } else {
                            tracing::info!(code = ?code, latency_ms, "rpc");
                        }
                    }
                    Err(error) => tracing::error!(%error, latency_ms, "rpc failed in transport"),
                }
                result
            }
            .instrument(span),
        )
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
