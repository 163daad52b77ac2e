//! The real binary, as operators run it: commands, refusal to start, SIGTERM.

use std::{process::Stdio, time::Duration};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use sqlx::PgPool;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
    sync::mpsc,
};
use tokio_stream::StreamExt as _;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::*;

const BINARY: &str = env!("CARGO_BIN_EXE_channel-assignment");
const SHUTTING_DOWN: &str = "shutting down: reporting NOT_SERVING and draining in-flight rpcs";

/// The binary with a clean environment: only what the test sets.
pub fn command(pool: &PgPool) -> Command {
    let options = pool.connect_options();
    let url = format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres"),
    );
    let mut command = Command::new(BINARY);
    command
        .env_clear()
        .env("DATABASE_URL", url)
        .env("GRPC_LISTEN_ADDR", "127.0.0.1:0")
        .env("HTTP_LISTEN_ADDR", "127.0.0.1:0")
        .env("METRICS_LISTEN_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

#[sqlx::test]
async fn serve_refuses_to_start_without_a_way_to_authenticate(pool: PgPool) {
    let output = command(&pool).arg("serve").output().await.expect("runs");

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains("no way to authenticate callers"),
        "{stderr}"
    );
}

#[sqlx::test(migrations = false)]
async fn migrate_creates_the_schema_and_is_idempotent(pool: PgPool) {
    for _ in 0..2 {
        let output = command(&pool).arg("migrate").output().await.expect("runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_name IN ('identities', 'mailboxes', 'phone_numbers')
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(tables, ["identities", "mailboxes", "phone_numbers"]);
}

/// Starts `serve` and returns it with the address it logged and its later
/// log messages.
pub async fn serve(
    pool: &PgPool,
    extra_env: &[(&str, &str)],
) -> (Child, String, mpsc::UnboundedReceiver<String>) {
    let (child, address, mut entries) = serve_logging(pool, extra_env).await;
    let (messages, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(entry) = entries.recv().await {
            let _ = messages.send(entry["message"].as_str().unwrap_or_default().to_owned());
        }
    });
    (child, address, received)
}

/// As `serve`, with its later log lines whole (JSON objects).
pub async fn serve_logging(
    pool: &PgPool,
    extra_env: &[(&str, &str)],
) -> (Child, String, mpsc::UnboundedReceiver<serde_json::Value>) {
    let mut child = command(pool)
        .arg("serve")
        .env("AUTH_JWT_HS256_SECRET", SECRET)
        .envs(extra_env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let address = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                panic!("a log line that is not JSON: {line}");
            };
            if entry["message"] == "serving gRPC" {
                return entry["address"].as_str().unwrap().to_owned();
            }
        }
        panic!("exited before serving");
    })
    .await
    .expect("serves in time");
    // Keep draining the logs so that the child never blocks on a full pipe.
    let (messages, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) {
                let _ = messages.send(entry);
            }
        }
    });
    (child, address, received)
}

#[sqlx::test]
async fn sigterm_drains_in_flight_rpcs_and_exits_zero(pool: PgPool) {
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    let (mut child, address, mut log) = serve(&pool, &[]).await;
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .expect("connects");
    let mut health = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    while health.next().await.unwrap().unwrap().status() != ServingStatus::Serving {}
    drop(health);

    let lock = lock_identity(&pool, "sales-agent").await;
    let in_flight = spawn_assign_mailbox(channel, "sales-agent", mailbox);
    wait_until_blocked(&pool).await;

    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    // Only once the drain has begun is the RPC "in flight during shutdown".
    while log.recv().await.expect("logs until exit") != SHUTTING_DOWN {}
    lock.rollback().await.unwrap();

    let identity = in_flight
        .await
        .unwrap()
        .expect("the in-flight RPC completes");
    assert!(identity.into_inner().mailbox.is_some());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within the drain timeout")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// A stand-in OTLP collector: hands every exported batch to the test.
struct Collector(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[sqlx::test]
async fn spans_are_exported_over_otlp_under_the_callers_trace(pool: PgPool) {
    insert_identity(&pool, ORG, "sales-agent").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let (exported, mut batches) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(exported)))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let endpoint = format!("http://{collector_addr}");
    let (mut child, address, _log) =
        serve(&pool, &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())]).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span_id = "00f067aa0ba902b7";
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = authorized(
        channel_assignment::proto::UnassignMailboxRequest {
            agent_handle: "sales-agent".into(),
        },
        ORG,
    );
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_span_id}-01")
            .parse()
            .unwrap(),
    );
    channel_assignment::proto::channel_assignment_client::ChannelAssignmentClient::new(channel)
        .unassign_mailbox(request)
        .await
        .expect("served");

    // SIGTERM flushes the batch on the way out.
    let pid = child.id().expect("running").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert_eq!(child.wait().await.unwrap().code(), Some(0));

    let mut rpc_spans = Vec::new();
    while let Ok(batch) = batches.try_recv() {
        for resource in batch.resource_spans {
            for scope in resource.scope_spans {
                rpc_spans.extend(scope.spans.into_iter().filter(|span| span.name == "rpc"));
            }
        }
    }
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let span = rpc_spans.first().expect("the rpc span was exported");
    assert_eq!(hex(&span.trace_id), trace_id);
    assert_eq!(hex(&span.parent_span_id), parent_span_id);
}

