//! gRPC and HTTP give the same answer: for each request of a matrix (every
//! operation the REST API has, successes and each refusal of the table),
//! the same request goes over gRPC and then over HTTP, and the answers must
//! agree: the same identity (or page) on success; on refusal the same code,
//! reason, message, HTTP status and rich details; and the database as it was.

use channel_assignment::proto::{self, Identity};
use prost_types::Timestamp;
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use tonic::{Request, Status};
use tonic_types::StatusExt as _;
use uuid::Uuid;

use crate::helpers::*;
use crate::http_client::*;

#[derive(Clone)]
enum Credential {
    Org(&'static str),
    Nothing,
    Token(String),
}

#[derive(Clone)]
enum Op {
    Assign(Kind, String, String),
    Unassign(Kind, String),
    Get(String),
    List(i32, String),
}

/// A success in the REST API's terms, whichever transport gave it.
#[derive(Debug, PartialEq)]
enum Answer {
    Json(Value),
    NoContent,
}

impl Credential {
    fn attach<T>(&self, message: T) -> Request<T> {
        match self {
            Self::Org(org) => authorized(message, org),
            Self::Nothing => Request::new(message),
            Self::Token(token) => with_bearer(message, token),
        }
    }

    fn attach_http(&self, request: Req) -> Req {
        match self {
            Self::Org(org) => request.for_org(org),
            Self::Nothing => request,
            Self::Token(token) => request.bearer(token),
        }
    }
}

fn kind_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Mailbox => "mailbox",
        Kind::PhoneNumber => "phone_number",
    }
}

async fn over_grpc(app: &TestApp, op: &Op, credential: &Credential) -> Result<Answer, Status> {
    let mut client = app.client.clone();
    match op.clone() {
        Op::Assign(Kind::Mailbox, agent_handle, mailbox_id) => client
            .assign_mailbox(credential.attach(proto::AssignMailboxRequest {
                agent_handle,
                mailbox_id,
            }))
            .await
            .map(|r| Answer::Json(identity_json(r.into_inner()))),
        Op::Assign(Kind::PhoneNumber, agent_handle, phone_number_id) => client
            .assign_phone_number(credential.attach(proto::AssignPhoneNumberRequest {
                agent_handle,
                phone_number_id,
            }))
            .await
            .map(|r| Answer::Json(identity_json(r.into_inner()))),
        Op::Unassign(Kind::Mailbox, agent_handle) => client
            .unassign_mailbox(credential.attach(proto::UnassignMailboxRequest { agent_handle }))
            .await
            .map(|_| Answer::NoContent),
        Op::Unassign(Kind::PhoneNumber, agent_handle) => client
            .unassign_phone_number(
                credential.attach(proto::UnassignPhoneNumberRequest { agent_handle }),
            )
            .await
            .map(|_| Answer::NoContent),
        Op::Get(agent_handle) => client
            .get_identity(credential.attach(proto::GetIdentityRequest { agent_handle }))
            .await
            .map(|r| Answer::Json(identity_json(r.into_inner()))),
        Op::List(page_size, page_token) => client
            .list_identities(credential.attach(proto::ListIdentitiesRequest {
                page_size,
                page_token,
            }))
            .await
            .map(|r| {
                let page = r.into_inner();
                Answer::Json(json!({
                    "identities": page.identities.into_iter().map(identity_json).collect::<Vec<_>>(),
                    "next_page_token": page.next_page_token,
                }))
            }),
    }
}

async fn over_http(app: &TestApp, op: &Op, credential: &Credential) -> HttpResponse {
    let request = match op {
        Op::Assign(kind, handle, id) => Req::post(
            format!("/identities/{}/{}", segment(handle), kind_path(*kind)),
            json!({ kind.id_field(): id }).to_string(),
        ),
        Op::Unassign(kind, handle) => Req::delete(format!(
            "/identities/{}/{}",
            segment(handle),
            kind_path(*kind)
        )),
        Op::Get(handle) => Req::get(format!("/identities/{}", segment(handle))),
        Op::List(page_size, page_token) => Req::get(format!(
            "/identities?page_size={page_size}&page_token={}",
            segment(page_token)
        )),
    };
    app.http(credential.attach_http(request)).await
}

