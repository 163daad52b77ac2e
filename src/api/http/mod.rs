//! HTTP/JSON: the seed's REST API on `HTTP_LISTEN_ADDR`, over the same
//! operations as gRPC (`routes`), with the same error table rendered as
//! JSON (`error`), the seed's JSON (`json`), the per-request log line and
//! metrics (`observe`), and the listener with its bounds and drain
//! (`server`). `GET /openapi.json` serves the OpenAPI 3.1 document that the
//! route declarations generate.

pub mod error;
pub mod extract;
pub mod json;
pub mod observe;
pub mod routes;
pub mod server;

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use axum::{
    Router,
    response::{IntoResponse as _, Response},
};
use http::{HeaderValue, Method, StatusCode, header};
use serde::Serialize;
use utoipa::{
    Modify, OpenApi,
    openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::Authenticator;
use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::operations::Operations;
use error::HttpError;

/// Largest request body read; the real ones are under a hundred bytes.
/// The same bound as a gRPC message.
pub const MAX_BODY_SIZE: usize = 64 * 1024;

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/openapi.json";

/// What every handler needs, shared (one `Arc` clone per request).
#[derive(Clone)]
pub struct HttpState(Arc<StateInner>);

pub struct StateInner {
    pub operations: Operations,
    pub authenticator: Arc<Authenticator>,
    /// The longest a request may take (a shorter client deadline wins).
    pub request_timeout: Duration,
}

impl std::ops::Deref for HttpState {
    type Target = StateInner;

    fn deref(&self) -> &StateInner {
        &self.0
    }
}

impl HttpState {
    pub fn new(
        operations: Operations,
        authenticator: Arc<Authenticator>,
        request_timeout: Duration,
    ) -> Self {
        Self(Arc::new(StateInner {
            operations,
            authenticator,
            request_timeout,
        }))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "channel-assignment",
        description = "Links communication channels (one mailbox, one phone number) to AI-agent \
            identities of an organization: the seed's REST API, served by the same code as the \
            gRPC service channels.v1.ChannelAssignment. Errors carry the gRPC code, the \
            ErrorInfo reason and the google.rpc details as JSON.",
        license(name = "MIT", identifier = "MIT"),
    ),
    tags((name = "ChannelAssignment", description = "Link and unlink an identity's channels, and read identities")),
    modifiers(&SecuritySchemes),
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A JWT whose org_id claim names the caller's organization (HS256, or \
                         RS*/PS*/ES*/EdDSA with the configured public key).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "trusted_header",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "x-organization-id",
                "Only when the server runs with AUTH_TRUSTED_HEADER=true behind a gateway that \
                 authenticated the caller; a bearer token sent with it must name the same \
                 organization.",
            ))),
        );
    }
}

/// The routes and their document, from the same declarations.
fn api() -> OpenApiRouter<HttpState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(routes::assign_mailbox, routes::unassign_mailbox))
        .routes(routes!(
            routes::assign_phone_number,
            routes::unassign_phone_number
        ))
        .routes(routes!(routes::get_identity))
        .routes(routes!(routes::list_identities))
}

/// The OpenAPI 3.1 document of the REST API.
pub fn openapi() -> &'static utoipa::openapi::OpenApi {
    static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> =
        LazyLock::new(|| api().split_for_parts().1);
    &DOCUMENT
}

/// `GET /openapi.json`, serialized once.
async fn openapi_json() -> Response {
    static JSON: LazyLock<Vec<u8>> =
        LazyLock::new(|| serde_json::to_vec(openapi()).unwrap_or_default());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        JSON.as_slice(),
    )
        .into_response()
}

/// The REST API's router: the six operations, `/openapi.json`, and the
/// contract's refusals for anything else (404 for an unknown path, 405 for
/// a method a path does not take, each with the JSON error body).
pub fn router(state: HttpState, metrics: Arc<Metrics>) -> Router {
    let (routes, _) = api().split_for_parts();
    routes
        .route(OPENAPI_PATH, axum::routing::get(openapi_json))
        .method_not_allowed_fallback(|| async { HttpError(ServiceError::MethodNotAllowed) })
        .fallback(|| async { HttpError(ServiceError::UnknownPath) })
        .route_layer(axum::middleware::from_fn(observe::name_operation))
        .layer(axum::middleware::from_fn_with_state(
            observe::Observer::new(metrics),
            observe::observe,
        ))
        .with_state(state)
}

