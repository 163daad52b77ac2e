//! The service's errors, and the one table that says, for each, its gRPC
//! code, HTTP status, `ErrorInfo.reason`, message and rich details
//! (`ServiceError::report`). Each transport renders that report in its own
//! terms: gRPC as a `tonic::Status` with `grpc-status-details-bin` (here),
//! HTTP as the JSON error body (`api::http::error`).

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::{AgentHandle, ChannelId, ChannelKind};

/// `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "channel-assignment";

/// What an overloaded server asks callers to wait before retrying.
const OVERLOAD_RETRY_DELAY_MS: u64 = 250;

/// One field of a request that is missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: &'static str,
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No usable credentials. The detail is safe to show the caller.
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    /// No single valid organization id. The detail says what is wrong with
    /// it and is safe to show the caller.
    #[error("the credentials carry no valid organization id: {0}")]
    OrganizationIdMissing(&'static str),
    /// The trusted header and the bearer token name different organizations.
    #[error("the credentials name two organizations")]
    ConflictingOrganizations,
    #[error("invalid argument")]
    InvalidArgument(Vec<FieldViolation>),
    #[error("identity not found")]
    IdentityNotFound(AgentHandle),
    #[error("{0:?} not found")]
    ChannelNotFound(ChannelKind, ChannelId),
    #[error("{0:?} is already assigned to another identity")]
    ChannelAlreadyAssigned(ChannelKind, ChannelId),
    /// A lookup found no such channel (by address or number: not echoed).
    #[error("{0:?} not found")]
    LookupNotFound(ChannelKind),
    /// The channel exists but no identity holds it.
    #[error("{0:?} is not assigned")]
    ChannelNotAssigned(ChannelKind),
    #[error("the e-mail address is used by another mailbox")]
    EmailAddressTaken,
    #[error("the number is used by another phone number")]
    PhoneNumberTaken,
    /// The credentials lack the scope the RPC needs.
    #[error("the credentials lack the {0} scope")]
    ScopeMissing(&'static str),
    /// Retention removed events after the reader's position: resuming would
    /// leave a gap.
    #[error("events after the given sequence were removed by retention")]
    EventsExpired,
    #[error("the request's deadline passed")]
    DeadlineExceeded,
    /// More requests in flight than the server takes: shed at once.
    #[error("too many requests in flight")]
    Overloaded,
    /// More requests of the caller's organization in flight than its share.
    #[error("too many requests of one organization in flight")]
    OrganizationOverloaded,
    /// More requests in progress, over all services, than the server holds.
    #[error("too many requests in progress on the server")]
    ServerBusy,
    /// More health `Watch` streams on one connection than it may hold.
    #[error("too many health watch streams on this connection")]
    TooManyWatchStreams,
    /// The client reset the stream or went away before its message arrived.
    #[error("the request ended before its message arrived")]
    RequestAbandoned,
    /// A request message over the size limit (refused by tonic).
    #[error("the request message is over {0} bytes")]
    MessageTooLarge(usize),
    /// A path under the service that names none of its methods.
    #[error("unknown method")]
    UnknownMethod,
    /// HTTP: a path the REST API does not have.
    #[error("unknown path")]
    UnknownPath,
    /// HTTP: a path the REST API has, with a method it does not take.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Any other refusal tonic made before the service ran: its code, and
    /// its message for the log only.
    #[error("transport error {0:?}: {1}")]
    Transport(Code, String),
    #[error("the database is unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The server is shutting down: a watch ends, to be resumed elsewhere.
    #[error("the server is draining")]
    Draining,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ServiceError {
    /// Maps a database error that has no meaning for the operation.
    pub fn from_database(error: sqlx::Error) -> Self {
        match DatabaseErrorClass::of(&error) {
            DatabaseErrorClass::Timeout => Self::DeadlineExceeded,
            // A serialization failure or deadlock still there after retries
            // is transient too: the caller may retry.
            DatabaseErrorClass::Unavailable | DatabaseErrorClass::Conflict => {
                Self::Unavailable(error)
            }
            DatabaseErrorClass::Privilege => Self::Internal(anyhow::Error::new(error).context(
                "the database role lacks a privilege the service needs (SQLSTATE 42501): \
                 run `channel-assignment migrate` with DATABASE_APP_ROLE naming this role",
            )),
            DatabaseErrorClass::Constraint | DatabaseErrorClass::Other => {
                Self::Internal(error.into())
            }
        }
    }

    /// The `ErrorInfo.reason`: stable, machine-readable, part of the contract.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            // No single valid organization id: the contract's 403 reason.
            Self::OrganizationIdMissing(_) | Self::ConflictingOrganizations => {
                "ORGANIZATION_ID_MISSING"
            }
            Self::InvalidArgument(_) => "INVALID_ARGUMENT",
            Self::IdentityNotFound(_) => "IDENTITY_NOT_FOUND",
            Self::ChannelNotFound(ChannelKind::Mailbox, _) => "MAILBOX_NOT_FOUND",
            Self::ChannelNotFound(ChannelKind::PhoneNumber, _) => "PHONE_NUMBER_NOT_FOUND",
            Self::ChannelAlreadyAssigned(ChannelKind::Mailbox, _) => "MAILBOX_ALREADY_ASSIGNED",
            Self::ChannelAlreadyAssigned(ChannelKind::PhoneNumber, _) => {
                "PHONE_NUMBER_ALREADY_ASSIGNED"
            }
            Self::LookupNotFound(ChannelKind::Mailbox) => "MAILBOX_NOT_FOUND",
            Self::LookupNotFound(ChannelKind::PhoneNumber) => "PHONE_NUMBER_NOT_FOUND",
            Self::ChannelNotAssigned(ChannelKind::Mailbox) => "MAILBOX_NOT_ASSIGNED",
            Self::ChannelNotAssigned(ChannelKind::PhoneNumber) => "PHONE_NUMBER_NOT_ASSIGNED",
            Self::EmailAddressTaken => "EMAIL_ADDRESS_ALREADY_EXISTS",
            Self::PhoneNumberTaken => "PHONE_NUMBER_ALREADY_EXISTS",
            Self::ScopeMissing(_) => "SCOPE_MISSING",
            Self::EventsExpired => "EVENTS_EXPIRED",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::Overloaded
            | Self::OrganizationOverloaded
            | Self::ServerBusy
            | Self::TooManyWatchStreams => "RESOURCE_EXHAUSTED",
            Self::Unavailable(_) | Self::Draining => "UNAVAILABLE",
            Self::Internal(_) => "INTERNAL",
            Self::RequestAbandoned => "CANCELLED",
            Self::MessageTooLarge(_) => "MESSAGE_TOO_LARGE",
            Self::UnknownMethod => "UNIMPLEMENTED",
            Self::UnknownPath => "PATH_NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::Transport(code, _) => code_name(*code),
        }
    }

    /// The gRPC code and the HTTP status of the REST origin.
    pub fn code_and_http_status(&self) -> (Code, u16) {
        match self {
            Self::Unauthenticated(_) => (Code::Unauthenticated, 401),
            Self::OrganizationIdMissing(_) | Self::ConflictingOrganizations => {
                (Code::PermissionDenied, 403)
            }
            Self::InvalidArgument(_) => (Code::InvalidArgument, 422),
            Self::IdentityNotFound(_)
            | Self::ChannelNotFound(..)
            | Self::LookupNotFound(_)
            | Self::ChannelNotAssigned(_) => (Code::NotFound, 404),
            Self::ChannelAlreadyAssigned(..) | Self::EmailAddressTaken | Self::PhoneNumberTaken => {
                (Code::AlreadyExists, 409)
            }
            Self::ScopeMissing(_) => (Code::PermissionDenied, 403),
            Self::EventsExpired => (Code::FailedPrecondition, 410),
            Self::DeadlineExceeded => (Code::DeadlineExceeded, 504),
            Self::Overloaded
            | Self::OrganizationOverloaded
            | Self::ServerBusy
            | Self::TooManyWatchStreams => (Code::ResourceExhausted, 429),
            Self::Unavailable(_) | Self::Draining => (Code::Unavailable, 503),
            Self::Internal(_) => (Code::Internal, 500),
            // As google.rpc.Code documents the HTTP equivalents.
            Self::RequestAbandoned => (Code::Cancelled, 499),
            Self::MessageTooLarge(_) => (Code::OutOfRange, 413),
            Self::UnknownMethod => (Code::Unimplemented, 501),
            // As grpc-gateway answers a route that does not exist, and one
            // that exists without the method.
            Self::UnknownPath => (Code::NotFound, 404),
            Self::MethodNotAllowed => (Code::Unimplemented, 405),
            Self::Transport(code, _) => (*code, http_status_of(*code)),
        }
    }

    /// A short, human message that never carries SQL, internals, or anything
    /// about resources the caller does not own.
    fn message(&self) -> String {
        match self {
            Self::Unauthenticated(detail) => format!("unauthenticated: {detail}"),
            Self::OrganizationIdMissing(detail) => (*detail).to_owned(),
            Self::ConflictingOrganizations => {
                "the bearer token names another organization than x-organization-id".to_owned()
            }
            Self::InvalidArgument(violations) => {
                let fields: Vec<&str> = violations.iter().map(|v| v.field).collect();
                format!("invalid argument: {}", fields.join(", "))
            }
            Self::IdentityNotFound(handle) => format!("identity '{handle}' not found"),
            Self::ChannelNotFound(kind, id) => format!("{} {id} not found", noun(*kind)),
            Self::ChannelAlreadyAssigned(kind, id) => {
                format!(
                    "{} {id} is already assigned to another identity",
                    noun(*kind)
                )
            }
            Self::LookupNotFound(kind) => {
                format!("no such {} in the caller's organization", noun(*kind))
            }
            Self::ChannelNotAssigned(kind) => {
                format!("the {} is not assigned to any identity", noun(*kind))
            }
            Self::EmailAddressTaken => {
                "the e-mail address is used by another mailbox of the organization".to_owned()
            }
            Self::PhoneNumberTaken => {
                "the number is used by another phone number of the organization".to_owned()
            }
            Self::ScopeMissing(scope) => format!("the credentials lack the '{scope}' scope"),
            Self::EventsExpired => "events after after_sequence were removed by retention: \
                 start again from 0 (the oldest kept) after re-reading the current state"
                .to_owned(),
            Self::DeadlineExceeded => "the request's deadline passed".to_owned(),
            Self::Overloaded => "the server is at capacity, retry shortly".to_owned(),
            Self::OrganizationOverloaded => {
                "your organization has too many requests in flight, retry shortly".to_owned()
            }
            Self::TooManyWatchStreams => {
                "too many health watch streams on this connection".to_owned()
            }
            Self::ServerBusy => {
                "the server has too many requests in progress, retry shortly".to_owned()
            }
            Self::Unavailable(_) => {
                "the service is temporarily unavailable, retry later".to_owned()
            }
            Self::Internal(_) => "internal error".to_owned(),
            Self::Draining => {
                "the server is shutting down: resume from the last sequence received".to_owned()
            }
            Self::RequestAbandoned => "the request ended before its message arrived".to_owned(),
            Self::MessageTooLarge(limit) => {
                format!("the request message is larger than {} KiB", limit / 1024)
            }
            Self::UnknownMethod => "unknown method".to_owned(),
            Self::UnknownPath => "no such path".to_owned(),
            Self::MethodNotAllowed => "the path does not take this method".to_owned(),
            Self::Transport(..) => "the request could not be handled".to_owned(),
        }
    }
}

