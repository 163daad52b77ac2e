//! The Prometheus endpoint, scraped after real RPCs.

use std::net::SocketAddr;

use sqlx::PgPool;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::*;

/// GET /metrics over plain HTTP/1.1, as Prometheus scrapes it.
pub async fn scrape(address: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the sample `name{labels}` (labels as rendered), if any.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[sqlx::test]
async fn counters_move_with_real_rpcs(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    let before = scrape(app.metrics_addr).await;
    // Present at zero before the first call, so that dashboards show 0.
    assert_eq!(
        sample(
            &before,
            r#"channel_assignment_rpc_requests_total{method="AssignMailbox",code="OK"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&before, "channel_assignment_events_written_total"),
        Some(0.0)
    );

    app.assign_mailbox(ORG, "sales-agent", &mailbox)
        .await
        .unwrap();
    app.assign_mailbox(ORG, "sales-agent", &mailbox)
        .await
        .unwrap();
    app.assign_mailbox(ORG, "nobody", &mailbox)
        .await
        .unwrap_err();
    app.client
        .clone()
        .unassign_mailbox(channel_assignment::proto::UnassignMailboxRequest {
            agent_handle: "sales-agent".into(),
        })
        .await
        .unwrap_err();

    let after = scrape(app.metrics_addr).await;
    let value =
        |series: &str| sample(&after, series).unwrap_or_else(|| panic!("{series} in\n{after}"));
    assert_eq!(
        value(r#"channel_assignment_rpc_requests_total{method="AssignMailbox",code="OK"}"#),
        2.0
    );
    assert_eq!(
        value(r#"channel_assignment_rpc_requests_total{method="AssignMailbox",code="NOT_FOUND"}"#),
        1.0
    );
    assert_eq!(
        value(
            r#"channel_assignment_rpc_requests_total{method="UnassignMailbox",code="UNAUTHENTICATED"}"#
        ),
        1.0
    );
    assert_eq!(
        value(r#"channel_assignment_rpc_duration_seconds_count{method="AssignMailbox"}"#),
        3.0
    );
    assert_eq!(value("channel_assignment_rpc_in_flight"), 0.0);
    assert_eq!(value("channel_assignment_db_pool_max_connections"), 10.0);
    assert!(value("channel_assignment_db_pool_connections") >= 1.0);
    assert_eq!(value("channel_assignment_db_pool_waiting"), 0.0);
    assert!(value("channel_assignment_db_pool_acquire_duration_seconds_count") >= 3.0);
    // One real change: the idempotent repeat and the refusals record nothing.
    assert_eq!(value("channel_assignment_events_written_total"), 1.0);
}

#[sqlx::test]
async fn every_documented_series_exists_from_the_start(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let text = scrape(app.metrics_addr).await;
    for kind in [
        "unavailable",
        "timeout",
        "conflict",
        "constraint",
        "privilege",
        "other",
    ] {
        let series = format!(r#"channel_assignment_db_errors_total{{kind="{kind}"}}"#);
        assert_eq!(sample(&text, &series), Some(0.0), "{series} in\n{text}");
    }
    for method in [
        "AssignMailbox",
        "UnassignPhoneNumber",
        "GetIdentity",
        "ListIdentities",
        "WatchAssignmentEvents",
        "UpsertMailbox",
    ] {
        let series =
            format!(r#"channel_assignment_rpc_duration_seconds_count{{method="{method}"}}"#);
        assert_eq!(sample(&text, &series), Some(0.0), "{series} in\n{text}");
    }
    for series in [
        "channel_assignment_events_written_total",
        "channel_assignment_events_relay_lag",
        "channel_assignment_events_watchers",
        r#"channel_assignment_rpc_shed_total{reason="organization"}"#,
        r#"channel_assignment_grpc_connections_refused_total{reason="limit"}"#,
    ] {
        assert_eq!(sample(&text, series), Some(0.0), "{series} in\n{text}");
    }
    // The test's own client is connected.
    assert_eq!(
        sample(&text, "channel_assignment_grpc_connections"),
        Some(1.0)
    );
}

#[sqlx::test]
async fn database_errors_are_counted_by_kind(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    // Make the link column refuse every write: the constraint class.
    sqlx::query("ALTER TABLE identities ADD CONSTRAINT no_links CHECK (mailbox_id IS NULL)")
        .execute(&pool)
        .await
        .unwrap();

    assert_error(
        app.assign_mailbox(ORG, "sales-agent", &mailbox).await,
        tonic::Code::Internal,
        "INTERNAL",
    );

    let text = scrape(app.metrics_addr).await;
    assert_eq!(
        sample(
            &text,
            r#"channel_assignment_db_errors_total{kind="constraint"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"channel_assignment_rpc_requests_total{method="AssignMailbox",code="INTERNAL"}"#
        ),
        Some(1.0)
    );
}
