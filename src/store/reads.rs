//! Reading identities and channels: one statement each, by the caller's
//! organization first, so that another organization's records are found
//! exactly as often as missing ones: never.

use uuid::Uuid;

use super::{IdentityDetailRow, IdentityRecord, MailboxRecord, PhoneNumberRecord, Store};
use crate::domain::{AgentHandle, LookupKey, OrganizationId};
use crate::error::ServiceError;

/// One page of a list, and whether another follows.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub more: bool,
}

/// Where a list resumes: after this key, in the list's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListCursor {
    /// `agent_handle`, in byte order.
    Handle(String),
    /// A channel's id.
    Id(Uuid),
}

/// Public, as the write statements are, for the benchmark's pgbench runs.
pub const GET_IDENTITY: &str = concat!(
    "SELECT",
    identity_detail_columns!(),
    "FROM identities AS r",
    identity_detail_joins!(),
    "
    WHERE r.organization_id = $1 AND r.agent_handle = $2 AND r.status <> 'deleted'"
);

/// `$3` the handle to resume after (NULL: from the start), `$4` how many.
/// The comparison, the order and the index (`identities_listing`) are all in
/// the "C" collation, so pages follow byte order whatever the locale.
const LIST_IDENTITIES: &str = concat!(
    "SELECT",
    identity_detail_columns!(),
    "FROM identities AS r",
    identity_detail_joins!(),
    "
    WHERE r.organization_id = $1 AND r.status <> 'deleted'
      AND ($2::text IS NULL OR r.agent_handle COLLATE \"C\" > $2::text COLLATE \"C\")
    ORDER BY r.agent_handle COLLATE \"C\"
    LIMIT $3"
);

/// The identity linked to the channel that `channel` finds (`$2` its key),
/// and whether that channel exists at all: not found and not linked are two
/// answers.
macro_rules! lookup_statement {
    ($channel:literal, $link_column:literal) => {
        concat!(
            "WITH channel AS (",
            $channel,
            ")
            SELECT EXISTS (SELECT 1 FROM channel) AS channel_found,",
            identity_detail_columns!(),
            "FROM (VALUES (1)) AS one (x)
            LEFT JOIN identities AS r
                ON r.organization_id = $1 AND r.status <> 'deleted'
               AND r.",
            $link_column,
            " = (SELECT id FROM channel)",
            identity_detail_joins!()
        )
    };
}

const LOOKUP_BY_MAILBOX_ID: &str = lookup_statement!(
    "SELECT id FROM mailboxes WHERE organization_id = $1 AND id = $2::uuid AND status <> 'deleted'",
    "mailbox_id"
);
/// Uses the unique index on `lower(email_address)` of live mailboxes.
pub const LOOKUP_BY_EMAIL_ADDRESS: &str = lookup_statement!(
    "SELECT id FROM mailboxes
     WHERE organization_id = $1 AND lower(email_address) = lower($2::text) AND status <> 'deleted'",
    "mailbox_id"
);
const LOOKUP_BY_PHONE_NUMBER_ID: &str = lookup_statement!(
    "SELECT id FROM phone_numbers
     WHERE organization_id = $1 AND id = $2::uuid AND status <> 'released'",
    "phone_number_id"
);
const LOOKUP_BY_NUMBER: &str = lookup_statement!(
    "SELECT id FROM phone_numbers
     WHERE organization_id = $1 AND number = $2::text AND status <> 'released'",
    "phone_number_id"
);

/// `$2` the id to resume after (NULL: from the start), `$3` whether to keep
/// only the unlinked ones, `$4` how many.
const LIST_MAILBOXES: &str = "
    SELECT m.id, m.email_address, m.display_name, m.status, m.created_at, m.updated_at
    FROM mailboxes AS m
    WHERE m.organization_id = $1 AND m.status <> 'deleted'
      AND ($2::uuid IS NULL OR m.id > $2::uuid)
      AND (NOT $3 OR NOT EXISTS (
            SELECT 1 FROM identities AS i
            WHERE i.organization_id = m.organization_id AND i.mailbox_id = m.id))
    ORDER BY m.id
    LIMIT $4";

const LIST_PHONE_NUMBERS: &str = "
    SELECT p.id, p.number, p.type, p.status, p.incoming_call_action, p.created_at, p.updated_at
    FROM phone_numbers AS p
    WHERE p.organization_id = $1 AND p.status <> 'released'
      AND ($2::uuid IS NULL OR p.id > $2::uuid)
      AND (NOT $3 OR NOT EXISTS (
            SELECT 1 FROM identities AS i
            WHERE i.organization_id = p.organization_id AND i.phone_number_id = p.id))
    ORDER BY p.id
    LIMIT $4";

#[derive(sqlx::FromRow)]
struct LookupRow {
    channel_found: bool,
    #[sqlx(flatten)]
    identity: IdentityDetailRow,
}

/// One more row than the page holds tells whether another page follows.
fn page_of<T>(mut rows: Vec<T>, size: usize) -> Page<T> {
    let more = rows.len() > size;
    rows.truncate(size);
    Page { items: rows, more }
}

fn limit_for(size: usize) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX).saturating_add(1)
}