/// What went wrong with the database, as far as callers and operators care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatabaseErrorClass {
    /// Not reachable, shutting down, out of connections or resources, or
    /// not the primary (refuses writes).
    Unavailable,
    /// `statement_timeout`, a cancel, or a passed request deadline.
    Timeout,
    /// A serialization failure or deadlock: retrying may succeed.
    Conflict,
    /// A constraint said no (unique, foreign key, check).
    Constraint,
    /// The database role lacks a privilege (SQLSTATE 42501): a deployment
    /// fault, not a request's, so it is named as such in logs and metrics.
    Privilege,
    Other,
}

impl DatabaseErrorClass {
    pub fn of(error: &sqlx::Error) -> Self {
        use sqlx::Error as E;
        match error {
            // A protocol error leaves the connection unusable, like a lost one
            // (e.g. a peer that closes it during the TLS handshake).
            E::PoolTimedOut
            | E::PoolClosed
            | E::Io(_)
            | E::Tls(_)
            | E::Protocol(_)
            | E::WorkerCrashed => Self::Unavailable,
            E::Database(db) => match db.code().as_deref() {
                Some("57014") => Self::Timeout,
                Some("40001" | "40P01") => Self::Conflict,
                // read_only_sql_transaction: a demoted primary, or a standby,
                // reached through a proxy or a Service that has not moved yet.
                // Not this statement's fault: the connection is on a server
                // that cannot serve writes, so it is dropped like a lost one.
                Some("25006") => Self::Unavailable,
                // connection exceptions, too many connections or out of
                // resources, server shutting down or starting
                Some(code)
                    if code.starts_with("08")
                        || code.starts_with("53")
                        || code.starts_with("57P") =>
                {
                    Self::Unavailable
                }
                Some(code) if code.starts_with("23") => Self::Constraint,
                Some("42501") => Self::Privilege,
                _ => Self::Other,
            },
            _ => Self::Other,
        }
    }

