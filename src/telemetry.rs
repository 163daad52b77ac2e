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
        // Every field at the top level (the event's, and those of the spans
        // it is in: `method`, `organization`, `trace_id` of the RPC), so
        // that `jq .method`, Loki or Elasticsearch field queries find them.
        // tracing-subscriber's JSON nests span fields under `span`;
        // json-subscriber (a drop-in by a tracing maintainer) flattens them.
        LogFormat::Json => registry
            .with(
                json_subscriber::fmt::layer()
                    .with_writer(log_writer)
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .flatten_span_list_on_top_level(true),
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
    let exporter = ReportingExporter {
        inner: exporter,
        endpoint: endpoint.to_owned(),
        failures: std::sync::Mutex::default(),
    };
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

/// While exports keep failing, one warning this often (with the count).
const EXPORT_FAILURE_RELOG_INTERVAL: Duration = Duration::from_secs(60);

/// The OTLP exporter, saying when it fails: the SDK drops a batch it cannot
/// send without a word at the default log level, so an unreachable collector
/// would look like a service that emits no traces.
#[derive(Debug)]
struct ReportingExporter<E> {
    inner: E,
    endpoint: String,
    failures: std::sync::Mutex<ExportFailures>,
}

#[derive(Debug, Default)]
struct ExportFailures {
    /// Failed batches since the last warning.
    unreported: u64,
    failing: bool,
    warned_at: Option<std::time::Instant>,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for ReportingExporter<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &result {
            Err(error) => {
                failures.unreported += 1;
                let due = failures
                    .warned_at
                    .is_none_or(|at| at.elapsed() >= EXPORT_FAILURE_RELOG_INTERVAL);
                if !failures.failing || due {
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        %error,
                        spans,
                        failed_batches = failures.unreported,
                        "cannot export trace spans over OTLP: they are dropped"
                    );
                    failures.unreported = 0;
                    failures.warned_at = Some(std::time::Instant::now());
                }
                failures.failing = true;
            }
            Ok(()) if failures.failing => {
                tracing::info!(endpoint = %self.endpoint, "exporting trace spans over OTLP again");
                *failures = ExportFailures::default();
            }
            Ok(()) => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
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
