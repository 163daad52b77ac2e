//! The service's operations, free of any transport: parse the arguments
//! once into domain types, take a place among the requests doing database
//! work (`admission`), run the store's statement within the request's budget
//! (`deadline`) and return domain records. The gRPC adapters
//! (`api::grpc`) only translate messages to and from these calls.

pub mod admission;
pub mod deadline;

use std::{future::Future, time::Duration};

use tokio::time::Instant;
use tracing::Instrument as _;

use crate::domain::{AgentHandle, ChannelId, ChannelKind, OrganizationId};
use crate::error::{FieldViolation, ServiceError};
use crate::store::{IdentityRecord, Store};
use admission::{Admission, Admitted};
use deadline::{Budget, StatementGate};

/// One caller's request, as every transport knows it: who asks, since when,
/// and the deadline it brought, if any.
#[derive(Clone, Debug)]
pub struct Call {
    pub organization: OrganizationId,
    pub arrived: Instant,
    pub client_timeout: Option<Duration>,
}

#[derive(Clone)]
pub struct Operations {
    store: Store,
    admission: Admission,
    request_timeout: Duration,
}

impl Operations {
    pub fn new(store: Store, admission: Admission, request_timeout: Duration) -> Self {
        Self {
            store,
            admission,
            request_timeout,
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
        let organization = call.organization.clone();
        let store = self.store.clone();
        self.write(call, move |window| async move {
            store
                .assign(&organization, &handle, kind, channel, &window)
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
        let mut violations = Vec::new();
        let Some(handle) = parse_handle(raw_handle, &mut violations) else {
            return Err(ServiceError::InvalidArgument(violations));
        };
        let organization = call.organization.clone();
        let store = self.store.clone();
        self.write(call, move |window| async move {
            store.unassign(&organization, &handle, kind, &window).await
        })
        .await
    }

    /// Admits the call, then runs `work` within its budget (see `within`).
    async fn write<T, F>(
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
