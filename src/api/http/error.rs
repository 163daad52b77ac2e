//! The error table (`error::ServiceError::report`) rendered as the REST
//! API's error body:
//!
//! ```json
//! {"error": {"code": 404, "status": "NOT_FOUND", "reason": "IDENTITY_NOT_FOUND",
//!            "message": "identity 'x' not found", "details": [ … ]}}
//! ```
//!
//! `details` holds the same rich details gRPC sends in
//! `grpc-status-details-bin`, in the same order, each in the protobuf JSON
//! mapping of its `google.rpc` message (`@type`, lowerCamelCase fields,
//! defaults omitted), as Google's own REST APIs and grpc-gateway write them.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tonic::Code;
use tonic_types::{BadRequest, ErrorDetails, ErrorInfo, ResourceInfo, RetryInfo};
use utoipa::ToSchema;

use crate::error::{ServiceError, code_name};

/// A refusal on its way to the caller.
#[derive(Debug)]
pub struct HttpError(pub ServiceError);

impl From<ServiceError> for HttpError {
    fn from(error: ServiceError) -> Self {
        Self(error)
    }
}

/// The gRPC code of an error response, for the request's log line and
/// metrics (a response extension; successes carry none).
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub Code);

/// The error body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorObject {
    /// The HTTP status.
    #[schema(example = 404)]
    pub code: u16,
    /// The gRPC code's name.
    #[schema(example = "NOT_FOUND")]
    pub status: &'static str,
    /// `ErrorInfo.reason`: stable and machine-readable.
    #[schema(example = "IDENTITY_NOT_FOUND")]
    pub reason: &'static str,
    /// Short and human; never SQL, internals, or other organizations' data.
    pub message: String,
    /// The rich details (`google.rpc.ErrorInfo`, `BadRequest`,
    /// `ResourceInfo`, `RetryInfo`) in the protobuf JSON mapping.
    #[schema(value_type = Vec<Object>)]
    pub details: Vec<Value>,
}

/// What an overloaded server asks callers to wait, in whole seconds as
/// `Retry-After` has them (the `RetryInfo` detail says it exactly).
const RETRY_AFTER_SECONDS: &str = "1";

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let report = self.0.report();
        let status =
            StatusCode::from_u16(report.http_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error: ErrorObject {
                code: status.as_u16(),
                status: code_name(report.code),
                reason: report.reason,
                message: report.message,
                details: details_json(&report.details),
            },
        };
        let mut response = super::json_response(status, &body);
        let headers = response.headers_mut();
        match status {
            // RFC 6750 §3.
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::TOO_MANY_REQUESTS => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECONDS),
                );
            }
            _ => {}
        }
        response.extensions_mut().insert(ErrorCode(report.code));
        response
    }
}

/// The details in the order tonic encodes them into `google.rpc.Status`.
fn details_json(details: &ErrorDetails) -> Vec<Value> {
    let mut rendered = Vec::new();
    if let Some(retry_info) = details.retry_info() {
        rendered.push(retry_info_json(retry_info));
    }
    if let Some(error_info) = details.error_info() {
        rendered.push(error_info_json(error_info));
    }
    if let Some(bad_request) = details.bad_request() {
        rendered.push(bad_request_json(bad_request));
    }
    if let Some(resource_info) = details.resource_info() {
        rendered.push(resource_info_json(resource_info));
    }
    rendered
}

fn typed(type_url: &str, fields: Map<String, Value>) -> Value {
    let mut object = Map::with_capacity(fields.len() + 1);
    object.insert("@type".to_owned(), Value::from(type_url));
    object.extend(fields);
    Value::Object(object)
}

/// Protobuf JSON leaves out fields that hold their default.
fn put_text(fields: &mut Map<String, Value>, name: &str, value: &str) {
    if !value.is_empty() {
        fields.insert(name.to_owned(), Value::from(value));
    }
}

fn error_info_json(info: &ErrorInfo) -> Value {
    let mut fields = Map::new();
    put_text(&mut fields, "reason", &info.reason);
    put_text(&mut fields, "domain", &info.domain);
    if !info.metadata.is_empty() {
        // Sorted, so that the body is the same from one call to the next.
        let metadata: std::collections::BTreeMap<_, _> = info.metadata.iter().collect();
        fields.insert("metadata".to_owned(), json!(metadata));
    }
    typed(ErrorInfo::TYPE_URL, fields)
}

fn bad_request_json(bad_request: &BadRequest) -> Value {
    let violations: Vec<Value> = bad_request
        .field_violations
        .iter()
        .map(|violation| {
            let mut fields = Map::new();
            put_text(&mut fields, "field", &violation.field);
            put_text(&mut fields, "description", &violation.description);
            put_text(&mut fields, "reason", &violation.reason);
            Value::Object(fields)
        })
        .collect();
    let mut fields = Map::new();
    if !violations.is_empty() {
        fields.insert("fieldViolations".to_owned(), Value::Array(violations));
    }
    typed(BadRequest::TYPE_URL, fields)
}

fn resource_info_json(info: &ResourceInfo) -> Value {
    let mut fields = Map::new();
    put_text(&mut fields, "resourceType", &info.resource_type);
    put_text(&mut fields, "resourceName", &info.resource_name);
    put_text(&mut fields, "owner", &info.owner);
    put_text(&mut fields, "description", &info.description);
    typed(ResourceInfo::TYPE_URL, fields)
}

fn retry_info_json(info: &RetryInfo) -> Value {
    let mut fields = Map::new();
    if let Some(delay) = info.retry_delay {
        fields.insert("retryDelay".to_owned(), Value::from(duration_json(delay)));
    }
    typed(RetryInfo::TYPE_URL, fields)
}

/// `google.protobuf.Duration` in JSON: seconds with 0, 3, 6 or 9 fractional
/// digits and an `s` suffix.
fn duration_json(duration: std::time::Duration) -> String {
    let seconds = duration.as_secs();
    let nanos = duration.subsec_nanos();
    if nanos == 0 {
        format!("{seconds}s")
    } else if nanos.is_multiple_of(1_000_000) {
        format!("{seconds}.{:03}s", nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        format!("{seconds}.{:06}s", nanos / 1_000)
    } else {
        format!("{seconds}.{nanos:09}s")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn durations_as_protobuf_json_writes_them() {
        assert_eq!(duration_json(Duration::from_millis(250)), "0.250s");
        assert_eq!(duration_json(Duration::from_secs(3)), "3s");
        assert_eq!(duration_json(Duration::from_micros(1_000_001)), "1.000001s");
        assert_eq!(duration_json(Duration::from_nanos(5)), "0.000000005s");
    }

    #[test]
    fn every_detail_of_the_grpc_status_is_rendered() {
        let report = ServiceError::InvalidArgument(vec![crate::error::FieldViolation {
            field: "mailbox_id",
            description: "mailbox_id is required".to_owned(),
        }])
        .report();
        let rendered = details_json(&report.details);
        assert_eq!(
            rendered,
            vec![
                json!({
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "INVALID_ARGUMENT",
                    "domain": "channel-assignment",
                    "metadata": {"http_status": "422"},
                }),
                json!({
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [
                        {"field": "mailbox_id", "description": "mailbox_id is required"}
                    ],
                }),
            ]
        );
        // As many details as the gRPC status carries.
        let status = tonic::Status::from(ServiceError::Overloaded);
        let grpc = tonic_types::StatusExt::get_error_details_vec(&status);
        let http = details_json(&ServiceError::Overloaded.report().details);
        assert_eq!(grpc.len(), http.len());
        assert_eq!(http[0]["retryDelay"], "0.250s");
    }
}
