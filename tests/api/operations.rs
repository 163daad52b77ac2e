//! Health, reflection, an unreachable database, deadlines and shutdown.

use std::time::Duration;

use channel_assignment::{config::AuthSettings, store::database::Database};
use sqlx::{PgPool, postgres::PgConnectOptions};
use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::*;

const SERVICE_NAME: &str = "channels.v1.ChannelAssignment";

async fn check(app: &TestApp, service: &str) -> Result<ServingStatus, tonic::Status> {
    let response = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// An app whose database cannot be reached: a port nothing listens on.
async fn spawn_app_without_database() -> TestApp {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut settings = test_settings(AuthSettings::hs256(SECRET));
    settings.database.database_acquire_timeout = Duration::from_millis(500);
    let options = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(closed_port)
        .username("postgres");
    let database = Database::new(options, &settings.database).unwrap();
    spawn_app_on(database, settings).await
}

#[sqlx::test]
async fn health_follows_the_database_and_needs_no_token(pool: PgPool) {
    let app = spawn_app(&pool).await;

    wait_for(&app, "", ServingStatus::Serving).await;
    for service in ["", SERVICE_NAME, "readiness", "liveness"] {
        assert_eq!(
            check(&app, service).await.unwrap(),
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let unknown = check(&app, "no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[sqlx::test]
async fn an_unreachable_database_is_unavailable_but_the_process_stays_live() {
    let app = spawn_app_without_database().await;

    for service in ["", SERVICE_NAME, "readiness"] {
        assert_eq!(
            check(&app, service).await.unwrap(),
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    assert_eq!(
        check(&app, "liveness").await.unwrap(),
        ServingStatus::Serving
    );

    let status = assert_error(
        app.assign_mailbox(ORG, "sales-agent", &uuid::Uuid::new_v4().to_string())
            .await,
        Code::Unavailable,
        "UNAVAILABLE",
    );
    assert!(
        !status.message().contains("127.0.0.1"),
        "no connection details: {status:?}"
    );
    assert_error(
        app.unassign_phone_number(ORG, "sales-agent").await,
        Code::Unavailable,
        "UNAVAILABLE",
    );
}

#[sqlx::test]
async fn invalid_requests_are_refused_before_any_query() {
    // Without a database, an answer other than UNAVAILABLE proves no query ran.
    let app = spawn_app_without_database().await;

    assert_error(
        app.assign_mailbox(ORG, "", "nope").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_error(
        app.unassign_mailbox(ORG, "a b").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let mut client = app.client.clone();
    let anonymous = client
        .unassign_mailbox(channel_assignment::proto::UnassignMailboxRequest {
            agent_handle: "x".into(),
        })
        .await;
    assert_error(anonymous, Code::Unauthenticated, "UNAUTHENTICATED");
}

#[sqlx::test]
async fn reflection_v1_and_v1alpha_describe_the_service_without_a_token(pool: PgPool) {
    let app = spawn_app(&pool).await;

    let v1_services = {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new(app.channel.clone())
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection v1")
            .into_inner();
        match responses
            .next()
            .await
            .expect("a response")
            .expect("ok")
            .message_response
        {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("unexpected reflection answer {other:?}"),
        }
    };
    assert!(
        v1_services.contains(&SERVICE_NAME.to_owned()),
        "{v1_services:?}"
    );
    assert!(
        v1_services.contains(&"grpc.health.v1.Health".to_owned()),
        "{v1_services:?}"
    );
    assert!(
        v1_services.contains(&"channels.v1.ChannelInventory".to_owned()),
        "{v1_services:?}"
    );

    // grpcurl 1.8 asks v1alpha, and needs the service's file to call it.
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            SERVICE_NAME.to_owned(),
        )),
    };
    let mut responses = ServerReflectionClient::new(app.channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    match responses
        .next()
        .await
        .expect("a response")
        .expect("ok")
        .message_response
    {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            assert!(!files.file_descriptor_proto.is_empty());
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[sqlx::test]
async fn a_client_deadline_bounds_the_database_work(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    let before = snapshot(&pool).await;

    let lock = lock_identity(&pool, "sales-agent").await;
    let mut request = authorized(
        channel_assignment::proto::AssignMailboxRequest {
            agent_handle: "sales-agent".into(),
            mailbox_id: mailbox.clone(),
        },
        ORG,
    );
    request.set_timeout(Duration::from_millis(300));
    // The statement was sent and waits for the lock, so when the answer is
    // due nobody knows yet whether it will commit: the server does not claim
    // DEADLINE_EXCEEDED (which promises that nothing changed) but waits for
    // the outcome, and the call ends at the deadline without a verdict
    // (tonic's "Timeout expired").
    let status = app
        .client
        .clone()
        .assign_mailbox(request)
        .await
        .expect_err("the deadline passes first");
    assert_eq!(
        (status.code(), status.message()),
        (Code::Cancelled, "Timeout expired"),
        "{status:?}"
    );

    // The server counts the deadline from the request's arrival, a little
    // after the client started its clock, so the lock is held on clearly past
    // it; once the statement has the lock, it must not write after its
    // deadline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.rollback().await.unwrap();
    wait_until_quiet(&pool).await;
    assert_eq!(snapshot(&pool).await, before);

    app.assign_mailbox(ORG, "sales-agent", &mailbox)
        .await
        .expect("the service works on");
}

#[sqlx::test]
async fn the_request_timeout_is_deadline_exceeded_and_writes_nothing(pool: PgPool) {
    let mut settings = test_settings(AuthSettings::hs256(SECRET));
    settings.request_timeout = Duration::from_millis(300);
    let app = spawn_app_with_settings(&pool, settings).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let linked = insert_mailbox(&pool, ORG).await.to_string();
    let other = insert_mailbox(&pool, ORG).await.to_string();
    app.assign_mailbox(ORG, "sales-agent", &linked)
        .await
        .expect("linked");
    let before = snapshot(&pool).await;

    let lock = lock_identity(&pool, "sales-agent").await;
    let (assign, unassign) = tokio::join!(
        app.assign_mailbox(ORG, "sales-agent", &other),
        app.unassign_mailbox(ORG, "sales-agent"),
    );
    assert_error(assign, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    assert_error(unassign, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    lock.rollback().await.unwrap();
    wait_until_quiet(&pool).await;

    assert_eq!(
        snapshot(&pool).await,
        before,
        "still linked to the first mailbox"
    );
}

#[sqlx::test]
async fn shutdown_reports_not_serving_and_finishes_in_flight_rpcs(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    wait_for(&app, "", ServingStatus::Serving).await;
    let mut watch = HealthClient::new(app.channel.clone())
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    // An RPC in flight when the shutdown starts: it waits on a row lock.
    let lock = lock_identity(&pool, "sales-agent").await;
    let in_flight = spawn_assign_mailbox(app.channel.clone(), "sales-agent", mailbox);
    // The statement waits for the lock: the RPC is in flight for sure.
    wait_until_blocked(&pool).await;

    let stopped = tokio::spawn(app.stop());
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    lock.rollback().await.unwrap();

    let identity = in_flight
        .await
        .unwrap()
        .expect("the in-flight RPC completes");
    assert!(identity.into_inner().mailbox.is_some());
    drop(watch);
    stopped.await.expect("the server stops");
}
