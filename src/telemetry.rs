//! Logging and trace export set-up.

use std::{io::IsTerminal as _, time::Duration};

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource, trace::SdkTracerProvider,
    trace::span_processor_with_async_runtime::BatchSpanProcessor,
};

use crate::config::LogFormat;

/// Log levels unless `RUST_LOG` says otherwise. h2 warns once per
/// connection that resets streams too fast (its rapid-reset defence, which
/// then closes the connection): hundreds of lines a second from one
/// attacker, about something already handled. Its errors still show.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,h2=error,hyper=error,tower=warn";

/// Installs the global subscriber. `RUST_LOG` overrides the default levels.
/// With an OTLP endpoint, spans are exported too (batched, on the runtime);
/// call `shutdown` on the result before exiting, to flush them.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let tracer_provider = otlp_endpoint.map(tracer_provider).transpose()?;
    let otel_layer = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer("channel-assignment"))
    });
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    // Logs go to stderr: stdout carries what `dev` and `token` print. A
    // thread of their own writes them, buffered, so that a line per RPC
    // costs the request no syscall (it cost ~25 µs each, BENCHMARKS.md); the
    // writer flushes whenever it has caught up, and applies backpressure
    // rather than dropping lines.
    let (log_writer, log_writer_guard) =
        tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(false)
            // Room for bursts; the default (128k lines) takes megabytes up front.
            .buffered_lines_limit(16 * 1024)
            .thread_name("log-writer")
            .finish(std::io::BufWriter::with_capacity(
                64 * 1024,
                std::io::stderr(),
            ));
    let installed = match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_writer(log_writer)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_target(false),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(log_writer)
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init(),
    };
    // A subscriber set earlier (a test harness) is kept.
    drop(installed);
    Ok(Telemetry {
        tracer_provider,
        _log_writer: log_writer_guard,
    })
}

fn tracer_provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .with_context(|| format!("cannot set up the OTLP exporter for {endpoint}"))?;
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            Resource::builder()
                .with_service_name("channel-assignment")
                .build(),
        )
        .build())
}

/// What must outlive serving: the span exporter, flushed on shutdown.
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    /// Writes out the buffered log lines when dropped.
    _log_writer: tracing_appender::non_blocking::WorkerGuard,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "could not flush trace spans");
        }
    }
}
