//! Hostile callers, at small scale: the server's bounds on streams,
//! connections, handshakes, watch streams and metric labels hold against
//! clients that send exactly the frames they choose (no credentials needed
//! for any of these). Full-scale figures: `drills/hostile/run`, RELIABILITY.md.

use std::time::Duration;

use channel_assignment::config::{AuthSettings, ServeSettings};
use sqlx::PgPool;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt as _;

use crate::helpers::*;
use crate::metrics::scrape;
use crate::raw::RawConnection;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;

async fn spawn_with(pool: &PgPool, tweak: impl FnOnce(&mut ServeSettings)) -> TestApp {
    let mut settings = test_settings(AuthSettings::hs256(SECRET));
    tweak(&mut settings);
    spawn_app_with_settings(pool, settings).await
}

fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream_id.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An HPACK header block of literal fields, no indexing, no Huffman coding.
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0);
        block.push(u8::try_from(name.len()).unwrap());
        block.extend_from_slice(name.as_bytes());
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value.as_bytes());
    }
    block
}

async fn read_frame(stream: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0_u8; 9];
    stream.read_exact(&mut head).await.ok()?;
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0_u8; length];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], stream_id, payload))
}

/// Reads until EOF or an error; how long that took.
async fn time_until_closed(stream: &mut TcpStream) -> Duration {
    let started = std::time::Instant::now();
    let mut sink = [0_u8; 1024];
    tokio::time::timeout(Duration::from_secs(10), async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await
    .expect("the server closes the connection");
    started.elapsed()
}

#[sqlx::test]
async fn streams_beyond_the_limit_are_refused(pool: PgPool) {
    let app = spawn_with(&pool, |settings| settings.max_concurrent_streams = 4).await;
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    stream.write_all(PREFACE).await.unwrap();
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    // The server's SETTINGS advertise the limit (id 3, MAX_CONCURRENT_STREAMS).
    let advertised = loop {
        let (kind, flags, _, payload) = read_frame(&mut stream).await.expect("settings");
        if kind == SETTINGS && flags & ACK == 0 {
            break payload
                .chunks(6)
                .find(|setting| setting[..2] == [0, 3])
                .map(|setting| {
                    u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]])
                });
        }
    };
    assert_eq!(advertised, Some(4));
    stream
        .write_all(&frame(SETTINGS, ACK, 0, &[]))
        .await
        .unwrap();

    // A client that ignores it: five streams whose bodies never come.
    let block = header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/grpc.health.v1.Health/Check"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    for stream_id in [1, 3, 5, 7, 9] {
        stream
            .write_all(&frame(HEADERS, END_HEADERS, stream_id, &block))
            .await
            .unwrap();
    }
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let (kind, _, stream_id, payload) = read_frame(&mut stream).await.expect("a frame");
            if kind == RST_STREAM {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                return (stream_id, code);
            }
        }
    })
    .await
    .expect("the fifth stream is reset at once");
    assert_eq!(refused, (9, REFUSED_STREAM));
}

#[sqlx::test]
async fn a_stream_whose_body_never_comes_is_answered_and_closed(pool: PgPool) {
    let app = spawn_with(&pool, |settings| {
        settings.request_timeout = Duration::from_millis(200);
    })
    .await;
    let mut connection = RawConnection::connect(app.address).await;
    let (response, _body_never_sent) = connection
        .open_without_body("/grpc.health.v1.Health/Check")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("the server ends the held stream by itself")
        .unwrap();
    let status = tonic::Status::from_header_map(response.headers()).expect("trailers-only");
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    println!("held stream answered after {:?}", started.elapsed());
}

#[sqlx::test]
async fn connections_that_never_start_http2_are_closed(pool: PgPool) {
    let app = spawn_with(&pool, |settings| {
        settings.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let mut silent = TcpStream::connect(app.address).await.unwrap();
    let mut half_preface = TcpStream::connect(app.address).await.unwrap();
    half_preface.write_all(&PREFACE[..12]).await.unwrap();

    let silent_closed_after = time_until_closed(&mut silent).await;
    let half_closed_after = time_until_closed(&mut half_preface).await;
    println!(
        "silent closed after {silent_closed_after:?}, half preface after {half_closed_after:?}"
    );

    // A real client that starts at once is not affected.
    let checked = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: "liveness".into(),
        })
        .await;
    assert!(checked.is_ok(), "{checked:?}");
    let metrics = scrape(app.metrics_addr).await;
    assert!(
        metrics.contains(
            r#"channel_assignment_grpc_connections_refused_total{reason="handshake_timeout"} 2"#
        ),
        "{metrics}"
    );
}

