//! The `ChannelAssignment` RPCs over gRPC: the caller and its deadline from
//! the request, the operation from `operations`, the answer as protobuf.

use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::domain::ChannelKind;
use crate::error::ServiceError;
use crate::operations::{
    Call, Operations, RawLookup, deadline::Arrival, deadline::parse_grpc_timeout,
};
use crate::proto::{self, channel_assignment_server::ChannelAssignment};
use crate::store::EventRecord;

pub struct ChannelAssignmentService {
    operations: Operations,
}

impl ChannelAssignmentService {
    pub fn new(operations: Operations) -> Self {
        Self { operations }
    }
}

/// The call as the operations know it: the caller the auth interceptor put
/// on the request (its absence is a wiring bug, never the
/// caller's fault), the arrival the outermost layer noted, and the client's
/// `grpc-timeout`.
pub fn call_of<T>(request: &Request<T>) -> Result<Call, ServiceError> {
    let caller = request.extensions().get::<Caller>().ok_or_else(|| {
        ServiceError::Internal(anyhow::anyhow!(
            "request reached the service without a caller"
        ))
    })?;
    let arrived = request
        .extensions()
        .get::<Arrival>()
        .map_or_else(tokio::time::Instant::now, |arrival| arrival.0);
    let client_timeout = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|value| value.to_str().ok())
        .and_then(parse_grpc_timeout);
    Ok(Call {
        organization: caller.organization.clone(),
        actor: caller.subject.as_deref().unwrap_or_default().to_owned(),
        arrived,
        client_timeout,
    })
}

/// The watch's events as the client receives them.
pub struct EventStream {
    events: mpsc::Receiver<Result<EventRecord, ServiceError>>,
}

impl futures_core::Stream for EventStream {
    type Item = Result<proto::AssignmentEvent, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.events
            .poll_recv(cx)
            .map(|next| next.map(|event| event.map(Into::into).map_err(Status::from)))
    }
}

/// Events queued for a slow client before the watcher waits for it.
const WATCH_BUFFER: usize = 64;

#[tonic::async_trait]
impl ChannelAssignment for ChannelAssignmentService {
    type WatchAssignmentEventsStream = EventStream;

    async fn watch_assignment_events(
        &self,
        request: Request<proto::WatchAssignmentEventsRequest>,
    ) -> Result<Response<Self::WatchAssignmentEventsStream>, Status> {
        let call = call_of(&request)?;
        let (sink, events) = mpsc::channel(WATCH_BUFFER);
        self.operations
            .watch_events(&call, request.get_ref().after_sequence, sink)
            .await?;
        Ok(Response::new(EventStream { events }))
    }

    async fn assign_mailbox(
        &self,
        request: Request<proto::AssignMailboxRequest>,
    ) -> Result<Response<proto::Identity>, Status> {
        let call = call_of(&request)?;
        let message = request.get_ref();
        let identity = self
            .operations
            .assign(
                &call,
                ChannelKind::Mailbox,
                &message.agent_handle,
                &message.mailbox_id,
            )
            .await?;
        Ok(Response::new(identity.into()))
    }

    async fn unassign_mailbox(
        &self,
        request: Request<proto::UnassignMailboxRequest>,
    ) -> Result<Response<()>, Status> {
        let call = call_of(&request)?;
        self.operations
            .unassign(&call, ChannelKind::Mailbox, &request.get_ref().agent_handle)
            .await?;
        Ok(Response::new(()))
    }

    async fn assign_phone_number(
        &self,
        request: Request<proto::AssignPhoneNumberRequest>,
    ) -> Result<Response<proto::Identity>, Status> {
        let call = call_of(&request)?;
        let message = request.get_ref();
        let identity = self
            .operations
            .assign(
                &call,
                ChannelKind::PhoneNumber,
                &message.agent_handle,
                &message.phone_number_id,
            )
            .await?;
        Ok(Response::new(identity.into()))
    }

    async fn get_identity(
        &self,
        request: Request<proto::GetIdentityRequest>,
    ) -> Result<Response<proto::Identity>, Status> {
        let call = call_of(&request)?;
        let identity = self
            .operations
            .get_identity(&call, &request.get_ref().agent_handle)
            .await?;
        Ok(Response::new(identity.into()))
    }

    async fn list_identities(
        &self,
        request: Request<proto::ListIdentitiesRequest>,
    ) -> Result<Response<proto::ListIdentitiesResponse>, Status> {
        let call = call_of(&request)?;
        let message = request.get_ref();
        let listed = self
            .operations
            .list_identities(&call, message.page_size, &message.page_token)
            .await?;
        Ok(Response::new(proto::ListIdentitiesResponse {
            identities: listed.items.into_iter().map(Into::into).collect(),
            next_page_token: listed.next_page_token,
        }))
    }

    async fn lookup_identity(
        &self,
        request: Request<proto::LookupIdentityRequest>,
    ) -> Result<Response<proto::Identity>, Status> {
        use proto::lookup_identity_request::Channel;
        let call = call_of(&request)?;
        let key = request
            .get_ref()
            .channel
            .as_ref()
            .map(|channel| match channel {
                Channel::MailboxId(raw) => RawLookup::MailboxId(raw),
                Channel::EmailAddress(raw) => RawLookup::EmailAddress(raw),
                Channel::PhoneNumberId(raw) => RawLookup::PhoneNumberId(raw),
                Channel::PhoneNumber(raw) => RawLookup::PhoneNumber(raw),
            });
        let identity = self.operations.lookup_identity(&call, key).await?;
        Ok(Response::new(identity.into()))
    }

    async fn list_assignment_events(
        &self,
        request: Request<proto::ListAssignmentEventsRequest>,
    ) -> Result<Response<proto::ListAssignmentEventsResponse>, Status> {
        let call = call_of(&request)?;
        let message = request.get_ref();
        let (events, next_after_sequence) = self
            .operations
            .list_events(&call, message.after_sequence, message.page_size)
            .await?;
        Ok(Response::new(proto::ListAssignmentEventsResponse {
            events: events.into_iter().map(Into::into).collect(),
            next_after_sequence,
        }))
    }

    async fn unassign_phone_number(
        &self,
        request: Request<proto::UnassignPhoneNumberRequest>,
    ) -> Result<Response<()>, Status> {
        let call = call_of(&request)?;
        self.operations
            .unassign(
                &call,
                ChannelKind::PhoneNumber,
                &request.get_ref().agent_handle,
            )
            .await?;
        Ok(Response::new(()))
    }
}
