//! Domain records to their protobuf messages, and requested enum values
//! to domain values.

use chrono::{DateTime, Utc};

use crate::domain::{NumberType, Status};
use crate::error::FieldViolation;
use crate::proto;
use crate::store::{EventRecord, IdentityRecord, MailboxRecord, PhoneNumberRecord};

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
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

/// A status as requested: `UNSPECIFIED` is `None` (the operation's default);
/// a number the enum does not have is a field violation.
fn requested_status(
    raw: i32,
    known: impl FnOnce(i32) -> Option<Option<Status>>,
) -> Result<Option<Status>, FieldViolation> {
    known(raw).ok_or_else(|| FieldViolation {
        field: "status",
        description: format!("status {raw} is not one of the enum's values"),
    })
}

pub fn identity_status(raw: i32) -> Result<Option<Status>, FieldViolation> {
    use proto::IdentityStatus as S;
    requested_status(raw, |raw| {
        Some(match S::try_from(raw).ok()? {
            S::Unspecified => None,
            S::Active => Some(Status::Active),
            S::Paused => Some(Status::Paused),
            S::Deleted => Some(Status::Deleted),
        })
    })
}

pub fn mailbox_status(raw: i32) -> Result<Option<Status>, FieldViolation> {
    use proto::MailboxStatus as S;
    requested_status(raw, |raw| {
        Some(match S::try_from(raw).ok()? {
            S::Unspecified => None,
            S::Active => Some(Status::Active),
            S::Paused => Some(Status::Paused),
            S::Deleted => Some(Status::Deleted),
        })
    })
}

pub fn phone_number_status(raw: i32) -> Result<Option<Status>, FieldViolation> {
    use proto::PhoneNumberStatus as S;
    requested_status(raw, |raw| {
        Some(match S::try_from(raw).ok()? {
            S::Unspecified => None,
            S::Active => Some(Status::Active),
            S::Paused => Some(Status::Paused),
            S::Released => Some(Status::Released),
        })
    })
}

pub fn phone_number_type(raw: i32) -> Result<Option<NumberType>, FieldViolation> {
    use proto::PhoneNumberType as T;
    let known = T::try_from(raw).ok().map(|number_type| match number_type {
        T::Unspecified => None,
        T::Local => Some(NumberType::Local),
        T::TollFree => Some(NumberType::TollFree),
    });
    known.ok_or_else(|| FieldViolation {
        field: "type",
        description: format!("type {raw} is not one of the enum's values"),
    })
}

impl From<EventRecord> for proto::AssignmentEvent {
    fn from(record: EventRecord) -> Self {
        use proto::{AssignmentAction as A, AssignmentCause as C, ChannelKind as K};
        let kind = match record.kind.as_str() {
            "mailbox" => K::Mailbox,
            "phone_number" => K::PhoneNumber,
            _ => K::Unspecified,
        };
        let action = match record.action.as_str() {
            "assigned" => A::Assigned,
            "unassigned" => A::Unassigned,
            _ => A::Unspecified,
        };
        let cause = match record.cause.as_str() {
            "requested" => C::Requested,
            "channel_removed" => C::ChannelRemoved,
            "identity_deleted" => C::IdentityDeleted,
            _ => C::Unspecified,
        };
        Self {
            sequence: record.sequence,
            organization_id: record.organization_id,
            identity_id: record.identity_id.to_string(),
            agent_handle: record.agent_handle,
            kind: kind.into(),
            action: action.into(),
            channel_id: record
                .channel_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            previous_channel_id: record
                .previous_channel_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            cause: cause.into(),
            actor: record.actor,
            occurred_at: Some(timestamp(record.occurred_at)),
        }
    }
}
