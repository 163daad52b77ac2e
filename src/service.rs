//! The four RPCs: parse the request at the edge, run one store operation
//! within the request's deadline, map the result.

use std::{future::Future, time::Duration};

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::domain::{AgentHandle, ChannelId, ChannelKind, OrganizationId};
use crate::error::{FieldViolation, ServiceError};
use crate::proto::{self, channel_assignment_server::ChannelAssignment};
use crate::store::{IdentityRecord, MailboxRecord, PhoneNumberRecord, Store};

pub struct ChannelAssignmentService {
    store: Store,
    request_timeout: Duration,
}

impl ChannelAssignmentService {
    pub fn new(store: Store, request_timeout: Duration) -> Self {
        Self {
            store,
            request_timeout,
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
        let organization = caller(organization)?;
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
        let timeout = self.timeout(metadata);
        let work = self.store.assign(
            organization,
            &handle,
            kind,
            channel,
            Instant::now() + timeout,
        );
        let identity = within_deadline(timeout, work).await?;
        Ok(identity.into())
    }

    async fn unassign(
        &self,
        metadata: &MetadataMap,
        organization: Option<&OrganizationId>,
        kind: ChannelKind,
        raw_handle: &str,
    ) -> Result<(), ServiceError> {
        let organization = caller(organization)?;
        let mut violations = Vec::new();
        let Some(handle) = parse_handle(raw_handle, &mut violations) else {
            return Err(ServiceError::InvalidArgument(violations));
        };
        let timeout = self.timeout(metadata);
        let work = self
            .store
            .unassign(organization, &handle, kind, Instant::now() + timeout);
        within_deadline(timeout, work).await
    }

    /// The server's request timeout, or the client's deadline if sooner.
    fn timeout(&self, metadata: &MetadataMap) -> Duration {
        metadata
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or(self.request_timeout, |client| {
                client.min(self.request_timeout)
            })
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

/// Bounds the whole RPC by its deadline. The statement carries the deadline
/// too and writes nothing once it has passed; the grace lets a statement that
/// finished in time report so, rather than be cut off on the way back.
async fn within_deadline<T>(
    timeout: Duration,
    work: impl Future<Output = Result<T, ServiceError>>,
) -> Result<T, ServiceError> {
    const REPORT_GRACE: Duration = Duration::from_millis(100);
    tokio::time::timeout(timeout + REPORT_GRACE, work)
        .await
        .unwrap_or(Err(ServiceError::DeadlineExceeded))
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
    fn malformed_grpc_timeouts_are_ignored() {
        for raw in ["", "S", "1", "1s", "123456789S", "-1S", "1.5S", "+1S"] {
            assert_eq!(parse_grpc_timeout(raw), None, "{raw:?}");
        }
    }
}