    /// Every kind, so that each series of the metric exists from the start.
    pub const ALL: [Self; 6] = [
        Self::Unavailable,
        Self::Timeout,
        Self::Conflict,
        Self::Constraint,
        Self::Privilege,
        Self::Other,
    ];

    /// The `kind` label of the database error metric.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Conflict => "conflict",
            Self::Constraint => "constraint",
            Self::Privilege => "privilege",
            Self::Other => "other",
        }
    }
}

/// The HTTP status google.rpc.Code gives as each code's equivalent.
fn http_status_of(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::Cancelled => 499,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
        Code::DeadlineExceeded => 504,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::PermissionDenied => 403,
        Code::ResourceExhausted => 429,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::Unauthenticated => 401,
        Code::Unknown | Code::Internal | Code::DataLoss => 500,
    }
}

fn resource_type(kind: ChannelKind) -> &'static str {
    match kind {
        ChannelKind::Mailbox => "channels.v1.Mailbox",
        ChannelKind::PhoneNumber => "channels.v1.PhoneNumber",
    }
}

fn noun(kind: ChannelKind) -> &'static str {
    match kind {
        ChannelKind::Mailbox => "mailbox",
        ChannelKind::PhoneNumber => "phone number",
    }
}

/// An error as the caller receives it, whatever the transport: the gRPC
/// code, the HTTP status, the `ErrorInfo.reason`, the message and the rich
/// details (`ErrorInfo` always; `BadRequest`, `ResourceInfo`, `RetryInfo`
/// where they apply).
#[derive(Debug)]
pub struct ErrorReport {
    pub code: Code,
    pub http_status: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: ErrorDetails,
}

