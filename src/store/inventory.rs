//! Creating and updating identities, mailboxes and phone numbers for the
//! systems that own them: one idempotent statement each. An update that
//! changes nothing writes nothing (`updated_at` included); uniqueness of
//! addresses and numbers is the database's (unique indexes), and unlinking on
//! deletion its triggers' (see the migration).

use super::{
    IdentityDetailRow, IdentityRecord, MAX_ATTEMPTS, MailboxRecord, PhoneNumberRecord, Store,
};
use crate::domain::{
    AgentHandle, ChannelId, E164Number, EmailAddress, NumberType, OrganizationId, Status,
};
use crate::error::ServiceError;
use crate::operations::deadline::WriteWindow;

/// A mailbox as its owning system sends it.
#[derive(Debug)]
pub struct MailboxUpsert {
    pub id: ChannelId,
    pub email_address: EmailAddress,
    pub display_name: Option<String>,
    /// `None`: active when created, unchanged when updated.
    pub status: Option<Status>,
}

/// A phone number as its owning system sends it.
#[derive(Debug)]
pub struct PhoneNumberUpsert {
    pub id: ChannelId,
    pub number: E164Number,
    /// `None`: local when created, unchanged when updated.
    pub number_type: Option<NumberType>,
    pub status: Option<Status>,
    pub incoming_call_action: Option<String>,
}

impl std::fmt::Debug for EmailAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmailAddress(…)")
    }
}

impl std::fmt::Debug for E164Number {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("E164Number(…)")
    }
}

/// `$1` organization, `$2` handle, `$3` display name (NULL clears it), `$4`
/// status (NULL: active on create, unchanged on update), `$5` the actor of
/// the change events a deletion records (every upsert sets it for its
/// statement, before the row is written). When nothing
/// changes, the row is read as it is. Deleting unlinks the identity's
/// channels (trigger `identities_unlink_when_deleted`).
const UPSERT_IDENTITY: &str = concat!(
    "WITH caller AS (
        SELECT set_config('channels.actor', $5, true) AS actor
    ),
    upserted AS (
        INSERT INTO identities AS i (organization_id, agent_handle, display_name, status)
        SELECT $1, $2, $3, coalesce($4, 'active') FROM caller
        ON CONFLICT (organization_id, agent_handle) DO UPDATE
            SET display_name = EXCLUDED.display_name, status = coalesce($4, i.status)
            WHERE (i.display_name, i.status)
                IS DISTINCT FROM (EXCLUDED.display_name, coalesce($4, i.status))
        RETURNING i.organization_id, i.id, i.agent_handle, i.display_name, i.mailbox_id,
                  i.phone_number_id, i.status, i.created_at, i.updated_at
    ),
    result AS (
        SELECT * FROM upserted
        UNION ALL
        ",
    identity_columns!(),
    " FROM identities
        WHERE organization_id = $1 AND agent_handle = $2 AND NOT EXISTS (SELECT 1 FROM upserted)
    )
    SELECT",
    identity_detail_columns!(),
    "FROM result AS r",
    identity_detail_joins!()
);

/// `$1` organization, `$2` id, `$3` address, `$4` display name, `$5` status,
/// `$6` the actor.
/// Deleting unlinks it (trigger `mailboxes_unlink_when_deleted`).
const UPSERT_MAILBOX: &str = "
    WITH caller AS (
        SELECT set_config('channels.actor', $6, true) AS actor
    ),
    upserted AS (
        INSERT INTO mailboxes AS m (organization_id, id, email_address, display_name, status)
        SELECT $1, $2, $3, $4, coalesce($5, 'active') FROM caller
        ON CONFLICT (organization_id, id) DO UPDATE
            SET email_address = EXCLUDED.email_address,
                display_name = EXCLUDED.display_name,
                status = coalesce($5, m.status)
            WHERE (m.email_address, m.display_name, m.status)
                IS DISTINCT FROM (EXCLUDED.email_address, EXCLUDED.display_name, coalesce($5, m.status))
        RETURNING m.id, m.email_address, m.display_name, m.status, m.created_at, m.updated_at
    )
    SELECT * FROM upserted
    UNION ALL
    SELECT id, email_address, display_name, status, created_at, updated_at FROM mailboxes
    WHERE organization_id = $1 AND id = $2 AND NOT EXISTS (SELECT 1 FROM upserted)";

