//! The four RPCs: parse the request at the edge, run one store operation
//! within the request's deadline, map the result.

use std::{future::Future, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tonic::{Request, Response, Status, metadata::MetadataMap};
use tracing::Instrument as _;

use crate::domain::{AgentHandle, ChannelId, ChannelKind, OrganizationId};
use crate::error::{FieldViolation, ServiceError};
use crate::proto::{self, channel_assignment_server::ChannelAssignment};
use crate::store::{IdentityRecord, MailboxRecord, PhoneNumberRecord, Store};

pub struct ChannelAssignmentService {
    store: Store,
    request_timeout: Duration,
    /// Requests being handled; one more than it allows is shed, not queued.
    capacity: Arc<Semaphore>,
}

impl ChannelAssignmentService {
    pub fn new(store: Store, request_timeout: Duration, max_concurrent_requests: usize) -> Self {
        Self {
            store,
            request_timeout,
            capacity: Arc::new(Semaphore::new(max_concurrent_requests)),
        }
    }

    async fn assign(
        &self,
        metadata: &MetadataMap,
        organization: Option<&OrganizationId>,
        kind: ChannelKind,
        raw_handle: &str,
        raw_channel_id: &str,
    ) -> Result<proto::Identity, ServiceError> {
        let organization = caller(organization)?.clone();
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
        let permit = self.admit()?;
        let budget = self.budget(metadata);
        let store = self.store.clone();
        let work = async move {
            store
                .assign(&organization, &handle, kind, channel, budget.write_by)
                .await
        };
        let identity = within(budget, permit, work).await?;
        Ok(identity.into())
    }

    async fn unassign(
        &self,
        metadata: &MetadataMap,
        organization: Option<&OrganizationId>,
        kind: ChannelKind,
        raw_handle: &str,
    ) -> Result<(), ServiceError> {
        let organization = caller(organization)?.clone();
        let mut violations = Vec::new();
        let Some(handle) = parse_handle(raw_handle, &mut violations) else {
            return Err(ServiceError::InvalidArgument(violations));
        };
        let permit = self.admit()?;
        let budget = self.budget(metadata);
        let store = self.store.clone();
        let work = async move {
            store
                .unassign(&organization, &handle, kind, budget.write_by)
                .await
        };
        within(budget, permit, work).await
    }

    /// Takes a place among the requests doing database work, or sheds this
    /// one at once: queueing without bound only turns overload into timeouts
    /// for everyone.
    fn admit(&self) -> Result<OwnedSemaphorePermit, ServiceError> {
        Arc::clone(&self.capacity)
            .try_acquire_owned()
            .map_err(|_| ServiceError::Overloaded)
    }

    /// The time this request has: the server's request timeout, or the
    /// client's deadline if sooner.
    fn budget(&self, metadata: &MetadataMap) -> Budget {
        let timeout = metadata
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or(self.request_timeout, |client| {
                client.min(self.request_timeout)
            });
        Budget::new(Instant::now(), timeout)
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
            request.extensions().get(),
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
            request.extensions().get(),
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
            request.extensions().get(),
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
            request.extensions().get(),
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

/// When to give up on a request, and until when its statement may write.
///
/// The answer goes out a margin before the deadline, so that the caller gets
/// the server's DEADLINE_EXCEEDED (with its details) rather than its own
/// timer's error; the statement stops writing a margin before that, so that
/// nothing commits after the caller was told it did not happen.
#[derive(Clone, Copy, Debug)]
struct Budget {
    answer_by: Instant,
    write_by: Instant,
}

impl Budget {
    const MAX_MARGIN: Duration = Duration::from_millis(50);

    fn new(now: Instant, timeout: Duration) -> Self {
        let margin = (timeout / 10).min(Self::MAX_MARGIN);
        Self {
            answer_by: now + timeout.saturating_sub(margin),
            write_by: now + timeout.saturating_sub(margin * 2),
        }
    }
}

/// Runs the database work as a task of its own and waits for it until the
/// budget's answer time.
///
/// The work is never cancelled mid-statement: sqlx cannot recover a
/// connection whose query future was dropped (its release-time ping never
/// returns it to the pool), so a caller that gives up, or a passed deadline,
/// only stops the waiting. The statement then ends by itself, soon: it fails
/// rather than writes past `write_by`, and `statement_timeout` bounds it on
/// the server. The capacity permit goes with the work, so load shedding
/// counts what is really still running.
async fn within<T: Send + 'static>(
    budget: Budget,
    permit: OwnedSemaphorePermit,
    work: impl Future<Output = Result<T, ServiceError>> + Send + 'static,
) -> Result<T, ServiceError> {
    let task = tokio::spawn(
        async move {
            let outcome = work.await;
            drop(permit);
            outcome
        }
        .in_current_span(),
    );
    match tokio::time::timeout_at(budget.answer_by, task).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(failed)) => Err(ServiceError::Internal(anyhow::anyhow!(
            "database task failed: {failed}"
        ))),
        Err(_) => Err(ServiceError::DeadlineExceeded),
    }
}

/// Parses a `grpc-timeout` header: up to 8 digits and a unit (H M S m u n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("10n"), Some(Duration::from_nanos(10)));
    }

    #[test]
    fn the_answer_leaves_before_the_deadline_and_writes_stop_before_the_answer() {
        let now = Instant::now();
        let short = Budget::new(now, Duration::from_millis(300));
        assert_eq!(short.answer_by, now + Duration::from_millis(270));
        assert_eq!(short.write_by, now + Duration::from_millis(240));
        let long = Budget::new(now, Duration::from_secs(5));
        assert_eq!(long.answer_by, now + Duration::from_millis(4950));
        assert_eq!(long.write_by, now + Duration::from_millis(4900));
        let none = Budget::new(now, Duration::ZERO);
        assert_eq!((none.answer_by, none.write_by), (now, now));
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for raw in ["", "S", "1", "1s", "123456789S", "-1S", "1.5S", "+1S"] {
            assert_eq!(parse_grpc_timeout(raw), None, "{raw:?}");
        }
    }
}
