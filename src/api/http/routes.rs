//! The REST API's six operations: credentials and arguments from the
//! request, the same operation as the gRPC method of the same name, the
//! answer as the seed's JSON. Each `#[utoipa::path]` is both the route axum
//! serves (`utoipa_axum::routes!`) and its entry in `/openapi.json`, so the
//! two cannot differ.

use axum::{
    body::Body,
    extract::{RawQuery, State},
    response::{IntoResponse as _, Response},
};
use http::StatusCode;

use super::extract::{AgentHandlePath, HttpCall, body_field, list_query, read_body};
use super::json::{
    AssignMailboxRequest, AssignPhoneNumberRequest, Identity, ListIdentitiesResponse,
};
use super::{HttpState, error::ErrorBody, error::HttpError, json_response};
use crate::domain::ChannelKind;

/// The OpenAPI tag of every operation: the gRPC service they mirror.
pub const TAG: &str = "ChannelAssignment";

#[utoipa::path(
    post,
    path = "/identities/{agent_handle}/mailbox",
    operation_id = "AssignMailbox",
    tag = TAG,
    summary = "Link a mailbox to an identity",
    description = "Links the mailbox, replacing the identity's previous one (which stays, \
        unlinked). Linking the mailbox it already has changes nothing. The mailbox must \
        belong to the caller's organization and not be linked to another identity.",
    params(("agent_handle" = String, Path, description = "Handle of the identity; one leading @ is ignored",
        pattern = r"^@?[A-Za-z0-9._-]{1,255}$", example = "sales-agent")),
    request_body(content = AssignMailboxRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The identity, with the mailbox linked", body = Identity),
        (status = 401, description = "No usable credentials (UNAUTHENTICATED)", body = ErrorBody),
        (status = 403, description = "The credentials carry no valid organization id (ORGANIZATION_ID_MISSING)", body = ErrorBody),
        (status = 404, description = "No such identity or mailbox in the organization (IDENTITY_NOT_FOUND, MAILBOX_NOT_FOUND)", body = ErrorBody),
        (status = 409, description = "The mailbox is linked to another identity (MAILBOX_ALREADY_ASSIGNED)", body = ErrorBody),
        (status = 413, description = "The body is larger than 64 KiB (MESSAGE_TOO_LARGE)", body = ErrorBody),
        (status = 422, description = "Missing or malformed agent_handle or mailbox_id, or a body that is not a JSON object (INVALID_ARGUMENT)", body = ErrorBody),
        (status = 429, description = "Too many requests in flight (RESOURCE_EXHAUSTED); retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The database is unavailable (UNAVAILABLE); safe to retry", body = ErrorBody),
        (status = 504, description = "The deadline passed and nothing was changed (DEADLINE_EXCEEDED)", body = ErrorBody),
    ),
    security(("bearer" = []), ("trusted_header" = [])),
)]
pub async fn assign_mailbox(
    State(state): State<HttpState>,
    HttpCall(call): HttpCall,
    AgentHandlePath(handle): AgentHandlePath,
    body: Body,
) -> Result<Response, HttpError> {
    assign(&state, call, ChannelKind::Mailbox, &handle, body).await
}

#[utoipa::path(
    delete,
    path = "/identities/{agent_handle}/mailbox",
    operation_id = "UnassignMailbox",
    tag = TAG,
    summary = "Unlink the identity's mailbox",
    description = "Unlinks the identity's mailbox, if it has one; the mailbox is not deleted \
        and can be linked to another identity. An identity with no mailbox is answered 204 too.",
    params(("agent_handle" = String, Path, description = "Handle of the identity; one leading @ is ignored",
        pattern = r"^@?[A-Za-z0-9._-]{1,255}$", example = "support-agent")),
    responses(
        (status = 204, description = "The identity has no mailbox now"),
        (status = 401, description = "No usable credentials (UNAUTHENTICATED)", body = ErrorBody),
        (status = 403, description = "The credentials carry no valid organization id (ORGANIZATION_ID_MISSING)", body = ErrorBody),
        (status = 404, description = "No such identity in the organization (IDENTITY_NOT_FOUND)", body = ErrorBody),
        (status = 422, description = "Malformed agent_handle (INVALID_ARGUMENT)", body = ErrorBody),
        (status = 429, description = "Too many requests in flight (RESOURCE_EXHAUSTED); retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The database is unavailable (UNAVAILABLE); safe to retry", body = ErrorBody),
        (status = 504, description = "The deadline passed and nothing was changed (DEADLINE_EXCEEDED)", body = ErrorBody),
    ),
    security(("bearer" = []), ("trusted_header" = [])),
)]
pub async fn unassign_mailbox(
    State(state): State<HttpState>,
    HttpCall(call): HttpCall,
    AgentHandlePath(handle): AgentHandlePath,
) -> Result<Response, HttpError> {
    unassign(&state, call, ChannelKind::Mailbox, &handle).await
}

