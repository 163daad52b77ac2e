//! The four RPCs: parse the request at the edge, run one store operation
//! within the request's deadline, map the result.

use std::{future::Future, time::Duration};

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tonic::{Extensions, Request, Response, Status, metadata::MetadataMap};
use tracing::Instrument as _;

use crate::admission::{Admission, Admitted};
use crate::deadline::{Arrival, Budget, StatementGate, parse_grpc_timeout};
use crate::domain::{AgentHandle, ChannelId, ChannelKind, OrganizationId};
use crate::error::{FieldViolation, ServiceError};
use crate::proto::{self, channel_assignment_server::ChannelAssignment};
use crate::store::{IdentityRecord, MailboxRecord, PhoneNumberRecord, Store};

pub struct ChannelAssignmentService {
    store: Store,
    request_timeout: Duration,
    /// Who may do database work now (src/admission.rs).
    admission: Admission,
}

impl ChannelAssignmentService {
    pub fn new(store: Store, request_timeout: Duration, admission: Admission) -> Self {
        Self {
            store,
            request_timeout,
            admission,
        }
    }

    async fn assign(
        &self,
        metadata: &MetadataMap,
        extensions: &Extensions,
        kind: ChannelKind,
        raw_handle: &str,
        raw_channel_id: &str,
    ) -> Result<proto::Identity, ServiceError> {
        let organization = caller(extensions.get())?.clone();
        let mut violations = Vec::new();
        let handle = parse_handle(raw_handle, &mut violations);
        let channel = ChannelId::parse(kind, raw_channel_id)
            .map_err(|description| {
                violations.push(FieldViolation {
                    field: kind.id_field(),
                    description,
                })
            })
            .ok();
        let (Some(handle), Some(channel)) = (handle, channel) else {
            return Err(ServiceError::InvalidArgument(violations));
        };
        let permit = self.admission.admit(&organization)?;
        let budget = self.budget(metadata, extensions);
        let store = self.store.clone();
        let window = budget.write_window();
        let gate = window.gate.clone();
        let work = async move {
            store
                .assign(&organization, &handle, kind, channel, &window)
                .await
        };
        let identity = within(budget.answer_by, gate, permit, work).await?;
        Ok(identity.into())
    }

    async fn unassign(
        &self,
        metadata: &MetadataMap,
        extensions: &Extensions,
        kind: ChannelKind,
        raw_handle: &str,
    ) -> Result<(), ServiceError> {
        let organization = caller(extensions.get())?.clone();
        let mut violations = Vec::new();
        let Some(handle) = parse_handle(raw_handle, &mut violations) else {
            return Err(ServiceError::InvalidArgument(violations));
        };
        let permit = self.admission.admit(&organization)?;
        let budget = self.budget(metadata, extensions);
        let store = self.store.clone();
        let window = budget.write_window();
        let gate = window.gate.clone();
        let work = async move { store.unassign(&organization, &handle, kind, &window).await };
        within(budget.answer_by, gate, permit, work).await
    }

    /// The time this request has: the server's request timeout, or the
    /// client's deadline if sooner.
    fn budget(&self, metadata: &MetadataMap, extensions: &Extensions) -> Budget {
        let timeout = metadata
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or(self.request_timeout, |client| {
                client.min(self.request_timeout)
            });
        // Counted from the request's arrival, as the client's deadline is,
        // not from the handler's start.
        let arrived = extensions
            .get::<Arrival>()
            .map_or_else(Instant::now, |arrival| arrival.0);
        Budget::new(arrived, timeout)
    }
}

#[tonic::async_trait]
impl ChannelAssignment for ChannelAssignmentService {
    async fn assign_mailbox(
        &self,
        request: Request<proto::AssignMailboxRequest>,
    ) -> Result<Response<proto::Identity>, Status> {
        let message = request.get_ref();
        self.assign(
            request.metadata(),
            request.extensions(),
            ChannelKind::Mailbox,
            &message.agent_handle,
            &message.mailbox_id,
        )
        .await
        .map(Response::new)
        .map_err(Status::from)
    }

    async fn unassign_mailbox(
        &self,
        request: Request<proto::UnassignMailboxRequest>,
    ) -> Result<Response<()>, Status> {
        self.unassign(
            request.metadata(),
            request.extensions(),
            ChannelKind::Mailbox,
            &request.get_ref().agent_handle,
        )
        .await
        .map(Response::new)
        .map_err(Status::from)
    }

    async fn assign_phone_number(
        &self,
        request: Request<proto::AssignPhoneNumberRequest>,
    ) -> Result<Response<proto::Identity>, Status> {
        let message = request.get_ref();
        self.assign(
            request.metadata(),
            request.extensions(),
            ChannelKind::PhoneNumber,
            &message.agent_handle,
            &message.phone_number_id,
        )
        .await
        .map(Response::new)
        .map_err(Status::from)
    }