#[sqlx::test]
async fn connections_beyond_the_limit_are_closed_and_the_slot_comes_back(pool: PgPool) {
    // The test app's own channel holds one connection.
    let app = spawn_with(&pool, |settings| settings.max_connections = 2).await;
    let mut second = RawConnection::connect(app.address).await;
    // Served once: the server has seen it start HTTP/2, so it is not a
    // connection a newcomer could take the place of.
    let liveness = crate::raw::encode(&HealthCheckRequest {
        service: "liveness".into(),
    });
    let answer = second
        .unary("/grpc.health.v1.Health/Check", &[], &liveness)
        .await;
    assert_eq!(answer.status.code(), Code::Ok);

    let mut third = TcpStream::connect(app.address).await.unwrap();
    let closed_after = time_until_closed(&mut third).await;
    println!("third connection closed after {closed_after:?}");
    let metrics = scrape(app.metrics_addr).await;
    assert!(
        metrics.contains(r#"channel_assignment_grpc_connections_refused_total{reason="limit"} 1"#),
        "{metrics}"
    );

    drop(second);
    // The slot is free once the server has seen the connection close.
    let mut open = None;
    for _ in 0..200 {
        open = open_connections(&scrape(app.metrics_addr).await);
        if open == Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open, Some(1), "the closed connection's slot is given back");
    let mut connection = RawConnection::connect(app.address).await;
    let answer = connection
        .unary(
            "/grpc.health.v1.Health/Check",
            &[],
            &crate::raw::encode(&HealthCheckRequest {
                service: "liveness".into(),
            }),
        )
        .await;
    assert_eq!(answer.status.code(), Code::Ok, "{:?}", answer.status);
}

#[sqlx::test]
async fn at_the_cap_a_new_client_takes_the_place_of_a_silent_connection(pool: PgPool) {
    // The test app's own channel holds one place; a silent connection the
    // other; a real client still gets in.
    let app = spawn_with(&pool, |settings| settings.max_connections = 2).await;
    let mut silent = TcpStream::connect(app.address).await.unwrap();
    let mut open = None;
    for _ in 0..200 {
        open = open_connections(&scrape(app.metrics_addr).await);
        if open == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open, Some(2));

    let mut client = RawConnection::connect(app.address).await;
    let answer = client
        .unary(
            "/grpc.health.v1.Health/Check",
            &[],
            &crate::raw::encode(&HealthCheckRequest {
                service: "liveness".into(),
            }),
        )
        .await;
    assert_eq!(answer.status.code(), Code::Ok, "{:?}", answer.status);
    let closed_after = time_until_closed(&mut silent).await;
    println!("silent connection evicted after {closed_after:?}");
    let metrics = scrape(app.metrics_addr).await;
    assert!(
        metrics
            .contains(r#"channel_assignment_grpc_connections_refused_total{reason="evicted"} 1"#),
        "{metrics}"
    );
}

fn open_connections(metrics: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix("channel_assignment_grpc_connections ")?
            .parse()
            .ok()
    })
}

#[sqlx::test]
async fn watch_streams_per_connection_are_bounded(pool: PgPool) {
    let app = spawn_with(&pool, |settings| {
        settings.max_watch_streams_per_connection = 2;
    })
    .await;
    let mut health = HealthClient::new(app.channel.clone());
    let watch = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let first = health.watch(watch("liveness")).await.expect("first");
    let second = health.watch(watch("readiness")).await.expect("second");
    let status = health
        .watch(watch(""))
        .await
        .expect_err("a third on the same connection");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "RESOURCE_EXHAUSTED");

    drop(first);
    let mut third = None;
    for _ in 0..100 {
        if let Ok(watching) = health.watch(watch("")).await {
            third = Some(watching);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(third.is_some(), "the place comes back when a watch ends");
    drop(second);
}

#[sqlx::test]
async fn made_up_methods_add_no_metric_series(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    app.unassign_mailbox(ORG, "sales-agent").await.unwrap();
    let methods_before = method_labels(&scrape(app.metrics_addr).await);

    let mut connection = RawConnection::connect(app.address).await;
    let authorization = format!("Bearer {}", hs256_token(ORG));
    for i in 0..200 {
        let path = format!(
            "/channels.v1.ChannelAssignment/MadeUp{i}{}",
            "x".repeat(150)
        );
        // Half without credentials, half with.
        let headers: &[(&str, &str)] = if i % 2 == 0 {
            &[]
        } else {
            &[("authorization", authorization.as_str())]
        };
        let answer = connection.unary(&path, headers, &[]).await;
        let expected = if i % 2 == 0 {
            Code::Unauthenticated
        } else {
            Code::Unimplemented
        };
        assert_eq!(answer.status.code(), expected, "{:?}", answer.status);
        let info = answer.status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.domain, "channel-assignment");
        if i % 2 == 1 {
            assert_eq!(info.reason, "UNIMPLEMENTED");
        }
        assert!(
            !answer.status.message().contains("MadeUp"),
            "the name is not echoed: {:?}",
            answer.status
        );
    }

    let methods_after = method_labels(&scrape(app.metrics_addr).await);
    let added: Vec<_> = methods_after.difference(&methods_before).collect();
    assert_eq!(added, vec!["unknown"], "{methods_after:?}");
}