#[utoipa::path(
    post,
    path = "/identities/{agent_handle}/phone_number",
    operation_id = "AssignPhoneNumber",
    tag = TAG,
    summary = "Link a phone number to an identity",
    description = "Links the phone number, replacing the identity's previous one (which stays, \
        unlinked). Linking the number it already has changes nothing. The number must belong \
        to the caller's organization and not be linked to another identity.",
    params(("agent_handle" = String, Path, description = "Handle of the identity; one leading @ is ignored",
        pattern = r"^@?[A-Za-z0-9._-]{1,255}$", example = "sales-agent")),
    request_body(content = AssignPhoneNumberRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The identity, with the phone number linked", body = Identity),
        (status = 401, description = "No usable credentials (UNAUTHENTICATED)", body = ErrorBody),
        (status = 403, description = "The credentials carry no valid organization id (ORGANIZATION_ID_MISSING)", body = ErrorBody),
        (status = 404, description = "No such identity or phone number in the organization (IDENTITY_NOT_FOUND, PHONE_NUMBER_NOT_FOUND)", body = ErrorBody),
        (status = 409, description = "The phone number is linked to another identity (PHONE_NUMBER_ALREADY_ASSIGNED)", body = ErrorBody),
        (status = 413, description = "The body is larger than 64 KiB (MESSAGE_TOO_LARGE)", body = ErrorBody),
        (status = 422, description = "Missing or malformed agent_handle or phone_number_id, or a body that is not a JSON object (INVALID_ARGUMENT)", body = ErrorBody),
        (status = 429, description = "Too many requests in flight (RESOURCE_EXHAUSTED); retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The database is unavailable (UNAVAILABLE); safe to retry", body = ErrorBody),
        (status = 504, description = "The deadline passed and nothing was changed (DEADLINE_EXCEEDED)", body = ErrorBody),
    ),
    security(("bearer" = []), ("trusted_header" = [])),
)]
pub async fn assign_phone_number(
    State(state): State<HttpState>,
    HttpCall(call): HttpCall,
    AgentHandlePath(handle): AgentHandlePath,
    body: Body,
) -> Result<Response, HttpError> {
    assign(&state, call, ChannelKind::PhoneNumber, &handle, body).await
}

#[utoipa::path(
    delete,
    path = "/identities/{agent_handle}/phone_number",
    operation_id = "UnassignPhoneNumber",
    tag = TAG,
    summary = "Unlink the identity's phone number",
    description = "Unlinks the identity's phone number, if it has one; the number is not \
        released and can be linked to another identity. An identity with no number is \
        answered 204 too.",
    params(("agent_handle" = String, Path, description = "Handle of the identity; one leading @ is ignored",
        pattern = r"^@?[A-Za-z0-9._-]{1,255}$", example = "billing-agent")),
    responses(
        (status = 204, description = "The identity has no phone number now"),
        (status = 401, description = "No usable credentials (UNAUTHENTICATED)", body = ErrorBody),
        (status = 403, description = "The credentials carry no valid organization id (ORGANIZATION_ID_MISSING)", body = ErrorBody),
        (status = 404, description = "No such identity in the organization (IDENTITY_NOT_FOUND)", body = ErrorBody),
        (status = 422, description = "Malformed agent_handle (INVALID_ARGUMENT)", body = ErrorBody),
        (status = 429, description = "Too many requests in flight (RESOURCE_EXHAUSTED); retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The database is unavailable (UNAVAILABLE); safe to retry", body = ErrorBody),
        (status = 504, description = "The deadline passed and nothing was changed (DEADLINE_EXCEEDED)", body = ErrorBody),
    ),
    security(("bearer" = []), ("trusted_header" = [])),
)]
pub async fn unassign_phone_number(
    State(state): State<HttpState>,
    HttpCall(call): HttpCall,
    AgentHandlePath(handle): AgentHandlePath,
) -> Result<Response, HttpError> {
    unassign(&state, call, ChannelKind::PhoneNumber, &handle).await
}