#[sqlx::test]
async fn sigterm_under_load_completes_what_it_accepted_and_exits_zero(pool: PgPool) {
    let workers = crate::load::seed_workers(&pool, 8).await;
    let (mut child, address, mut log) = serve(&pool, &[]).await;
    let load = crate::load::Load::start(
        workers,
        format!("http://{address}"),
        Duration::from_secs(10),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;

    let pid = child.id().expect("running").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let signalled = std::time::Instant::now();
    while log.recv().await.expect("logs until exit") != SHUTTING_DOWN {}
    let status = tokio::time::timeout(Duration::from_secs(25), child.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    let exited_after = signalled.elapsed();
    // Clients keep sending for a while after the exit: refused cleanly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let workers = load.stop().await;

    assert_eq!(status.code(), Some(0));
    let codes = crate::load::ok_or_unavailable_only(&workers);
    let refused = workers
        .iter()
        .flat_map(|w| &w.outcomes)
        .filter(|o| o.code != Code::Ok)
        .count();
    assert!(refused > 0, "requests after the exit were refused");
    let verdict = crate::load::verify(&pool, &workers).await;
    assert_eq!(
        verdict.applied_despite_unavailable, 0,
        "every request the server accepted was answered"
    );
    println!(
        "shutdown under load: {} requests ({codes:?}), exit 0 after {exited_after:?}, \
         accepted but unanswered: 0",
        verdict.requests
    );
}

#[sqlx::test]
async fn a_taken_default_metrics_port_does_not_stop_the_service(pool: PgPool) {
    // Hold the default port, if nothing else does already.
    let _holder = std::net::TcpListener::bind("0.0.0.0:9090");
    let mut child = command(&pool)
        .arg("serve")
        .env_remove("METRICS_LISTEN_ADDR")
        .env("AUTH_JWT_HS256_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut warned = false;
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let entry: serde_json::Value = serde_json::from_str(&line).expect("JSON logs");
            let message = entry["message"].as_str().unwrap_or_default();
            warned |= message.starts_with("metrics port taken");
            if message == "serving gRPC" {
                return true;
            }
        }
        false
    })
    .await
    .expect("starts in time");

    assert!(served, "the service serves without its metrics port");
    assert!(warned, "and says why metrics are missing");
    child.kill().await.unwrap();
}

/// The log line of `message`, waiting up to `within`.
async fn logged(
    entries: &mut mpsc::UnboundedReceiver<serde_json::Value>,
    message: &str,
    within: Duration,
) -> serde_json::Value {
    tokio::time::timeout(within, async {
        while let Some(entry) = entries.recv().await {
            if entry["message"] == message {
                return entry;
            }
        }
        panic!("the logs ended without {message:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no {message:?} logged within {within:?}"))
}

async fn unassign_with_trace(address: &str, trace_id: &str) {
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = authorized(
        channel_assignment::proto::UnassignMailboxRequest {
            agent_handle: "sales-agent".into(),
        },
        ORG,
    );
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    channel_assignment::proto::channel_assignment_client::ChannelAssignmentClient::new(channel)
        .unassign_mailbox(request)
        .await
        .expect("served");
}

#[sqlx::test]
async fn json_log_fields_are_at_the_top_level(pool: PgPool) {
    insert_identity(&pool, ORG, "sales-agent").await;
    let (_child, address, mut entries) = serve_logging(&pool, &[]).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    unassign_with_trace(&address, trace_id).await;

    let line = logged(&mut entries, "rpc", Duration::from_secs(10)).await;
    // What `jq .method` or a Loki/Elasticsearch field query looks for.
    assert_eq!(line["method"], "UnassignMailbox", "{line}");
    assert_eq!(line["code"], "OK", "{line}");
    assert!(line["latency_ms"].is_f64(), "{line}");
    assert_eq!(line["organization"], ORG, "{line}");
    assert_eq!(line["trace_id"], trace_id, "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    assert!(
        line.get("span").is_none() && line.get("fields").is_none(),
        "{line}"
    );
}

#[sqlx::test]
async fn an_unreachable_otlp_collector_is_warned_about(pool: PgPool) {
    insert_identity(&pool, ORG, "sales-agent").await;
    // A port with nothing behind it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let endpoint = format!("http://{closed}");
    let (mut child, address, mut entries) =
        serve_logging(&pool, &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())]).await;
    unassign_with_trace(&address, "4bf92f3577b34da6a3ce929d0e0e4736").await;
    // SIGTERM flushes the batch, which cannot be sent.
    let pid = child.id().expect("running").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let warning = logged(
        &mut entries,
        "cannot export trace spans over OTLP: they are dropped",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(warning["endpoint"], endpoint, "{warning}");
    assert_eq!(child.wait().await.unwrap().code(), Some(0));
}