/// The REST JSON of a gRPC identity, as the contract maps it: unset texts
/// are null, enums lowercase, timestamps RFC 3339 in UTC.
fn identity_json(identity: Identity) -> Value {
    let text = |value: String| {
        if value.is_empty() {
            Value::Null
        } else {
            Value::from(value)
        }
    };
    let status = identity.status().as_str_name().to_lowercase();
    json!({
        "id": identity.id,
        "organization_id": identity.organization_id,
        "agent_handle": identity.agent_handle,
        "display_name": text(identity.display_name),
        "status": status.trim_start_matches("identity_status_"),
        "mailbox": identity.mailbox.map(|mailbox| {
            let status = mailbox.status().as_str_name().to_lowercase();
            json!({
                "id": mailbox.id,
                "email_address": mailbox.email_address,
                "display_name": text(mailbox.display_name),
                "status": status.trim_start_matches("mailbox_status_"),
                "created_at": instant(mailbox.created_at),
                "updated_at": instant(mailbox.updated_at),
            })
        }),
        "phone_number": identity.phone_number.map(|number| {
            let status = number.status().as_str_name().to_lowercase();
            let number_type = number.r#type().as_str_name().to_lowercase();
            json!({
                "id": number.id,
                "number": number.number,
                "type": number_type.trim_start_matches("phone_number_type_"),
                "status": status.trim_start_matches("phone_number_status_"),
                "incoming_call_action": text(number.incoming_call_action),
                "created_at": instant(number.created_at),
                "updated_at": instant(number.updated_at),
            })
        }),
        "created_at": instant(identity.created_at),
        "updated_at": instant(identity.updated_at),
    })
}

/// A timestamp as `seconds.nanos`, to compare instants whatever their text.
fn instant(timestamp: Option<Timestamp>) -> Value {
    let timestamp = timestamp.expect("timestamps are always set");
    Value::from(format!("{}.{:09}", timestamp.seconds, timestamp.nanos))
}

