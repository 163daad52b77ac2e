//! The REST API over real HTTP/1.1: every path and every status of the
//! contract's table, the seed's JSON, the error body, and that a refused
//! request changes nothing in the database.

use std::time::Duration;

use channel_assignment::config::AuthSettings;
use http::Method;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use uuid::Uuid;

use crate::for_each_kind;
use crate::helpers::*;
use crate::http_client::*;

fn kind_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Mailbox => "mailbox",
        Kind::PhoneNumber => "phone_number",
    }
}

fn assign_body(kind: Kind, id: &str) -> String {
    json!({ kind.id_field(): id }).to_string()
}

fn assert_rfc3339(value: &Value) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("a string: {value}"));
    assert!(
        chrono::DateTime::parse_from_rfc3339(text).is_ok() && text.ends_with('Z'),
        "RFC 3339 in UTC: {text}"
    );
}

for_each_kind!(
    assign_and_unassign_answer_as_the_seed_documents,
    refusals_change_nothing,
);

async fn assign_and_unassign_answer_as_the_seed_documents(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    let identity_id = insert_identity(&pool, ORG, "sales-agent").await;
    let channel = kind.insert(&pool, ORG).await;
    let path = format!("/identities/sales-agent/{}", kind_path(kind));

    let linked = app
        .http(Req::post(&path, assign_body(kind, &channel.to_string())).for_org(ORG))
        .await;
    assert_eq!(
        linked.status,
        200,
        "{}",
        String::from_utf8_lossy(&linked.body)
    );
    assert_eq!(
        linked.headers.get("content-type").unwrap(),
        "application/json"
    );
    let identity = linked.json();
    assert_eq!(identity["id"], identity_id.to_string());
    assert_eq!(identity["organization_id"], ORG);
    assert_eq!(identity["agent_handle"], "sales-agent");
    assert_eq!(identity["display_name"], "Test sales-agent");
    assert_eq!(identity["status"], "active");
    assert_rfc3339(&identity["created_at"]);
    assert_rfc3339(&identity["updated_at"]);
    let (linked_key, unlinked_key) = match kind {
        Kind::Mailbox => ("mailbox", "phone_number"),
        Kind::PhoneNumber => ("phone_number", "mailbox"),
    };
    // The other channel is there, as null.
    assert_eq!(identity.get(unlinked_key), Some(&Value::Null));
    let channel_json = &identity[linked_key];
    assert_eq!(channel_json["id"], channel.to_string());
    assert_eq!(channel_json["status"], "active");
    assert_rfc3339(&channel_json["created_at"]);
    assert_rfc3339(&channel_json["updated_at"]);
    match kind {
        Kind::Mailbox => {
            assert!(
                channel_json["email_address"]
                    .as_str()
                    .unwrap()
                    .contains('@')
            );
            assert_eq!(channel_json["display_name"], "Inbox");
        }
        Kind::PhoneNumber => {
            assert!(
                channel_json["number"]
                    .as_str()
                    .unwrap()
                    .starts_with("+1415")
            );
            assert_eq!(channel_json["type"], "local");
            assert_eq!(channel_json["incoming_call_action"], Value::Null);
        }
    }
    assert_eq!(
        kind.linked_to(&pool, ORG, "sales-agent").await,
        Some(channel)
    );

    // Idempotent: the same answer, nothing changed (not even updated_at).
    let again = app
        .http(Req::post(&path, assign_body(kind, &channel.to_string())).for_org(ORG))
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json(), identity);

    // GET answers exactly what the assign did; a leading @ names the same.
    let read = app
        .http(Req::get("/identities/@sales-agent").for_org(ORG))
        .await;
    assert_eq!(read.status, 200);
    assert_eq!(read.json(), identity);

    let unlinked = app.http(Req::delete(&path).for_org(ORG)).await;
    assert_eq!(unlinked.status, 204);
    assert!(unlinked.body.is_empty(), "204 has no body");
    assert!(unlinked.headers.get("content-type").is_none());
    assert_eq!(kind.linked_to(&pool, ORG, "sales-agent").await, None);
    // The channel is kept, free.
    assert_eq!(kind.holders(&pool, channel).await, 0);
    let read = app
        .http(Req::get("/identities/sales-agent").for_org(ORG))
        .await;
    assert_eq!(read.json()[linked_key], Value::Null);

    // Nothing linked: 204 all the same.
    let again = app.http(Req::delete(&path).for_org(ORG)).await;
    assert_eq!(again.status, 204);
    assert!(again.body.is_empty());
}