/// The distinct values of the `method` label in a scrape.
fn method_labels(metrics: &str) -> std::collections::BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.split_once("method=\"")?.1;
            Some(rest.split_once('"')?.0.to_owned())
        })
        .collect()
}

#[sqlx::test]
async fn undecodable_messages_are_invalid_arguments_with_details(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    insert_mailbox(&pool, ORG).await;
    let before = snapshot(&pool).await;
    let authorization = format!("Bearer {}", hs256_token(ORG));
    let mut connection = RawConnection::connect(app.address).await;

    for (case, payload) in [
        ("invalid wire type", vec![0xff, 0xff, 0xff]),
        (
            "invalid UTF-8 in agent_handle",
            vec![0x0a, 0x02, 0xff, 0xfe],
        ),
        ("truncated field", vec![0x0a, 0x10, b'a', b'b']),
    ] {
        let answer = connection
            .unary(
                "/channels.v1.ChannelAssignment/AssignMailbox",
                &[("authorization", authorization.as_str())],
                &payload,
            )
            .await;
        let status = assert_error(
            Err::<(), _>(answer.status),
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(field_violations(&status), ["request"], "{case}");
    }
    // Broken framing: a length prefix longer than the body, and a compressed
    // flag without an encoding.
    for (case, body) in [
        (
            "length prefix beyond the body",
            vec![0, 0, 0, 0, 100, 0x0a, 0x02],
        ),
        (
            "compressed without an encoding",
            vec![1, 0, 0, 0, 2, 0x0a, 0x00],
        ),
    ] {
        let (response, mut stream) = connection
            .open(
                "/channels.v1.ChannelAssignment/AssignMailbox",
                &[("authorization", authorization.as_str())],
            )
            .await
            .unwrap();
        stream.send_data(bytes::Bytes::from(body), true).unwrap();
        let response = response.await.unwrap();
        let status = tonic::Status::from_header_map(response.headers()).expect("trailers-only");
        let status = assert_error(
            Err::<(), _>(status),
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(field_violations(&status), ["request"], "{case}");
    }
    assert_eq!(snapshot(&pool).await, before);
}

#[sqlx::test]
async fn a_request_abandoned_mid_message_is_cancelled_not_internal(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let authorization = format!("Bearer {}", hs256_token(ORG));
    let mut connection = RawConnection::connect(app.address).await;
    let (_response, mut body) = connection
        .open(
            "/channels.v1.ChannelAssignment/UnassignMailbox",
            &[("authorization", authorization.as_str())],
        )
        .await
        .unwrap();
    // A frame that announces 100 bytes, 2 of them sent, then a reset.
    body.send_data(
        bytes::Bytes::from_static(&[0, 0, 0, 0, 100, 0x0a, 0x05]),
        false,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    body.send_reset(h2::Reason::CANCEL);

    let cancelled =
        r#"channel_assignment_rpc_requests_total{method="UnassignMailbox",code="CANCELLED"} 1"#;
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = scrape(app.metrics_addr).await;
        if metrics.contains(cancelled) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metrics.contains(cancelled), "{metrics}");
    assert!(!metrics.contains(r#"code="INTERNAL""#), "{metrics}");
}

#[sqlx::test]
async fn requests_beyond_the_server_wide_budget_are_refused_at_once(pool: PgPool) {
    let app = spawn_with(&pool, |settings| settings.max_streams_in_progress = 3).await;
    let liveness = crate::raw::encode(&HealthCheckRequest {
        service: "liveness".into(),
    });
    // Three streams whose bodies never come hold the whole budget, on
    // connections of their own.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut connection = RawConnection::connect(app.address).await;
        let stream = connection
            .open_without_body("/grpc.health.v1.Health/Check")
            .await
            .unwrap();
        held.push((connection, stream));
    }
    let mut other = RawConnection::connect(app.address).await;
    let mut refused = None;
    for _ in 0..100 {
        let answer = other
            .unary("/grpc.health.v1.Health/Check", &[], &liveness)
            .await;
        if answer.status.code() == Code::ResourceExhausted {
            refused = Some(answer.status);
            break;
        }
        // The held streams' headers may not have reached the server yet.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = refused.expect("refused while the budget is held");
    let info = refused.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "RESOURCE_EXHAUSTED");
    assert!(refused.get_details_retry_info().is_some());

    drop(held);
    let mut served = false;
    for _ in 0..100 {
        let answer = other
            .unary("/grpc.health.v1.Health/Check", &[], &liveness)
            .await;
        if answer.status.code() == Code::Ok {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "places come back when the held streams end");
    let metrics = scrape(app.metrics_addr).await;
    assert!(
        metrics.contains(r#"channel_assignment_rpc_shed_total{reason="streams"}"#),
        "{metrics}"
    );
}