    async fn unassign_phone_number(
        &self,
        request: Request<proto::UnassignPhoneNumberRequest>,
    ) -> Result<Response<()>, Status> {
        self.unassign(
            request.metadata(),
            request.extensions(),
            ChannelKind::PhoneNumber,
            &request.get_ref().agent_handle,
        )
        .await
        .map(Response::new)
        .map_err(Status::from)
    }
}

/// The organization the interceptor put on the request; its absence is a
/// wiring bug, never the caller's fault.
fn caller(organization: Option<&OrganizationId>) -> Result<&OrganizationId, ServiceError> {
    organization.ok_or_else(|| {
        ServiceError::Internal(anyhow::anyhow!(
            "request reached the service without an organization"
        ))
    })
}

fn parse_handle(raw: &str, violations: &mut Vec<FieldViolation>) -> Option<AgentHandle> {
    AgentHandle::parse(raw)
        .map_err(|description| {
            violations.push(FieldViolation {
                field: "agent_handle",
                description: description.to_owned(),
            })
        })
        .ok()
}

/// Runs the database work as a task of its own and answers by the budget's
/// answer time, truthfully.
///
/// The work is never cancelled mid-statement: sqlx cannot recover a
/// connection whose query future was dropped, so a caller that gives up, or a
/// passed deadline, only stops the waiting. When the answer is due, the
/// `StatementGate` says which answer is true: if no statement was sent, none
/// will be, and DEADLINE_EXCEEDED means nothing changed; if one was, it may
/// still commit, so the outcome is awaited and reported (bounded: the
/// statement fails rather than writes past `write_by`, and
/// `statement_timeout` ends it on the server). The capacity permit goes with
/// the work, so load shedding counts what is really still running.
async fn within<T: Send + 'static>(
    answer_by: Instant,
    gate: StatementGate,
    permit: Admitted,
    work: impl Future<Output = Result<T, ServiceError>> + Send + 'static,
) -> Result<T, ServiceError> {
    let mut task = tokio::spawn(
        async move {
            let outcome = work.await;
            drop(permit);
            outcome
        }
        .in_current_span(),
    );
    let joined = match tokio::time::timeout_at(answer_by, &mut task).await {
        Ok(joined) => joined,
        Err(_due) if gate.abandon() => return Err(ServiceError::DeadlineExceeded),
        Err(_due) => {
            tracing::debug!("answer due while a statement may still commit: awaiting its outcome");
            task.await
        }
    };
    joined.unwrap_or_else(|failed| {
        Err(ServiceError::Internal(anyhow::anyhow!(
            "database task failed: {failed}"
        )))
    })
}

fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        // Always below 10^9 outside leap seconds, which PostgreSQL never stores.
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(999_999_999),
    }
}

impl From<IdentityRecord> for proto::Identity {
    fn from(record: IdentityRecord) -> Self {
        use proto::IdentityStatus as S;
        let status = match record.status.as_str() {
            "active" => S::Active,
            "paused" => S::Paused,
            "deleted" => S::Deleted,
            _ => S::Unspecified,
        };
        Self {
            id: record.id.to_string(),
            organization_id: record.organization_id,
            agent_handle: record.agent_handle,
            display_name: record.display_name.unwrap_or_default(),
            mailbox: record.mailbox.map(Into::into),
            phone_number: record.phone_number.map(Into::into),
            created_at: Some(timestamp(record.created_at)),
            updated_at: Some(timestamp(record.updated_at)),
            status: status.into(),
        }
    }
}

impl From<MailboxRecord> for proto::Mailbox {
    fn from(record: MailboxRecord) -> Self {
        use proto::MailboxStatus as S;
        let status = match record.status.as_str() {
            "active" => S::Active,
            "paused" => S::Paused,
            "deleted" => S::Deleted,
            _ => S::Unspecified,
        };
        Self {
            id: record.id.to_string(),
            email_address: record.email_address,
            display_name: record.display_name.unwrap_or_default(),
            created_at: Some(timestamp(record.created_at)),
            status: status.into(),
            updated_at: Some(timestamp(record.updated_at)),
        }
    }
}

impl From<PhoneNumberRecord> for proto::PhoneNumber {
    fn from(record: PhoneNumberRecord) -> Self {
        use proto::{PhoneNumberStatus as S, PhoneNumberType as T};
        let status = match record.status.as_str() {
            "active" => S::Active,
            "paused" => S::Paused,
            "released" => S::Released,
            _ => S::Unspecified,
        };
        let number_type = match record.number_type.as_str() {
            "local" => T::Local,
            "toll_free" => T::TollFree,
            _ => T::Unspecified,
        };
        Self {
            id: record.id.to_string(),
            number: record.number,
            created_at: Some(timestamp(record.created_at)),
            r#type: number_type.into(),
            status: status.into(),
            incoming_call_action: record.incoming_call_action.unwrap_or_default(),
            updated_at: Some(timestamp(record.updated_at)),
        }
    }
}