/// Every refusal of the table over HTTP, each with the error body, and the
/// database exactly as it was.
async fn refusals_change_nothing(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    insert_identity(&pool, ORG, "holder").await;
    insert_identity(&pool, ORG, "gone").await;
    set_identity_status(&pool, ORG, "gone", "deleted").await;
    insert_identity(&pool, OTHER_ORG, "foreign").await;
    let held = kind.insert(&pool, ORG).await;
    kind.assign(&app, ORG, "holder", &held.to_string())
        .await
        .unwrap();
    let free = kind.insert(&pool, ORG).await.to_string();
    let foreign = kind.insert(&pool, OTHER_ORG).await.to_string();
    let removed = kind.insert(&pool, ORG).await;
    kind.set_status(&pool, removed, kind.gone_status()).await;
    let missing = Uuid::new_v4().to_string();
    let field = kind.id_field();
    let segment_of = kind_path(kind);
    let post = |handle: &str, body: String| {
        Req::post(
            format!("/identities/{}/{segment_of}", segment(handle)),
            body,
        )
    };
    let no_org = sign_hs256(&json!({ "exp": now() + 600 }), SECRET);
    let expired = sign_hs256(&json!({ "org_id": ORG, "exp": now() - 600 }), SECRET);

    let before = snapshot(&pool).await;
    let rows: Vec<(Req, u16, &str, &str)> = vec![
        (
            post("sales-agent", assign_body(kind, &free)),
            401,
            "UNAUTHENTICATED",
            "UNAUTHENTICATED",
        ),
        (
            post("sales-agent", assign_body(kind, &free)).bearer("not.a.token"),
            401,
            "UNAUTHENTICATED",
            "UNAUTHENTICATED",
        ),
        (
            post("sales-agent", assign_body(kind, &free)).bearer(&expired),
            401,
            "UNAUTHENTICATED",
            "UNAUTHENTICATED",
        ),
        (
            post("sales-agent", assign_body(kind, &free)).bearer(&no_org),
            403,
            "PERMISSION_DENIED",
            "ORGANIZATION_ID_MISSING",
        ),
        (
            post("nobody", assign_body(kind, &free)).for_org(ORG),
            404,
            "NOT_FOUND",
            "IDENTITY_NOT_FOUND",
        ),
        (
            post("gone", assign_body(kind, &free)).for_org(ORG),
            404,
            "NOT_FOUND",
            "IDENTITY_NOT_FOUND",
        ),
        (
            post("foreign", assign_body(kind, &free)).for_org(ORG),
            404,
            "NOT_FOUND",
            "IDENTITY_NOT_FOUND",
        ),
        (
            post("sales-agent", assign_body(kind, &missing)).for_org(ORG),
            404,
            "NOT_FOUND",
            kind.not_found_reason(),
        ),
        (
            post("sales-agent", assign_body(kind, &foreign)).for_org(ORG),
            404,
            "NOT_FOUND",
            kind.not_found_reason(),
        ),
        (
            post("sales-agent", assign_body(kind, &removed.to_string())).for_org(ORG),
            404,
            "NOT_FOUND",
            kind.not_found_reason(),
        ),
        (
            post("sales-agent", assign_body(kind, &held.to_string())).for_org(ORG),
            409,
            "ALREADY_EXISTS",
            kind.already_assigned_reason(),
        ),
        (
            post("sales-agent", assign_body(kind, "not-a-uuid")).for_org(ORG),
            422,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            post("sales-agent", "{}".to_owned()).for_org(ORG),
            422,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            post("sales-agent", String::new()).for_org(ORG),
            422,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            post("sales-agent", json!({ field: 42 }).to_string()).for_org(ORG),
            422,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            post("sales-agent", format!("{{\"{field}\": ")).for_org(ORG),
            422,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            post("sales-agent", format!("[\"{free}\"]")).for_org(ORG),
            422,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            post("bad handle!", assign_body(kind, &free)).for_org(ORG),
            422,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            post(&"x".repeat(256), assign_body(kind, &free)).for_org(ORG),
            422,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            post(
                "sales-agent",
                format!("{{\"pad\": \"{}\"}}", "x".repeat(70_000)),
            )
            .for_org(ORG),
            413,
            "OUT_OF_RANGE",
            "MESSAGE_TOO_LARGE",
        ),
        (
            Req::delete(format!("/identities/nobody/{segment_of}")).for_org(ORG),
            404,
            "NOT_FOUND",
            "IDENTITY_NOT_FOUND",
        ),
        (
            Req::delete(format!("/identities/foreign/{segment_of}")).for_org(ORG),
            404,
            "NOT_FOUND",
            "IDENTITY_NOT_FOUND",
        ),
        (
            Req::delete(format!("/identities/{}/{segment_of}", segment("a b"))).for_org(ORG),
            422,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            Req::delete(format!("/identities/holder/{segment_of}")),
            401,
            "UNAUTHENTICATED",
            "UNAUTHENTICATED",
        ),
        (
            Req::new(Method::PUT, format!("/identities/holder/{segment_of}")).for_org(ORG),
            405,
            "UNIMPLEMENTED",
            "METHOD_NOT_ALLOWED",
        ),
        (
            Req::new(Method::PATCH, format!("/identities/holder/{segment_of}")).for_org(ORG),
            405,
            "UNIMPLEMENTED",
            "METHOD_NOT_ALLOWED",
        ),
        (
            Req::get(format!("/identities/holder/{segment_of}/extra")).for_org(ORG),
            404,
            "NOT_FOUND",
            "PATH_NOT_FOUND",
        ),
    ];
    for (request, status, code, reason) in rows {
        let described = format!("{} {}", request.method, request.path);
        let response = app.http(request).await;
        assert_eq!(
            response.status,
            status,
            "{described}: {}",
            String::from_utf8_lossy(&response.body)
        );
        response.assert_error(status, code, reason);
        assert_eq!(snapshot(&pool).await, before, "{described} changed nothing");
    }

    // What was refused, and why, in the details.
    let both_wrong = app
        .http(post("bad handle!", assign_body(kind, "nope")).for_org(ORG))
        .await;
    assert_eq!(both_wrong.violated_fields(), ["agent_handle", field]);
    let wrong_type = app
        .http(post("sales-agent", json!({ field: [1] }).to_string()).for_org(ORG))
        .await;
    assert_eq!(wrong_type.violated_fields(), [field]);
    let not_json = app
        .http(post("sales-agent", "mailbox_id=1".to_owned()).for_org(ORG))
        .await;
    assert_eq!(not_json.violated_fields(), ["body"]);
    let missing_identity = app
        .http(post("nobody", assign_body(kind, &free)).for_org(ORG))
        .await
        .error();
    let resource = missing_identity["details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.ResourceInfo")
        .expect("ResourceInfo for NOT_FOUND")
        .clone();
    assert_eq!(resource["resourceType"], "channels.v1.Identity");
    assert_eq!(resource["resourceName"], "nobody");
    // Another organization's channel is answered like one that does not
    // exist: the same body but for the id the caller sent.
    let foreign_body = app
        .http(post("sales-agent", assign_body(kind, &foreign)).for_org(ORG))
        .await
        .body;
    let missing_body = app
        .http(post("sales-agent", assign_body(kind, &missing)).for_org(ORG))
        .await
        .body;
    assert_eq!(
        String::from_utf8(foreign_body)
            .unwrap()
            .replace(&foreign, "ID"),
        String::from_utf8(missing_body)
            .unwrap()
            .replace(&missing, "ID")
    );
    assert_eq!(snapshot(&pool).await, before);
}

