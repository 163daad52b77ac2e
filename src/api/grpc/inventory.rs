//! The `ChannelInventory` RPCs over gRPC (the scope is checked by the
//! service's interceptor, before the message is read).

use tonic::{Request, Response, Status};

use super::assignment::call_of;
use super::convert::{identity_status, mailbox_status, phone_number_status, phone_number_type};
use crate::operations::Operations;
use crate::proto::{self, channel_inventory_server::ChannelInventory};

pub struct ChannelInventoryService {
    operations: Operations,
}

impl ChannelInventoryService {
    pub fn new(operations: Operations) -> Self {
        Self { operations }
    }
}

#[tonic::async_trait]
impl ChannelInventory for ChannelInventoryService {
    async fn upsert_identity(
        &self,
        request: Request<proto::UpsertIdentityRequest>,
    ) -> Result<Response<proto::Identity>, Status> {
        let call = call_of(&request)?;
        let message = request.get_ref();
        let identity = self
            .operations
            .upsert_identity(
                &call,
                &message.agent_handle,
                &message.display_name,
                identity_status(message.status),
            )
            .await?;
        Ok(Response::new(identity.into()))
    }

    async fn upsert_mailbox(
        &self,
        request: Request<proto::UpsertMailboxRequest>,
    ) -> Result<Response<proto::Mailbox>, Status> {
        let call = call_of(&request)?;
        let message = request.get_ref();
        let mailbox = self
            .operations
            .upsert_mailbox(
                &call,
                &message.mailbox_id,
                &message.email_address,
                &message.display_name,
                mailbox_status(message.status),
            )
            .await?;
        Ok(Response::new(mailbox.into()))
    }

    async fn upsert_phone_number(
        &self,
        request: Request<proto::UpsertPhoneNumberRequest>,
    ) -> Result<Response<proto::PhoneNumber>, Status> {
        let call = call_of(&request)?;
        let message = request.get_ref();
        let phone_number = self
            .operations
            .upsert_phone_number(
                &call,
                &message.phone_number_id,
                &message.number,
                phone_number_type(message.r#type),
                phone_number_status(message.status),
                &message.incoming_call_action,
            )
            .await?;
        Ok(Response::new(phone_number.into()))
    }

    async fn list_mailboxes(
        &self,
        request: Request<proto::ListMailboxesRequest>,
    ) -> Result<Response<proto::ListMailboxesResponse>, Status> {
        let call = call_of(&request)?;
        let message = request.get_ref();
        let listed = self
            .operations
            .list_mailboxes(
                &call,
                message.page_size,
                &message.page_token,
                message.unassigned_only,
            )
            .await?;
        Ok(Response::new(proto::ListMailboxesResponse {
            mailboxes: listed.items.into_iter().map(Into::into).collect(),
            next_page_token: listed.next_page_token,
        }))
    }

    async fn list_phone_numbers(
        &self,
        request: Request<proto::ListPhoneNumbersRequest>,
    ) -> Result<Response<proto::ListPhoneNumbersResponse>, Status> {
        let call = call_of(&request)?;
        let message = request.get_ref();
        let listed = self
            .operations
            .list_phone_numbers(
                &call,
                message.page_size,
                &message.page_token,
                message.unassigned_only,
            )
            .await?;
        Ok(Response::new(proto::ListPhoneNumbersResponse {
            phone_numbers: listed.items.into_iter().map(Into::into).collect(),
            next_page_token: listed.next_page_token,
        }))
    }
}
