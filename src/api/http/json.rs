//! The REST API's JSON, as the seed writes it: snake_case field names,
//! statuses and types as lowercase strings, RFC 3339 timestamps, `null` for
//! an unlinked channel or an unset text. Each type is also the schema the
//! OpenAPI document gives for it.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::{IdentityRecord, MailboxRecord, PhoneNumberRecord};

/// RFC 3339 in UTC, with as many fractional digits as the value has
/// (PostgreSQL keeps microseconds).
fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

// No `Debug` on these: e-mail addresses and numbers stay out of logs.

/// The full identity detail object.
#[derive(Serialize, ToSchema)]
pub struct Identity {
    #[schema(format = "uuid")]
    pub id: String,
    pub organization_id: String,
    #[schema(example = "sales-agent")]
    pub agent_handle: String,
    #[schema(required = true)]
    pub display_name: Option<String>,
    #[schema(value_type = IdentityStatus)]
    pub status: String,
    /// The linked mailbox; `null` when none.
    #[schema(required = true)]
    pub mailbox: Option<Mailbox>,
    /// The linked phone number; `null` when none.
    #[schema(required = true)]
    pub phone_number: Option<PhoneNumber>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct Mailbox {
    #[schema(format = "uuid")]
    pub id: String,
    pub email_address: String,
    #[schema(required = true)]
    pub display_name: Option<String>,
    #[schema(value_type = MailboxStatus)]
    pub status: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct PhoneNumber {
    #[schema(format = "uuid")]
    pub id: String,
    /// E.164, e.g. `+14155550123`.
    pub number: String,
    #[schema(value_type = PhoneNumberType)]
    pub r#type: String,
    #[schema(value_type = PhoneNumberStatus)]
    pub status: String,
    /// What happens to an incoming call; `null` when not configured.
    #[schema(required = true)]
    pub incoming_call_action: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// A page of identities.
#[derive(Serialize, ToSchema)]
pub struct ListIdentitiesResponse {
    pub identities: Vec<Identity>,
    /// Pass as `page_token` for the next page; empty on the page that holds
    /// the last identity.
    pub next_page_token: String,
}

// The values the database allows (a CHECK constraint on each table): the
// fields above pass the stored text through, and these say what it can be.

#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum IdentityStatus {
    Active,
    Paused,
    Deleted,
}

#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum MailboxStatus {
    Active,
    Paused,
    Deleted,
}

#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum PhoneNumberStatus {
    Active,
    Paused,
    Released,
}

#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum PhoneNumberType {
    Local,
    TollFree,
}

/// The body of `POST /identities/{agent_handle}/mailbox`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AssignMailboxRequest {
    #[schema(format = "uuid", example = "5a1e5000-0000-4000-8000-000000000003")]
    mailbox_id: String,
}

/// The body of `POST /identities/{agent_handle}/phone_number`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AssignPhoneNumberRequest {
    #[schema(format = "uuid", example = "9b0e0000-0000-4000-8000-000000000002")]
    phone_number_id: String,
}

impl From<IdentityRecord> for Identity {
    fn from(record: IdentityRecord) -> Self {
        Self {
            id: record.id.to_string(),
            organization_id: record.organization_id,
            agent_handle: record.agent_handle,
            display_name: record.display_name,
            status: record.status,
            mailbox: record.mailbox.map(Into::into),
            phone_number: record.phone_number.map(Into::into),
            created_at: rfc3339(record.created_at),
            updated_at: rfc3339(record.updated_at),
        }
    }
}

impl From<MailboxRecord> for Mailbox {
    fn from(record: MailboxRecord) -> Self {
        Self {
            id: record.id.to_string(),
            email_address: record.email_address,
            display_name: record.display_name,
            status: record.status,
            created_at: rfc3339(record.created_at),
            updated_at: rfc3339(record.updated_at),
        }
    }
}

impl From<PhoneNumberRecord> for PhoneNumber {
    fn from(record: PhoneNumberRecord) -> Self {
        Self {
            id: record.id.to_string(),
            number: record.number,
            r#type: record.number_type,
            status: record.status,
            incoming_call_action: record.incoming_call_action,
            created_at: rfc3339(record.created_at),
            updated_at: rfc3339(record.updated_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_in_utc() {
        let at = DateTime::parse_from_rfc3339("2025-03-04T05:06:07.123456+02:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(rfc3339(at), "2025-03-04T03:06:07.123456Z");
        let whole = DateTime::parse_from_rfc3339("2025-03-04T05:06:07Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(rfc3339(whole), "2025-03-04T05:06:07Z");
    }
}