#[sqlx::test]
async fn reads_and_pages(pool: PgPool) {
    let app = spawn_app(&pool).await;
    for handle in ["c-agent", "a-agent", "b-agent", "gone"] {
        insert_identity(&pool, ORG, handle).await;
    }
    set_identity_status(&pool, ORG, "gone", "deleted").await;
    insert_identity(&pool, OTHER_ORG, "foreign").await;

    let first = app
        .http(Req::get("/identities?page_size=2").for_org(ORG))
        .await;
    assert_eq!(first.status, 200);
    let first = first.json();
    let handles = |page: &Value| -> Vec<String> {
        page["identities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["agent_handle"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(handles(&first), ["a-agent", "b-agent"]);
    let token = first["next_page_token"].as_str().unwrap().to_owned();
    assert!(!token.is_empty());
    let second = app
        .http(
            Req::get(format!(
                "/identities?page_size=2&page_token={}",
                segment(&token)
            ))
            .for_org(ORG),
        )
        .await
        .json();
    assert_eq!(handles(&second), ["c-agent"]);
    assert_eq!(second["next_page_token"], "");
    // Absent parameters, or an empty token, are the defaults.
    for path in [
        "/identities",
        "/identities?page_token=",
        "/identities?page_size=0",
    ] {
        let all = app.http(Req::get(path).for_org(ORG)).await.json();
        assert_eq!(handles(&all), ["a-agent", "b-agent", "c-agent"], "{path}");
    }
    // Each list item is the detail object GET returns.
    let read = app
        .http(Req::get("/identities/a-agent").for_org(ORG))
        .await
        .json();
    assert_eq!(first["identities"][0], read);

    let before = snapshot(&pool).await;
    for (path, field) in [
        ("/identities?page_size=-1", "page_size"),
        ("/identities?page_size=two", "page_size"),
        ("/identities?page_size=", "page_size"),
        ("/identities?page_size=99999999999", "page_size"),
        ("/identities?page_token=garbage", "page_token"),
    ] {
        let response = app.http(Req::get(path).for_org(ORG)).await;
        response.assert_error(422, "INVALID_ARGUMENT", "INVALID_ARGUMENT");
        assert_eq!(response.violated_fields(), [field], "{path}");
    }
    // A token issued to another organization is refused there.
    let foreign = app
        .http(Req::get(format!("/identities?page_token={}", segment(&token))).for_org(OTHER_ORG))
        .await;
    foreign.assert_error(422, "INVALID_ARGUMENT", "INVALID_ARGUMENT");
    for handle in ["gone", "foreign", "nobody"] {
        app.http(Req::get(format!("/identities/{handle}")).for_org(ORG))
            .await
            .assert_error(404, "NOT_FOUND", "IDENTITY_NOT_FOUND");
    }
    app.http(Req::get("/identities/a%20b").for_org(ORG))
        .await
        .assert_error(422, "INVALID_ARGUMENT", "INVALID_ARGUMENT");
    app.http(Req::get("/identities"))
        .await
        .assert_error(401, "UNAUTHENTICATED", "UNAUTHENTICATED");
    app.http(Req::new(Method::POST, "/identities").for_org(ORG))
        .await
        .assert_error(405, "UNIMPLEMENTED", "METHOD_NOT_ALLOWED");
    app.http(Req::new(Method::DELETE, "/identities/a-agent").for_org(ORG))
        .await
        .assert_error(405, "UNIMPLEMENTED", "METHOD_NOT_ALLOWED");
    assert_eq!(snapshot(&pool).await, before);
}

#[sqlx::test]
async fn unauthenticated_refusals_say_how_to_authenticate(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let response = app.http(Req::get("/identities/x")).await;
    response.assert_error(401, "UNAUTHENTICATED", "UNAUTHENTICATED");
    assert_eq!(response.headers.get("www-authenticate").unwrap(), "Bearer");
    let oversized = "x".repeat(9000);
    app.http(Req::get("/identities/x").bearer(&oversized))
        .await
        .assert_error(401, "UNAUTHENTICATED", "UNAUTHENTICATED");
    // Headers beyond 32 KiB are refused by HTTP itself.
    let huge = app
        .http(Req::get("/identities/x").header("x-padding", &"x".repeat(40_000)))
        .await;
    assert_eq!(huge.status, 431);
}

#[sqlx::test]
async fn wrong_methods_and_unknown_paths(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let not_allowed = app
        .http(Req::new(Method::PUT, "/identities/x/mailbox"))
        .await;
    not_allowed.assert_error(405, "UNIMPLEMENTED", "METHOD_NOT_ALLOWED");
    assert_eq!(not_allowed.headers.get("allow").unwrap(), "POST,DELETE");
    for path in [
        "/",
        "/identities/x/fax",
        "/v1/identities",
        "/identities/x/mailbox/y",
    ] {
        app.http(Req::get(path).for_org(ORG)).await.assert_error(
            404,
            "NOT_FOUND",
            "PATH_NOT_FOUND",
        );
    }
}

/// The router serves exactly what the OpenAPI document lists: every
/// documented operation is routed, every other method on its paths is 405.
#[sqlx::test]
async fn the_openapi_document_is_the_router(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let response = app.http(Req::get("/openapi.json")).await;
    assert_eq!(response.status, 200);
    assert_eq!(
        response.headers.get("content-type").unwrap(),
        "application/json"
    );
    let document = response.json();
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 4);
    let mut operations = 0;
    for (template, item) in paths {
        let concrete = template.replace("{agent_handle}", "no-such-agent");
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            let request = Req::new(method.parse().unwrap(), &concrete)
                .for_org(ORG)
                .body("{}");
            let response = app.http(request).await;
            let reason = if response.status >= 400 {
                response.error()["reason"].clone()
            } else {
                Value::Null
            };
            if item.get(method.to_lowercase()).is_some() {
                operations += 1;
                assert!(
                    reason != "METHOD_NOT_ALLOWED" && reason != "PATH_NOT_FOUND",
                    "{method} {template} is documented and routed: {reason}"
                );
                assert!(
                    item[method.to_lowercase()]["responses"]
                        .get(response.status.to_string())
                        .is_some(),
                    "{method} {template}: {} is documented",
                    response.status
                );
            } else {
                assert_eq!(reason, "METHOD_NOT_ALLOWED", "{method} {template}");
            }
        }
    }
    assert_eq!(operations, 6);
}

