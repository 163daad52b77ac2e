//! The service's operations, free of any transport: parse the arguments
//! once into domain types, take a place among the requests doing database
//! work (`admission`), run the store's statement within the request's budget
//! (`deadline`) and return domain records. The gRPC adapters
//! (`api::grpc`) only translate messages to and from these calls.

pub mod admission;
pub mod deadline;
pub mod page;
pub mod watch;

use std::{future::Future, time::Duration};

use tokio::time::Instant;
use tracing::Instrument as _;

use crate::domain::{
    AgentHandle, ChannelId, ChannelKind, E164Number, EmailAddress, LookupKey, NumberType,
    OrganizationId, Status,
};
use crate::error::{FieldViolation, ServiceError};
use crate::events::hub::EventHub;
use crate::store::{
    EventRecord, IdentityRecord, ListCursor, MailboxRecord, MailboxUpsert, Page, PhoneNumberRecord,
    PhoneNumberUpsert, Store,
};
use admission::{Admission, Admitted};
use deadline::{Budget, StatementGate};
use page::{List, PageTokens, page_size};

/// One caller's request, as every transport knows it: who asks, since when,
/// and the deadline it brought, if any.
#[derive(Clone, Debug)]
pub struct Call {
    pub organization: OrganizationId,
    /// Who acts (the token's `sub`, or the gateway's `x-subject`), recorded
    /// in the change events; empty when unknown.
    pub actor: String,
    pub arrived: Instant,
    pub client_timeout: Option<Duration>,
}