impl ServiceError {
    /// The report the caller receives; the cause, which the caller never
    /// sees, goes to the log here, once, whichever transport asked.
    pub fn report(&self) -> ErrorReport {
        let error = self;
        let (code, http_status) = error.code_and_http_status();
        // The caller sees a generic message; the cause goes to the log. An
        // unavailable database is an operations matter (health and metrics
        // say so too), not a defect: a warning, not an error.
        match error {
            ServiceError::Internal(_) | ServiceError::Transport(..) => {
                tracing::error!(error = ?anyhow_chain(error), reason = error.reason(), "request failed");
            }
            ServiceError::Unavailable(_) => {
                tracing::warn!(error = ?anyhow_chain(error), reason = error.reason(), "request failed");
            }
            _ => {}
        }

        let mut details = ErrorDetails::new();
        details.set_error_info(
            error.reason(),
            ERROR_DOMAIN,
            HashMap::from([("http_status".to_owned(), http_status.to_string())]),
        );
        match error {
            ServiceError::InvalidArgument(violations) => {
                for violation in violations {
                    details.add_bad_request_violation(violation.field, &violation.description);
                }
            }
            ServiceError::IdentityNotFound(handle) => {
                details.set_resource_info(
                    "channels.v1.Identity",
                    handle.as_str(),
                    "",
                    "no such identity in the caller's organization",
                );
            }
            ServiceError::Overloaded
            | ServiceError::OrganizationOverloaded
            | ServiceError::ServerBusy => {
                details.set_retry_info(Some(std::time::Duration::from_millis(
                    OVERLOAD_RETRY_DELAY_MS,
                )));
            }
            ServiceError::LookupNotFound(kind) | ServiceError::ChannelNotAssigned(kind) => {
                details.set_resource_info(resource_type(*kind), "", "", error.message());
            }
            ServiceError::ChannelNotFound(kind, id) => {
                details.set_resource_info(
                    resource_type(*kind),
                    id.to_string(),
                    "",
                    format!("no such {} in the caller's organization", noun(*kind)),
                );
            }
            _ => {}
        }
        ErrorReport {
            code,
            http_status,
            reason: error.reason(),
            message: error.message(),
            details,
        }
    }
}

/// gRPC renders the report as a status with `grpc-status-details-bin`.
impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        let report = error.report();
        Status::with_error_details(report.code, report.message, report.details)
    }
}

/// Renders an error with its whole source chain, for logs.
pub fn anyhow_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut rendered = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // sqlx repeats its database error's text in its own: say it once.
        let text = cause.to_string();
        if !rendered.contains(&text) {
            rendered.push_str(": ");
            rendered.push_str(&text);
        }
        source = cause.source();
    }
    rendered
}

/// The canonical name of a gRPC code, as in the gRPC spec and grpcurl.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