/// Every documented operation: (method, path template, `operationId`).
static OPERATIONS: LazyLock<Vec<(Method, String, String)>> = LazyLock::new(|| {
    let mut operations = Vec::new();
    for (path, item) in &openapi().paths.paths {
        let methods = [
            (Method::GET, &item.get),
            (Method::POST, &item.post),
            (Method::DELETE, &item.delete),
            (Method::PUT, &item.put),
            (Method::PATCH, &item.patch),
        ];
        for (method, operation) in methods {
            if let Some(id) = operation.as_ref().and_then(|o| o.operation_id.clone()) {
                operations.push((method, path.clone(), id));
            }
        }
    }
    operations
});

/// The operation a documented (method, path template) names: its
/// `operationId`, which is the gRPC method's name.
pub fn operation_id(method: &Method, path: &str) -> Option<&'static str> {
    OPERATIONS
        .iter()
        .find(|(known_method, known_path, _)| known_method == method && known_path == path)
        .map(|(_, _, id)| id.as_str())
}

/// Each documented operation with the status it answers when it succeeds
/// (a DELETE has no body: 204), so that its metric series exist from the
/// first scrape.
pub fn documented_operations() -> impl Iterator<Item = (&'static str, u16)> {
    OPERATIONS.iter().map(|(method, _, id)| {
        let status = if method == Method::DELETE { 204 } else { 200 };
        (id.as_str(), status)
    })
}

/// `value` as a JSON response with `status`.
pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(error) => HttpError(ServiceError::Internal(error.into())).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_the_six_operations_named_as_the_rpcs() {
        let document = serde_json::to_value(openapi()).unwrap();
        assert_eq!(document["openapi"], "3.1.0");
        let mut operations: Vec<(String, String, String)> = Vec::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                if let Some(id) = operation.get("operationId") {
                    operations.push((
                        method.clone(),
                        path.clone(),
                        id.as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
        operations.sort();
        let expected = [
            (
                "delete",
                "/identities/{agent_handle}/mailbox",
                "UnassignMailbox",
            ),
            (
                "delete",
                "/identities/{agent_handle}/phone_number",
                "UnassignPhoneNumber",
            ),
            ("get", "/identities", "ListIdentities"),
            ("get", "/identities/{agent_handle}", "GetIdentity"),
            (
                "post",
                "/identities/{agent_handle}/mailbox",
                "AssignMailbox",
            ),
            (
                "post",
                "/identities/{agent_handle}/phone_number",
                "AssignPhoneNumber",
            ),
        ]
        .map(|(m, p, i)| (m.to_owned(), p.to_owned(), i.to_owned()));
        assert_eq!(operations, expected);
        assert_eq!(
            operation_id(&Method::POST, "/identities/{agent_handle}/mailbox"),
            Some("AssignMailbox")
        );
        assert_eq!(operation_id(&Method::PUT, "/identities"), None);
    }

    /// The proto's google.api.http rules (what a transcoder would serve)
    /// are exactly the routes this server serves.
    #[test]
    fn the_proto_http_rules_are_the_routes() {
        let pool = prost_reflect::DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let http = pool
            .get_extension_by_name("google.api.http")
            .expect("google.api.http is in the descriptor set");
        let mut rules = Vec::new();
        for service in pool.services() {
            for method in service.methods() {
                let options = method.options();
                if !options.has_extension(&http) {
                    continue;
                }
                let rule = options.get_extension(&http);
                let rule = rule.as_message().expect("an HttpRule");
                let (verb, path) = ["get", "post", "delete", "put", "patch"]
                    .into_iter()
                    .find_map(|verb| {
                        rule.has_field_by_name(verb).then(|| {
                            let path = rule.get_field_by_name(verb).unwrap();
                            (verb, path.as_str().unwrap().to_owned())
                        })
                    })
                    .expect("a verb");
                let body = rule
                    .get_field_by_name("body")
                    .and_then(|body| body.as_str().map(str::to_owned))
                    .unwrap_or_default();
                rules.push((verb.to_owned(), path, method.name().to_owned(), body == "*"));
            }
        }
        rules.sort();

        let document = serde_json::to_value(openapi()).unwrap();
        let mut routes = Vec::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for (verb, operation) in item.as_object().unwrap() {
                routes.push((
                    verb.clone(),
                    path.clone(),
                    operation["operationId"].as_str().unwrap().to_owned(),
                    operation.get("requestBody").is_some(),
                ));
            }
        }
        routes.sort();
        assert_eq!(rules, routes);
        assert_eq!(rules.len(), 6);
    }
}