/// `$1` organization, `$2` id, `$3` number, `$4` type (NULL: local on
/// create, unchanged on update), `$5` status, `$6` incoming call action, `$7`
/// the actor.
/// Releasing unlinks it (trigger `phone_numbers_unlink_when_released`).
const UPSERT_PHONE_NUMBER: &str = "
    WITH caller AS (
        SELECT set_config('channels.actor', $7, true) AS actor
    ),
    upserted AS (
        INSERT INTO phone_numbers AS p
            (organization_id, id, number, type, status, incoming_call_action)
        SELECT $1, $2, $3, coalesce($4, 'local'), coalesce($5, 'active'), $6 FROM caller
        ON CONFLICT (organization_id, id) DO UPDATE
            SET number = EXCLUDED.number,
                type = coalesce($4, p.type),
                status = coalesce($5, p.status),
                incoming_call_action = EXCLUDED.incoming_call_action
            WHERE (p.number, p.type, p.status, p.incoming_call_action)
                IS DISTINCT FROM (EXCLUDED.number, coalesce($4, p.type), coalesce($5, p.status),
                                  EXCLUDED.incoming_call_action)
        RETURNING p.id, p.number, p.type, p.status, p.incoming_call_action, p.created_at, p.updated_at
    )
    SELECT * FROM upserted
    UNION ALL
    SELECT id, number, type, status, incoming_call_action, created_at, updated_at FROM phone_numbers
    WHERE organization_id = $1 AND id = $2 AND NOT EXISTS (SELECT 1 FROM upserted)";

fn email_taken(constraint: &str) -> Option<ServiceError> {
    (constraint == "mailboxes_email_address_unique").then_some(ServiceError::EmailAddressTaken)
}

fn number_taken(constraint: &str) -> Option<ServiceError> {
    (constraint == "phone_numbers_number_unique").then_some(ServiceError::PhoneNumberTaken)
}

/// An upsert that found its row unchanged reads it from its snapshot; a row
/// inserted by a concurrent identical upsert after that snapshot was taken
/// is not there yet, and a fresh attempt finds it.
fn raced() -> ServiceError {
    ServiceError::Internal(anyhow::anyhow!(
        "upsert kept racing with concurrent changes after {MAX_ATTEMPTS} attempts"
    ))
}

impl Store {
    #[tracing::instrument(name = "store.upsert_identity", skip_all)]
    pub async fn upsert_identity(
        &self,
        organization: &OrganizationId,
        handle: &AgentHandle,
        display_name: Option<&str>,
        status: Option<Status>,
        actor: &str,
        window: &WriteWindow,
    ) -> Result<IdentityRecord, ServiceError> {
        for _ in 0..MAX_ATTEMPTS {
            let rows = self
                .fetch_rows(Some(window), || {
                    sqlx::query_as::<_, IdentityDetailRow>(UPSERT_IDENTITY)
                        .bind(organization.as_str())
                        .bind(handle.as_str())
                        .bind(display_name)
                        .bind(status.map(Status::as_str))
                        .bind(actor)
                })
                .await
                .map_err(|error| error.into_service_error(|_| None))?;
            if let Some(identity) = rows
                .into_iter()
                .next()
                .and_then(IdentityDetailRow::into_record)
            {
                return Ok(identity);
            }
        }
        Err(raced())
    }

    #[tracing::instrument(name = "store.upsert_mailbox", skip_all)]
    pub async fn upsert_mailbox(
        &self,
        organization: &OrganizationId,
        mailbox: &MailboxUpsert,
        actor: &str,
        window: &WriteWindow,
    ) -> Result<MailboxRecord, ServiceError> {
        for _ in 0..MAX_ATTEMPTS {
            let rows = self
                .fetch_rows(Some(window), || {
                    sqlx::query_as::<_, MailboxRecord>(UPSERT_MAILBOX)
                        .bind(organization.as_str())
                        .bind(mailbox.id.as_uuid())
                        .bind(mailbox.email_address.as_str())
                        .bind(mailbox.display_name.as_deref())
                        .bind(mailbox.status.map(Status::as_str))
                        .bind(actor)
                })
                .await
                .map_err(|error| error.into_service_error(email_taken))?;
            if let Some(record) = rows.into_iter().next() {
                return Ok(record);
            }
        }
        Err(raced())
    }

    #[tracing::instrument(name = "store.upsert_phone_number", skip_all)]
    pub async fn upsert_phone_number(
        &self,
        organization: &OrganizationId,
        phone_number: &PhoneNumberUpsert,
        actor: &str,
        window: &WriteWindow,
    ) -> Result<PhoneNumberRecord, ServiceError> {
        for _ in 0..MAX_ATTEMPTS {
            let rows = self
                .fetch_rows(Some(window), || {
                    sqlx::query_as::<_, PhoneNumberRecord>(UPSERT_PHONE_NUMBER)
                        .bind(organization.as_str())
                        .bind(phone_number.id.as_uuid())
                        .bind(phone_number.number.as_str())
                        .bind(phone_number.number_type.map(NumberType::as_str))
                        .bind(phone_number.status.map(Status::as_str))
                        .bind(phone_number.incoming_call_action.as_deref())
                        .bind(actor)
                })
                .await
                .map_err(|error| error.into_service_error(number_taken))?;
            if let Some(record) = rows.into_iter().next() {
                return Ok(record);
            }
        }
        Err(raced())
    }
}