/// A channel to look an identity up by, as a caller sent it: the name of
/// the field that was set, and its text.
#[derive(Clone, Copy, Debug)]
pub enum RawLookup<'a> {
    MailboxId(&'a str),
    EmailAddress(&'a str),
    PhoneNumberId(&'a str),
    PhoneNumber(&'a str),
}

/// A page of records and the token of the next one (empty on the last).
#[derive(Debug)]
pub struct Listed<T> {
    pub items: Vec<T>,
    pub next_page_token: String,
}

#[derive(Clone)]
pub struct Operations {
    store: Store,
    admission: Admission,
    request_timeout: Duration,
    page_tokens: PageTokens,
    events: EventHub,
    /// Turns true when the server starts draining: watchers end then.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl Operations {
    pub fn new(
        store: Store,
        admission: Admission,
        request_timeout: Duration,
        page_tokens: PageTokens,
        events: EventHub,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            admission,
            request_timeout,
            page_tokens,
            events,
            stopping,
        }
    }

    pub async fn get_identity(
        &self,
        call: &Call,
        raw_handle: &str,
    ) -> Result<IdentityRecord, ServiceError> {
        let handle = parse_handle(raw_handle).map_err(ServiceError::from)?;
        let organization = call.organization.clone();
        let store = self.store.clone();
        self.admitted(call, move |_| async move {
            store.get_identity(&organization, &handle).await
        })
        .await
    }

    pub async fn list_identities(
        &self,
        call: &Call,
        raw_page_size: i32,
        page_token: &str,
    ) -> Result<Listed<IdentityRecord>, ServiceError> {
        let list = List::Identities;
        let (size, after) = self.page_request(call, list, raw_page_size, page_token)?;
        let after = match after {
            Some(ListCursor::Handle(handle)) => Some(handle),
            _ => None,
        };
        let organization = call.organization.clone();
        let store = self.store.clone();
        let page = self
            .admitted(call, move |_| async move {
                store
                    .list_identities(&organization, after.as_deref(), size)
                    .await
            })
            .await?;
        Ok(self.listed(call, list, page, |identity| {
            ListCursor::Handle(identity.agent_handle.clone())
        }))
    }

    pub async fn lookup_identity(
        &self,
        call: &Call,
        raw: Option<RawLookup<'_>>,
    ) -> Result<IdentityRecord, ServiceError> {
        let key = parse_lookup(raw).map_err(ServiceError::from)?;
        let organization = call.organization.clone();
        let store = self.store.clone();
        self.admitted(call, move |_| async move {
            store.lookup_identity(&organization, &key).await
        })
        .await
    }

    pub async fn upsert_identity(
        &self,
        call: &Call,
        raw_handle: &str,
        display_name: &str,
        status: Result<Option<Status>, FieldViolation>,
    ) -> Result<IdentityRecord, ServiceError> {
        let mut violations = Vec::new();
        let handle = parse_handle(raw_handle)
            .map_err(|v| violations.push(v))
            .ok();
        let display_name = optional_text("display_name", display_name)
            .map_err(|v| violations.push(v))
            .ok();
        let status = status.map_err(|v| violations.push(v)).ok();
        let (Some(handle), Some(display_name), Some(status)) = (handle, display_name, status)
        else {
            return Err(ServiceError::InvalidArgument(violations));
        };
        let organization = call.organization.clone();
        let actor = call.actor.clone();
        let store = self.store.clone();
        self.admitted_write(call, move |window| async move {
            store
                .upsert_identity(
                    &organization,
                    &handle,
                    display_name.as_deref(),
                    status,
                    &actor,
                    &window,
                )
                .await
        })
        .await
    }

    pub async fn upsert_mailbox(
        &self,
        call: &Call,
        raw_id: &str,
        raw_email_address: &str,
        display_name: &str,
        status: Result<Option<Status>, FieldViolation>,
    ) -> Result<MailboxRecord, ServiceError> {
        let mut violations = Vec::new();
        let id = ChannelId::parse(ChannelKind::Mailbox, raw_id)
            .map_err(|description| {
                violations.push(FieldViolation {
                    field: "mailbox_id",
                    description,
                })
            })
            .ok();
        let email_address = EmailAddress::parse(raw_email_address)
            .map_err(|description| {
                violations.push(FieldViolation {
                    field: "email_address",
                    description: description.to_owned(),
                })
            })
            .ok();
        let display_name = optional_text("display_name", display_name)
            .map_err(|v| violations.push(v))
            .ok();
        let status = status.map_err(|v| violations.push(v)).ok();
        let (Some(id), Some(email_address), Some(display_name), Some(status)) =
            (id, email_address, display_name, status)
        else {
            return Err(ServiceError::InvalidArgument(violations));
        };
        let mailbox = MailboxUpsert {
            id,
            email_address,
            display_name,
            status,
        };
        let organization = call.organization.clone();
        let actor = call.actor.clone();
        let store = self.store.clone();
        self.admitted_write(call, move |window| async move {
            store
                .upsert_mailbox(&organization, &mailbox, &actor, &window)
                .await
        })
        .await
    }

    pub async fn upsert_phone_number(
        &self,
        call: &Call,
        raw_id: &str,
        raw_number: &str,
        number_type: Result<Option<NumberType>, FieldViolation>,
        status: Result<Option<Status>, FieldViolation>,
        incoming_call_action: &str,
    ) -> Result<PhoneNumberRecord, ServiceError> {
        let mut violations = Vec::new();
        let id = ChannelId::parse(ChannelKind::PhoneNumber, raw_id)
            .map_err(|description| {
                violations.push(FieldViolation {
                    field: "phone_number_id",
                    description,
                })
            })
            .ok();
        let number = E164Number::parse(raw_number, "number")
            .map_err(|description| {
                violations.push(FieldViolation {
                    field: "number",
                    description,
                })
            })
            .ok();
        let number_type = number_type.map_err(|v| violations.push(v)).ok();
        let status = status.map_err(|v| violations.push(v)).ok();
        let incoming_call_action = optional_text("incoming_call_action", incoming_call_action)
            .map_err(|v| violations.push(v))
            .ok();
        let (Some(id), Some(number), Some(number_type), Some(status), Some(incoming_call_action)) =
            (id, number, number_type, status, incoming_call_action)
        else {
            return Err(ServiceError::InvalidArgument(violations));
        };
        let phone_number = PhoneNumberUpsert {
            id,
            number,
            number_type,
            status,
            incoming_call_action,
        };
        let organization = call.organization.clone();
        let actor = call.actor.clone();
        let store = self.store.clone();
        self.admitted_write(call, move |window| async move {
            store
                .upsert_phone_number(&organization, &phone_number, &actor, &window)
                .await
        })
        .await
    }

    pub async fn list_mailboxes(
        &self,
        call: &Call,
        raw_page_size: i32,
        page_token: &str,
        unassigned_only: bool,
    ) -> Result<Listed<MailboxRecord>, ServiceError> {
        let list = List::Mailboxes { unassigned_only };
        let (size, after) = self.page_request(call, list, raw_page_size, page_token)?;
        let after = id_cursor(after);
        let organization = call.organization.clone();
        let store = self.store.clone();
        let page = self
            .admitted(call, move |_| async move {
                store
                    .list_mailboxes(&organization, after, unassigned_only, size)
                    .await
            })
            .await?;
        Ok(self.listed(call, list, page, |mailbox| ListCursor::Id(mailbox.id)))
    }

    pub async fn list_phone_numbers(
        &self,
        call: &Call,
        raw_page_size: i32,
        page_token: &str,
        unassigned_only: bool,
    ) -> Result<Listed<PhoneNumberRecord>, ServiceError> {
        let list = List::PhoneNumbers { unassigned_only };
        let (size, after) = self.page_request(call, list, raw_page_size, page_token)?;
        let after = id_cursor(after);
        let organization = call.organization.clone();
        let store = self.store.clone();
        let page = self
            .admitted(call, move |_| async move {
                store
                    .list_phone_numbers(&organization, after, unassigned_only, size)
                    .await
            })
            .await?;
        Ok(self.listed(call, list, page, |number| ListCursor::Id(number.id)))
    }

    /// Events of the caller's organization after `after_sequence`, oldest
    /// first, and the position to poll from next.
    pub async fn list_events(
        &self,
        call: &Call,
        after_sequence: i64,
        raw_page_size: i32,
    ) -> Result<(Vec<EventRecord>, i64), ServiceError> {
        let mut violations = Vec::new();
        if after_sequence < 0 {
            violations.push(FieldViolation {
                field: "after_sequence",
                description: "after_sequence must not be negative".to_owned(),
            });
        }
        let size = page_size(raw_page_size)
            .map_err(|v| violations.push(v))
            .ok();
        let Some(size) = size.filter(|_| violations.is_empty()) else {
            return Err(ServiceError::InvalidArgument(violations));
        };
        let organization = call.organization.clone();
        let store = self.store.clone();
        let events = self
            .admitted(call, move |_| async move {
                store.list_events(&organization, after_sequence, size).await
            })
            .await?;
        let next = events.last().map_or(after_sequence, |event| event.sequence);
        Ok((events, next))
    }

    /// The page size and the position a list request asks for; every
    /// malformed field is reported at once.
    fn page_request(
        &self,
        call: &Call,
        list: List,
        raw_page_size: i32,
        page_token: &str,
    ) -> Result<(usize, Option<ListCursor>), ServiceError> {
        let size = page_size(raw_page_size);
        let after = self
            .page_tokens
            .resume(&call.organization, list, page_token);
        match (size, after) {
            (Ok(size), Ok(after)) => Ok((size, after)),
            (size, after) => Err(ServiceError::InvalidArgument(
                size.err().into_iter().chain(after.err()).collect(),
            )),
        }
    }

    fn listed<T>(
        &self,
        call: &Call,
        list: List,
        page: Page<T>,
        position: impl Fn(&T) -> ListCursor,
    ) -> Listed<T> {
        let next_page_token = match page.items.last() {
            Some(last) if page.more => {
                self.page_tokens
                    .issue(&call.organization, list, &position(last))
            }
            _ => String::new(),
        };
        Listed {
            items: page.items,
            next_page_token,
        }
    }

    pub async fn assign(
        &self,
        call: &Call,
        kind: ChannelKind,
        raw_handle: &str,
        raw_channel_id: &str,
    ) -> Result<IdentityRecord, ServiceError> {
        let mut violations = Vec::new();
        let handle = parse_handle(raw_handle)
            .map_err(|v| violations.push(v))
            .ok();
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
        let organization = call.organization.clone();
        let actor = call.actor.clone();
        let store = self.store.clone();
        self.admitted_write(call, move |window| async move {
            store
                .assign(&organization, &handle, kind, channel, &actor, &window)
                .await
        })
        .await
    }

    pub async fn unassign(
        &self,
        call: &Call,
        kind: ChannelKind,
        raw_handle: &str,
    ) -> Result<(), ServiceError> {
        let handle = parse_handle(raw_handle).map_err(ServiceError::from)?;
        let organization = call.organization.clone();
        let actor = call.actor.clone();
        let store = self.store.clone();
        self.admitted_write(call, move |window| async move {
            store
                .unassign(&organization, &handle, kind, &actor, &window)
                .await
        })
        .await
    }

    /// Admits the call, then runs `work` within its budget (see `within`).
    /// A write's statement passes the window's gate; a read's does not, so
    /// a read is always answered on time.
    async fn admitted<T, F>(
        &self,
        call: &Call,
        work: impl FnOnce(deadline::WriteWindow) -> F,
    ) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ServiceError>> + Send + 'static,
    {
        let permit = self.admission.admit(&call.organization)?;
        let budget = self.budget(call);
        let window = budget.write_window();
        let gate = window.gate.clone();
        within(budget.answer_by, gate, permit, work(window)).await
    }

    /// `admitted` for a write: when its work ends, however it ends (it may
    /// have recorded change events), the organization's watchers are woken.
    /// The work runs to its end even if the caller leaves (see `within`), so
    /// the wake-up follows the commit.
    async fn admitted_write<T, F>(
        &self,
        call: &Call,
        work: impl FnOnce(deadline::WriteWindow) -> F,
    ) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ServiceError>> + Send + 'static,
    {
        let events = self.events.clone();
        let organization = call.organization.clone();
        self.admitted(call, move |window| {
            let work = work(window);
            async move {
                let outcome = work.await;
                events.written(organization.as_str());
                outcome
            }
        })
        .await
    }

    /// The time a call has: the server's request timeout, or the client's
    /// deadline if sooner, counted from the call's arrival (as the client's
    /// deadline is), not from when the work starts.
    fn budget(&self, call: &Call) -> Budget {
        let timeout = call.client_timeout.map_or(self.request_timeout, |client| {
            client.min(self.request_timeout)
        });
        Budget::new(call.arrived, timeout)
    }
}

fn parse_handle(raw: &str) -> Result<AgentHandle, FieldViolation> {
    AgentHandle::parse(raw).map_err(|description| FieldViolation {
        field: "agent_handle",
        description: description.to_owned(),
    })
}

/// The lookup key, parsed; no key set is reported on the field `channel`.
fn parse_lookup(raw: Option<RawLookup<'_>>) -> Result<LookupKey, FieldViolation> {
    let violation =
        |field: &'static str, description: String| FieldViolation { field, description };
    match raw {
        None => Err(violation(
            "channel",
            "set one of mailbox_id, email_address, phone_number_id, phone_number".to_owned(),
        )),
        Some(RawLookup::MailboxId(raw)) => ChannelId::parse(ChannelKind::Mailbox, raw)
            .map(LookupKey::MailboxId)
            .map_err(|description| violation("mailbox_id", description)),
        Some(RawLookup::PhoneNumberId(raw)) => ChannelId::parse(ChannelKind::PhoneNumber, raw)
            .map(LookupKey::PhoneNumberId)
            .map_err(|description| violation("phone_number_id", description)),
        Some(RawLookup::EmailAddress(raw)) => EmailAddress::parse(raw)
            .map(LookupKey::EmailAddress)
            .map_err(|description| violation("email_address", description.to_owned())),
        Some(RawLookup::PhoneNumber(raw)) => E164Number::parse(raw, "phone_number")
            .map(LookupKey::PhoneNumber)
            .map_err(|description| violation("phone_number", description)),
    }
}

/// Longest display name or incoming call action kept, in characters: far
/// above real ones, and it bounds what a page of 1000 records weighs.
pub const MAX_TEXT_LEN: usize = 255;

/// A free-text field as sent: at most `MAX_TEXT_LEN` characters; empty
/// clears it (stored as NULL).
fn optional_text(field: &'static str, raw: &str) -> Result<Option<String>, FieldViolation> {
    if raw.chars().count() > MAX_TEXT_LEN {
        return Err(FieldViolation {
            field,
            description: format!("{field} must be at most {MAX_TEXT_LEN} characters"),
        });
    }
    // PostgreSQL's text cannot hold NUL: refused here, not as INTERNAL there.
    if raw.contains('\0') {
        return Err(FieldViolation {
            field,
            description: format!("{field} must not contain NUL characters"),
        });
    }
    Ok((!raw.is_empty()).then(|| raw.to_owned()))
}

fn id_cursor(cursor: Option<ListCursor>) -> Option<uuid::Uuid> {
    match cursor {
        Some(ListCursor::Id(id)) => Some(id),
        _ => None,
    }
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