impl Store {
    #[tracing::instrument(name = "store.get_identity", skip_all)]
    pub async fn get_identity(
        &self,
        organization: &OrganizationId,
        handle: &AgentHandle,
    ) -> Result<IdentityRecord, ServiceError> {
        let rows = self
            .fetch_rows(None, || {
                sqlx::query_as::<_, IdentityDetailRow>(GET_IDENTITY)
                    .bind(organization.as_str())
                    .bind(handle.as_str())
            })
            .await
            .map_err(|error| error.into_service_error(|_| None))?;
        rows.into_iter()
            .next()
            .and_then(IdentityDetailRow::into_record)
            .ok_or_else(|| ServiceError::IdentityNotFound(handle.clone()))
    }

    #[tracing::instrument(name = "store.list_identities", skip_all)]
    pub async fn list_identities(
        &self,
        organization: &OrganizationId,
        after: Option<&str>,
        size: usize,
    ) -> Result<Page<IdentityRecord>, ServiceError> {
        let rows = self
            .fetch_rows(None, || {
                sqlx::query_as::<_, IdentityDetailRow>(LIST_IDENTITIES)
                    .bind(organization.as_str())
                    .bind(after)
                    .bind(limit_for(size))
            })
            .await
            .map_err(|error| error.into_service_error(|_| None))?;
        let identities = rows
            .into_iter()
            .filter_map(IdentityDetailRow::into_record)
            .collect();
        Ok(page_of(identities, size))
    }

    #[tracing::instrument(name = "store.lookup_identity", skip_all, fields(kind = ?key.kind()))]
    pub async fn lookup_identity(
        &self,
        organization: &OrganizationId,
        key: &LookupKey,
    ) -> Result<IdentityRecord, ServiceError> {
        let (statement, text_key, id_key) = match key {
            LookupKey::MailboxId(id) => (LOOKUP_BY_MAILBOX_ID, None, Some(id.as_uuid())),
            LookupKey::EmailAddress(address) => {
                (LOOKUP_BY_EMAIL_ADDRESS, Some(address.as_str()), None)
            }
            LookupKey::PhoneNumberId(id) => (LOOKUP_BY_PHONE_NUMBER_ID, None, Some(id.as_uuid())),
            LookupKey::PhoneNumber(number) => (LOOKUP_BY_NUMBER, Some(number.as_str()), None),
        };
        let rows = self
            .fetch_rows(None, || {
                let query = sqlx::query_as::<_, LookupRow>(statement).bind(organization.as_str());
                match id_key {
                    Some(id) => query.bind(id),
                    None => query.bind(text_key),
                }
            })
            .await
            .map_err(|error| error.into_service_error(|_| None))?;
        let kind = key.kind();
        let Some(row) = rows.into_iter().next() else {
            return Err(ServiceError::Internal(anyhow::anyhow!(
                "the lookup statement returned no row"
            )));
        };
        if !row.channel_found {
            return Err(ServiceError::LookupNotFound(kind));
        }
        row.identity
            .into_record()
            .ok_or(ServiceError::ChannelNotAssigned(kind))
    }

    #[tracing::instrument(name = "store.list_mailboxes", skip_all)]
    pub async fn list_mailboxes(
        &self,
        organization: &OrganizationId,
        after: Option<Uuid>,
        unassigned_only: bool,
        size: usize,
    ) -> Result<Page<MailboxRecord>, ServiceError> {
        let rows = self
            .fetch_rows(None, || {
                sqlx::query_as::<_, MailboxRecord>(LIST_MAILBOXES)
                    .bind(organization.as_str())
                    .bind(after)
                    .bind(unassigned_only)
                    .bind(limit_for(size))
            })
            .await
            .map_err(|error| error.into_service_error(|_| None))?;
        Ok(page_of(rows, size))
    }

    #[tracing::instrument(name = "store.list_phone_numbers", skip_all)]
    pub async fn list_phone_numbers(
        &self,
        organization: &OrganizationId,
        after: Option<Uuid>,
        unassigned_only: bool,
        size: usize,
    ) -> Result<Page<PhoneNumberRecord>, ServiceError> {
        let rows = self
            .fetch_rows(None, || {
                sqlx::query_as::<_, PhoneNumberRecord>(LIST_PHONE_NUMBERS)
                    .bind(organization.as_str())
                    .bind(after)
                    .bind(unassigned_only)
                    .bind(limit_for(size))
            })
            .await
            .map_err(|error| error.into_service_error(|_| None))?;
        Ok(page_of(rows, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_more_than_the_page_says_another_follows() {
        let page = page_of(vec![1, 2, 3], 2);
        assert_eq!((page.items, page.more), (vec![1, 2], true));
        let page = page_of(vec![1, 2], 2);
        assert_eq!((page.items, page.more), (vec![1, 2], false));
    }
}