/// The HTTP JSON with its RFC 3339 timestamps as instants.
fn normalized(value: Value) -> Value {
    match value {
        Value::Object(object) => Value::Object(
            object
                .into_iter()
                .map(|(key, value)| match (key.ends_with("_at"), &value) {
                    (true, Value::String(text)) => {
                        assert!(text.ends_with('Z'), "UTC: {text}");
                        let at = chrono::DateTime::parse_from_rfc3339(text)
                            .unwrap_or_else(|_| panic!("RFC 3339: {text}"));
                        let value = Value::from(format!(
                            "{}.{:09}",
                            at.timestamp(),
                            at.timestamp_subsec_nanos()
                        ));
                        (key, value)
                    }
                    _ => (key, normalized(value)),
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(normalized).collect()),
        other => other,
    }
}

/// The rich details of a gRPC status in protobuf JSON: what the REST
/// error body must carry.
fn grpc_details_json(status: &Status) -> Vec<Value> {
    let details = status.get_error_details();
    let mut rendered = Vec::new();
    let typed = |name: &str, fields: Map<String, Value>| {
        let mut object = Map::new();
        object.insert(
            "@type".into(),
            format!("type.googleapis.com/google.rpc.{name}").into(),
        );
        object.extend(fields.into_iter().filter(|(_, v)| v != ""));
        Value::Object(object)
    };
    if let Some(retry) = details.retry_info() {
        let delay = retry.retry_delay.expect("a delay");
        let mut fields = Map::new();
        fields.insert(
            "retryDelay".into(),
            format!("{}.{:03}s", delay.as_secs(), delay.subsec_millis()).into(),
        );
        rendered.push(typed("RetryInfo", fields));
    }
    if let Some(info) = details.error_info() {
        let mut fields = Map::new();
        fields.insert("reason".into(), info.reason.clone().into());
        fields.insert("domain".into(), info.domain.clone().into());
        fields.insert("metadata".into(), json!(info.metadata));
        rendered.push(typed("ErrorInfo", fields));
    }
    if let Some(bad_request) = details.bad_request() {
        let violations: Vec<Value> = bad_request
            .field_violations
            .iter()
            .map(|v| json!({"field": v.field, "description": v.description}))
            .collect();
        let mut fields = Map::new();
        fields.insert("fieldViolations".into(), violations.into());
        rendered.push(typed("BadRequest", fields));
    }
    if let Some(resource) = details.resource_info() {
        let mut fields = Map::new();
        fields.insert("resourceType".into(), resource.resource_type.clone().into());
        fields.insert("resourceName".into(), resource.resource_name.clone().into());
        fields.insert("owner".into(), resource.owner.clone().into());
        fields.insert("description".into(), resource.description.clone().into());
        rendered.push(typed("ResourceInfo", fields));
    }
    rendered
}

#[sqlx::test]
async fn grpc_and_http_give_the_same_answers(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    insert_identity(&pool, ORG, "support-agent").await;
    insert_identity(&pool, ORG, "billing-agent").await;
    insert_identity(&pool, ORG, "gone").await;
    set_identity_status(&pool, ORG, "gone", "deleted").await;
    insert_identity(&pool, OTHER_ORG, "foreign").await;
    insert_identity(&pool, OTHER_ORG, "foreign-2").await;
    let m1 = insert_mailbox(&pool, ORG).await.to_string();
    let m2 = insert_mailbox(&pool, ORG).await.to_string();
    let m_held = insert_mailbox(&pool, ORG).await.to_string();
    let m_deleted = insert_mailbox(&pool, ORG).await;
    Kind::Mailbox.set_status(&pool, m_deleted, "deleted").await;
    let m_foreign = insert_mailbox(&pool, OTHER_ORG).await.to_string();
    let p1 = insert_phone_number(&pool, ORG).await.to_string();
    let p_held = insert_phone_number(&pool, ORG).await.to_string();
    app.assign_mailbox(ORG, "support-agent", &m_held)
        .await
        .unwrap();
    app.assign_phone_number(ORG, "support-agent", &p_held)
        .await
        .unwrap();
    let foreign_token = app
        .list_identities(OTHER_ORG, 1, "")
        .await
        .unwrap()
        .next_page_token;
    assert!(!foreign_token.is_empty());

    use Credential::{Nothing, Org, Token};
    use Kind::{Mailbox as M, PhoneNumber as P};
    let assign = |kind, handle: &str, id: &str| Op::Assign(kind, handle.into(), id.into());
    let no_org = sign_hs256(&json!({ "exp": now() + 600 }), SECRET);
    let expired = sign_hs256(&json!({ "org_id": ORG, "exp": now() - 600 }), SECRET);
    let missing = Uuid::new_v4().to_string();
    let long_handle = "x".repeat(256);
    let rows: Vec<(Op, Credential)> = vec![
        (assign(M, "sales-agent", &m1), Org(ORG)),
        (assign(M, "sales-agent", &m1), Org(ORG)),
        (assign(M, "@sales-agent", &m2), Org(ORG)),
        (assign(M, "sales-agent", &m_held), Org(ORG)),
        (assign(M, "sales-agent", &m_foreign), Org(ORG)),
        (assign(M, "sales-agent", &missing), Org(ORG)),
        (assign(M, "sales-agent", &m_deleted.to_string()), Org(ORG)),
        (assign(M, "nobody", &m1), Org(ORG)),
        (assign(M, "gone", &m1), Org(ORG)),
        (assign(M, "foreign", &m1), Org(ORG)),
        (assign(M, "sales-agent", "nope"), Org(ORG)),
        (assign(M, "sales-agent", ""), Org(ORG)),
        (assign(M, "bad handle!", "nope"), Org(ORG)),
        (assign(M, &long_handle, &m1), Org(ORG)),
        (assign(M, "sales-agent", &m1), Nothing),
        (assign(M, "sales-agent", &m1), Token("not.a.token".into())),
        (assign(M, "sales-agent", &m1), Token(no_org.clone())),
        (assign(M, "sales-agent", &m1), Token(expired.clone())),
        (assign(M, "sales-agent", &m1), Org(OTHER_ORG)),
        (assign(P, "sales-agent", &p1), Org(ORG)),
        (assign(P, "sales-agent", &p_held), Org(ORG)),
        (assign(P, "sales-agent", "nope"), Org(ORG)),
        (assign(P, "nobody", &p1), Org(ORG)),
        (Op::Unassign(M, "sales-agent".into()), Org(ORG)),
        (Op::Unassign(M, "sales-agent".into()), Org(ORG)),
        (Op::Unassign(P, "nobody".into()), Org(ORG)),
        (Op::Unassign(M, "a b".into()), Org(ORG)),
        (Op::Unassign(P, "support-agent".into()), Nothing),
        (
            Op::Unassign(P, "support-agent".into()),
            Token(no_org.clone()),
        ),
        (Op::Get("support-agent".into()), Org(ORG)),
        (Op::Get("@sales-agent".into()), Org(ORG)),
        (Op::Get("gone".into()), Org(ORG)),
        (Op::Get("foreign".into()), Org(ORG)),
        (Op::Get("bad!".into()), Org(ORG)),
        (Op::Get("support-agent".into()), Token(expired)),
        (Op::List(2, String::new()), Org(ORG)),
        (Op::List(0, String::new()), Org(ORG)),
        (Op::List(5000, String::new()), Org(ORG)),
        (Op::List(-1, String::new()), Org(ORG)),
        (Op::List(0, "garbage".into()), Org(ORG)),
        (Op::List(0, foreign_token), Org(ORG)),
        (Op::List(-3, "garbage".into()), Org(ORG)),
        (Op::List(0, String::new()), Nothing),
    ];
    let mut successes = 0;
    let mut refusals = 0;
    for (index, (op, credential)) in rows.iter().enumerate() {
        let before = snapshot(&pool).await;
        let grpc = over_grpc(&app, op, credential).await;
        let http = over_http(&app, op, credential).await;
        let row = format!("row {index}");
        match grpc {
            Ok(answer) => {
                successes += 1;
                let http_answer = match http.status {
                    200 => Answer::Json(normalized(http.json())),
                    204 => {
                        assert!(http.body.is_empty(), "{row}");
                        Answer::NoContent
                    }
                    other => panic!(
                        "{row}: gRPC succeeded, HTTP {other}: {}",
                        String::from_utf8_lossy(&http.body)
                    ),
                };
                assert_eq!(http_answer, answer, "{row}");
                assert_eq!(
                    http.status,
                    if answer == Answer::NoContent {
                        204
                    } else {
                        200
                    },
                    "{row}"
                );
            }
            Err(status) => {
                refusals += 1;
                let error = http.error();
                let info = status
                    .get_details_error_info()
                    .unwrap_or_else(|| panic!("{row}: ErrorInfo in {status:?}"));
                assert_eq!(
                    http.status.to_string(),
                    info.metadata["http_status"],
                    "{row}: {error}"
                );
                assert_eq!(
                    error["status"],
                    channel_assignment::error::code_name(status.code()),
                    "{row}"
                );
                assert_eq!(error["reason"], info.reason, "{row}");
                assert_eq!(error["message"], status.message(), "{row}");
                assert_eq!(
                    error["details"].as_array().unwrap(),
                    &grpc_details_json(&status),
                    "{row}"
                );
                assert_eq!(snapshot(&pool).await, before, "{row} changed nothing");
            }
        }
    }
    assert!(
        successes >= 10 && refusals >= 25,
        "{successes} / {refusals}"
    );
}