#[sqlx::test]
async fn the_trusted_header_works_over_http_as_over_grpc(pool: PgPool) {
    let app = spawn_app_with(
        &pool,
        AuthSettings {
            trusted_header: true,
            ..AuthSettings::hs256(SECRET)
        },
    )
    .await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    let response = app
        .http(
            Req::post(
                "/identities/sales-agent/mailbox",
                assign_body(Kind::Mailbox, &mailbox),
            )
            .header("x-organization-id", ORG),
        )
        .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["mailbox"]["id"], mailbox);
    let before = snapshot(&pool).await;
    let conflicting = app
        .http(
            Req::delete("/identities/sales-agent/mailbox")
                .header("x-organization-id", ORG)
                .for_org(OTHER_ORG),
        )
        .await;
    conflicting.assert_error(403, "PERMISSION_DENIED", "ORGANIZATION_ID_MISSING");
    app.http(Req::get("/identities/sales-agent").header("x-organization-id", "bad org!"))
        .await
        .assert_error(403, "PERMISSION_DENIED", "ORGANIZATION_ID_MISSING");
    assert_eq!(snapshot(&pool).await, before);
}

/// 429: over the organization's share, at once, with Retry-After and
/// RetryInfo; nothing done.
#[sqlx::test]
async fn overload_is_429_with_retry_after(pool: PgPool) {
    let mut settings = test_settings(AuthSettings::hs256(SECRET));
    settings.max_concurrent_requests_per_organization = 0;
    let app = spawn_app_with_settings(&pool, settings).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    let before = snapshot(&pool).await;
    let response = app
        .http_assign(
            "mailbox",
            "sales-agent",
            &assign_body(Kind::Mailbox, &mailbox),
        )
        .await;
    let error = response.assert_error(429, "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED");
    assert_eq!(response.headers.get("retry-after").unwrap(), "1");
    let retry = error["details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
        .expect("RetryInfo")
        .clone();
    assert_eq!(retry["retryDelay"], "0.250s");
    assert_eq!(snapshot(&pool).await, before);
}

/// 503 when the database cannot be reached; arguments are still checked
/// first (422 proves no query ran).
#[sqlx::test]
async fn an_unreachable_database_is_503(pool: PgPool) {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let app = spawn_app_via_port(&pool, closed_port, |settings| {
        settings.database.database_acquire_timeout = Duration::from_millis(500);
    })
    .await;
    let response = app
        .http_assign(
            "mailbox",
            "sales-agent",
            &assign_body(Kind::Mailbox, &Uuid::new_v4().to_string()),
        )
        .await;
    let error = response.assert_error(503, "UNAVAILABLE", "UNAVAILABLE");
    assert!(!error["message"].as_str().unwrap().contains("127.0.0.1"));
    app.http(Req::get("/identities").for_org(ORG))
        .await
        .assert_error(503, "UNAVAILABLE", "UNAVAILABLE");
    app.http_assign("mailbox", "sales-agent", "{\"mailbox_id\": \"x\"}")
        .await
        .assert_error(422, "INVALID_ARGUMENT", "INVALID_ARGUMENT");
}

/// 504: the client's deadline (grpc-timeout, as grpc-gateway takes it)
/// passes while the identity is locked; nothing was changed.
#[sqlx::test]
async fn a_passed_deadline_is_504_and_changes_nothing(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    let before = snapshot(&pool).await;
    let lock = lock_identity(&pool, "sales-agent").await;
    let response = app
        .http(
            Req::post(
                "/identities/sales-agent/mailbox",
                assign_body(Kind::Mailbox, &mailbox),
            )
            .for_org(ORG)
            .header("grpc-timeout", "200m"),
        )
        .await;
    response.assert_error(504, "DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED");
    lock.rollback().await.unwrap();
    wait_until_quiet(&pool).await;
    assert_eq!(snapshot(&pool).await, before);
}

/// A body that never comes is not waited for past the deadline.
#[sqlx::test]
async fn a_body_that_never_arrives_is_504(pool: PgPool) {
    let mut settings = test_settings(AuthSettings::hs256(SECRET));
    settings.request_timeout = Duration::from_millis(500);
    let app = spawn_app_with_settings(&pool, settings).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mut stream = tokio::net::TcpStream::connect(app.http_addr).await.unwrap();
    let head = format!(
        "POST /identities/sales-agent/mailbox HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"mailbox_id\"",
        hs256_token(ORG)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut response = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut response))
        .await
        .expect("answered without the rest of the body")
        .unwrap();
    let response = String::from_utf8_lossy(&response[..read]);
    assert!(response.starts_with("HTTP/1.1 504"), "{response}");
    assert!(response.contains("DEADLINE_EXCEEDED"), "{response}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[sqlx::test]
async fn keep_alive_serves_many_requests_on_one_connection(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    let mut connection = Connection::open(app.http_addr).await;
    for _ in 0..3 {
        let linked = connection
            .send(
                &Req::post(
                    "/identities/sales-agent/mailbox",
                    assign_body(Kind::Mailbox, &mailbox),
                )
                .for_org(ORG),
            )
            .await;
        assert_eq!(linked.status, 200);
        let unlinked = connection
            .send(&Req::delete("/identities/sales-agent/mailbox").for_org(ORG))
            .await;
        assert_eq!(unlinked.status, 204);
        // A refusal does not close the connection either.
        let refused = connection.send(&Req::get("/identities/x")).await;
        assert_eq!(refused.status, 401);
    }
}

/// Past the connection limit a new connection is closed at once; the open
/// ones keep being served.
#[sqlx::test]
async fn connections_are_capped(pool: PgPool) {
    let mut settings = test_settings(AuthSettings::hs256(SECRET));
    settings.max_connections = 2;
    let app = spawn_app_with_settings(&pool, settings).await;
    let mut first = Connection::open(app.http_addr).await;
    let mut second = Connection::open(app.http_addr).await;
    assert_eq!(first.send(&Req::get("/openapi.json")).await.status, 200);
    assert_eq!(second.send(&Req::get("/openapi.json")).await.status, 200);
    let mut third = tokio::net::TcpStream::connect(app.http_addr).await.unwrap();
    let _ = third
        .write_all(b"GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut buffer = [0; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buffer))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(first.send(&Req::get("/openapi.json")).await.status, 200);
}

/// SIGTERM: the request in flight is answered, then the server stops; a
/// new connection is refused once it drains.
#[sqlx::test]
async fn shutdown_finishes_the_request_in_flight(pool: PgPool) {
    let mut app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    let lock = lock_identity(&pool, "sales-agent").await;
    let address = app.http_addr;
    let in_flight = tokio::spawn(async move {
        Req::post(
            "/identities/sales-agent/mailbox",
            assign_body(Kind::Mailbox, &mailbox),
        )
        .for_org(ORG)
        .send(address)
        .await
    });
    wait_until_blocked(&pool).await;
    app.begin_shutdown();
    // Draining: new connections are no longer accepted.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(address).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the listener closes when the drain starts");
    lock.rollback().await.unwrap();
    let response = in_flight.await.unwrap();
    assert_eq!(response.status, 200, "the request in flight is answered");
    assert_eq!(
        response
            .headers
            .get("connection")
            .map(|v| v.to_str().unwrap()),
        Some("close")
    );
    app.stop().await;
}

#[sqlx::test]
async fn requests_are_counted_by_operation_code_and_status(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    app.http_assign(
        "mailbox",
        "sales-agent",
        &assign_body(Kind::Mailbox, &mailbox),
    )
    .await;
    app.http_assign("mailbox", "nobody", &assign_body(Kind::Mailbox, &mailbox))
        .await;
    app.http(Req::get("/no/such/path")).await;
    let text = crate::metrics::scrape(app.metrics_addr).await;
    for series in [
        r#"channel_assignment_http_requests_total{method="AssignMailbox",code="OK",status="200"} 1"#,
        r#"channel_assignment_http_requests_total{method="AssignMailbox",code="NOT_FOUND",status="404"} 1"#,
        r#"channel_assignment_http_requests_total{method="unknown",code="NOT_FOUND",status="404"} 1"#,
        r#"channel_assignment_http_request_duration_seconds_count{method="AssignMailbox"} 2"#,
        "channel_assignment_http_in_flight 0",
    ] {
        assert!(
            text.lines().any(|line| line == series),
            "{series} in\n{text}"
        );
    }
    // gRPC's series are gRPC's own: still at the zero they start at.
    let grpc_assign: Vec<&str> = text
        .lines()
        .filter(|line| {
            line.starts_with(r#"channel_assignment_rpc_requests_total{method="AssignMailbox""#)
        })
        .collect();
    assert_eq!(
        grpc_assign,
        [r#"channel_assignment_rpc_requests_total{method="AssignMailbox",code="OK"} 0"#],
        "{text}"
    );
}

/// Request headers must come within the header timeout (GRPC_HANDSHAKE_TIMEOUT):
/// a silent connection, one that trickles its headers, and an idle
/// keep-alive connection are all closed, not held.
#[sqlx::test]
async fn slow_or_idle_connections_are_closed(pool: PgPool) {
    let mut settings = test_settings(AuthSettings::hs256(SECRET));
    settings.handshake_timeout = Duration::from_millis(300);
    let app = spawn_app_with_settings(&pool, settings).await;

    let closed_within = |mut stream: tokio::net::TcpStream| async move {
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .expect("the server closes the connection");
        assert!(read.is_ok(), "{read:?}");
        (started.elapsed(), rest)
    };

    let silent = tokio::net::TcpStream::connect(app.http_addr).await.unwrap();
    let (after, _) = closed_within(silent).await;
    assert!(after < Duration::from_secs(2), "{after:?}");

    let mut trickling = tokio::net::TcpStream::connect(app.http_addr).await.unwrap();
    trickling
        .write_all(b"GET /openapi.json HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let (after, _) = closed_within(trickling).await;
    assert!(after < Duration::from_secs(2), "{after:?}");

    let mut idle = tokio::net::TcpStream::connect(app.http_addr).await.unwrap();
    idle.write_all(b"GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (after, answered) = closed_within(idle).await;
    assert!(
        String::from_utf8_lossy(&answered).starts_with("HTTP/1.1 200"),
        "answered, then closed when idle"
    );
    assert!(after < Duration::from_secs(2), "{after:?}");
}