#[utoipa::path(
    get,
    path = "/identities/{agent_handle}",
    operation_id = "GetIdentity",
    tag = TAG,
    summary = "Read an identity with its channels",
    description = "The full identity detail object, exactly as an assign returns it. A \
        deleted identity is not found.",
    params(("agent_handle" = String, Path, description = "Handle of the identity; one leading @ is ignored",
        pattern = r"^@?[A-Za-z0-9._-]{1,255}$", example = "support-agent")),
    responses(
        (status = 200, description = "The identity", body = Identity),
        (status = 401, description = "No usable credentials (UNAUTHENTICATED)", body = ErrorBody),
        (status = 403, description = "The credentials carry no valid organization id (ORGANIZATION_ID_MISSING)", body = ErrorBody),
        (status = 404, description = "No such identity in the organization (IDENTITY_NOT_FOUND)", body = ErrorBody),
        (status = 422, description = "Malformed agent_handle (INVALID_ARGUMENT)", body = ErrorBody),
        (status = 429, description = "Too many requests in flight (RESOURCE_EXHAUSTED); retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The database is unavailable (UNAVAILABLE); safe to retry", body = ErrorBody),
        (status = 504, description = "The deadline passed (DEADLINE_EXCEEDED)", body = ErrorBody),
    ),
    security(("bearer" = []), ("trusted_header" = [])),
)]
pub async fn get_identity(
    State(state): State<HttpState>,
    HttpCall(call): HttpCall,
    AgentHandlePath(handle): AgentHandlePath,
) -> Result<Response, HttpError> {
    let identity = state.operations.get_identity(&call, &handle).await?;
    Ok(json_response(StatusCode::OK, &Identity::from(identity)))
}

#[utoipa::path(
    get,
    path = "/identities",
    operation_id = "ListIdentities",
    tag = TAG,
    summary = "List the organization's identities",
    description = "The identities that are not deleted, ordered by agent_handle in byte order, \
        a page at a time. Paging while others write never repeats an identity and never skips \
        one that existed throughout.",
    params(
        ("page_size" = Option<i32>, Query, description = "Identities per page: 0 or absent means 50, above 1000 means 1000",
            minimum = 0, maximum = 2147483647, example = 2),
        ("page_token" = Option<String>, Query, description = "A previous page's next_page_token; absent or empty for the first page"),
    ),
    responses(
        (status = 200, description = "A page of identities", body = ListIdentitiesResponse),
        (status = 401, description = "No usable credentials (UNAUTHENTICATED)", body = ErrorBody),
        (status = 403, description = "The credentials carry no valid organization id (ORGANIZATION_ID_MISSING)", body = ErrorBody),
        (status = 422, description = "A negative or non-numeric page_size, or a page_token that was altered or issued for another organization (INVALID_ARGUMENT)", body = ErrorBody),
        (status = 429, description = "Too many requests in flight (RESOURCE_EXHAUSTED); retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The database is unavailable (UNAVAILABLE); safe to retry", body = ErrorBody),
        (status = 504, description = "The deadline passed (DEADLINE_EXCEEDED)", body = ErrorBody),
    ),
    security(("bearer" = []), ("trusted_header" = [])),
)]
pub async fn list_identities(
    State(state): State<HttpState>,
    HttpCall(call): HttpCall,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let (page_size, page_token) = list_query(query.as_deref())?;
    let listed = state
        .operations
        .list_identities(&call, page_size, &page_token)
        .await?;
    let page = ListIdentitiesResponse {
        identities: listed.items.into_iter().map(Into::into).collect(),
        next_page_token: listed.next_page_token,
    };
    Ok(json_response(StatusCode::OK, &page))
}

async fn assign(
    state: &HttpState,
    call: crate::operations::Call,
    kind: ChannelKind,
    handle: &str,
    body: Body,
) -> Result<Response, HttpError> {
    let body = read_body(body, &call, state.request_timeout).await?;
    let channel_id = body_field(&body, kind.id_field())?;
    let identity = state
        .operations
        .assign(&call, kind, handle, &channel_id)
        .await?;
    Ok(json_response(StatusCode::OK, &Identity::from(identity)))
}

async fn unassign(
    state: &HttpState,
    call: crate::operations::Call,
    kind: ChannelKind,
    handle: &str,
) -> Result<Response, HttpError> {
    state.operations.unassign(&call, kind, handle).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
