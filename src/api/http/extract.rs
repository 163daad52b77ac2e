//! From an HTTP request to what the operations take: the caller and its
//! deadline (`HttpCall`), the path's handle, the body's one field, the
//! list's query. Only the HTTP framing is checked here (is the body JSON, is
//! the field a string, is `page_size` a number); every rule about the
//! values themselves is the operations' (`operations::assign` …), the same
//! for both transports.

use std::time::Duration;

use axum::{
    body::Body,
    extract::{FromRequestParts, Path},
};
use bytes::Bytes;
use http::request::Parts;
use http_body_util::{BodyExt as _, Limited};
use tonic::metadata::MetadataMap;

use super::{HttpState, MAX_BODY_SIZE, error::HttpError};
use crate::error::{FieldViolation, ServiceError};
use crate::operations::{
    Call,
    deadline::{Arrival, parse_grpc_timeout},
};

/// The client's deadline, in `grpc-timeout`'s format (`100m`, `5S`): the
/// header grpc-gateway also takes, so a caller behind either gets the same
/// behaviour. Without it, the server's `REQUEST_TIMEOUT` applies.
pub const TIMEOUT_HEADER: &str = "grpc-timeout";

/// The call as the operations know it, from the request's credentials
/// (checked first: 401 and 403 come before anything about the arguments),
/// its arrival and its deadline.
pub struct HttpCall(pub Call);

impl FromRequestParts<HttpState> for HttpCall {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &HttpState,
    ) -> Result<Self, Self::Rejection> {
        // The same check as gRPC's interceptor, on the same headers; lent
        // to it without a copy.
        let metadata = MetadataMap::from_headers(std::mem::take(&mut parts.headers));
        let caller = state.authenticator.caller(&metadata);
        parts.headers = metadata.into_headers();
        let caller = caller?;
        tracing::Span::current().record("organization", caller.organization.as_str());
        let arrived = parts
            .extensions
            .get::<Arrival>()
            .map_or_else(tokio::time::Instant::now, |arrival| arrival.0);
        let client_timeout = parts
            .headers
            .get(TIMEOUT_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout);
        Ok(Self(Call {
            organization: caller.organization,
            actor: caller.subject.as_deref().unwrap_or_default().to_owned(),
            arrived,
            client_timeout,
        }))
    }
}

/// The `{agent_handle}` of the path, percent-decoded, as sent: its rules
/// are the operation's.
pub struct AgentHandlePath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for AgentHandlePath {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Fails only when the decoded segment is not UTF-8.
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(handle)| Self(handle))
            .map_err(|_| {
                HttpError(invalid(
                    "agent_handle",
                    "agent_handle may contain only ASCII letters, digits, '.', '_' and '-'",
                ))
            })
    }
}

/// The request body, at most `MAX_BODY_SIZE` bytes, read by the call's
/// deadline: a body that does not come in time is answered like any late
/// request (nothing was done), not waited for.
pub async fn read_body(
    body: Body,
    call: &Call,
    request_timeout: Duration,
) -> Result<Bytes, ServiceError> {
    let timeout = call
        .client_timeout
        .map_or(request_timeout, |client| client.min(request_timeout));
    let collected = tokio::time::timeout_at(
        call.arrived + timeout,
        Limited::new(body, MAX_BODY_SIZE).collect(),
    )
    .await
    .map_err(|_late| ServiceError::DeadlineExceeded)?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            Err(ServiceError::MessageTooLarge(MAX_BODY_SIZE))
        }
        // The client went away, or broke the framing, mid-body.
        Err(_) => Err(ServiceError::RequestAbandoned),
    }
}

/// The one string field an assign body carries (`mailbox_id` or
/// `phone_number_id`), as sent. An empty body, a missing field and `null`
/// all mean "not given", which the operation reports as required, exactly
/// as for a gRPC request that leaves the field unset. Other fields are
/// ignored.
pub fn body_field(body: &[u8], field: &'static str) -> Result<String, ServiceError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(String::new());
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|error| invalid("body", format!("the body is not valid JSON: {error}")))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(invalid(
            "body",
            format!("the body must be a JSON object with {field}"),
        ));
    };
    match object.remove(field) {
        None | Some(serde_json::Value::Null) => Ok(String::new()),
        Some(serde_json::Value::String(text)) => Ok(text),
        Some(_) => Err(invalid(field, format!("{field} must be a string"))),
    }
}

/// `page_size` and `page_token` of `GET /identities`; absent means the
/// default (0 and none), as an unset field does over gRPC. An empty
/// `page_token` is the first page; an empty `page_size` is not a number.
pub fn list_query(query: Option<&str>) -> Result<(i32, String), ServiceError> {
    let mut page_size = 0;
    let mut page_token = String::new();
    let mut violations = Vec::new();
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "page_size" => match value.parse::<i32>() {
                Ok(size) => page_size = size,
                Err(_) => violations.push(FieldViolation {
                    field: "page_size",
                    description: "page_size must be an integer (32 bits)".to_owned(),
                }),
            },
            "page_token" => page_token = value.into_owned(),
            _ => {}
        }
    }
    if violations.is_empty() {
        Ok((page_size, page_token))
    } else {
        Err(ServiceError::InvalidArgument(violations))
    }
}

fn invalid(field: &'static str, description: impl Into<String>) -> ServiceError {
    ServiceError::InvalidArgument(vec![FieldViolation {
        field,
        description: description.into(),
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(error: ServiceError) -> &'static str {
        match error {
            ServiceError::InvalidArgument(violations) => violations[0].field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_absent_field_is_left_to_the_operation() {
        for body in [
            "",
            "  \n",
            "{}",
            r#"{"mailbox_id": null}"#,
            r#"{"other": 1}"#,
        ] {
            assert_eq!(
                body_field(body.as_bytes(), "mailbox_id").unwrap(),
                "",
                "{body:?}"
            );
        }
        assert_eq!(
            body_field(br#"{"mailbox_id": "x", "more": [1]}"#, "mailbox_id").unwrap(),
            "x"
        );
    }

    #[test]
    fn bodies_that_are_not_json_objects_or_have_wrong_types_are_refused() {
        for body in ["{", "mailbox_id=x", "[]", "\"x\"", "7", "null"] {
            let error = body_field(body.as_bytes(), "mailbox_id").unwrap_err();
            assert_eq!(field_of(error), "body", "{body:?}");
        }
        for body in [
            r#"{"mailbox_id": 7}"#,
            r#"{"mailbox_id": {}}"#,
            r#"{"mailbox_id": ["x"]}"#,
            r#"{"mailbox_id": true}"#,
        ] {
            let error = body_field(body.as_bytes(), "mailbox_id").unwrap_err();
            assert_eq!(field_of(error), "mailbox_id", "{body:?}");
        }
    }

    #[test]
    fn list_queries() {
        assert_eq!(list_query(None).unwrap(), (0, String::new()));
        assert_eq!(list_query(Some("page_token=")).unwrap(), (0, String::new()));
        assert_eq!(
            list_query(Some("page_size=2&page_token=a%2Bb&other=1")).unwrap(),
            (2, "a+b".to_owned())
        );
        assert_eq!(list_query(Some("page_size=-1")).unwrap().0, -1);
        for bad in [
            "page_size=x",
            "page_size=2147483648",
            "page_size=1.5",
            "page_size=",
        ] {
            assert_eq!(field_of(list_query(Some(bad)).unwrap_err()), "page_size");
        }
    }
}
