//! channel-assignment: links mailboxes and phone numbers to AI-agent
//! identities, over gRPC, in front of PostgreSQL.
//!
//! - `api/grpc/` — the transport: one module per gRPC service, plus the
//!   server's own layers (connection bounds, health, error details, the
//!   per-RPC log line and metrics).
//! - `operations/` — what every RPC does whatever the transport: parse the
//!   arguments, admit the call, run its statement within its deadline.
//! - `store/` — all SQL, one statement per operation, and the pool.
//! - `domain`, `error`, `auth`, `config`, `metrics`, `telemetry`, `startup`:
//!   values valid by construction, the one error table, credentials, settings,
//!   observability, and the assembly of the server.

pub mod api;
pub mod auth;
pub mod config;
pub mod dev;
pub mod domain;
pub mod error;
pub mod events;
pub mod metrics;
pub mod operations;
pub mod startup;
pub mod store;
pub mod telemetry;

pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("channels.v1");

    /// The encoded descriptors of `channels.v1`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/channels_v1_descriptor.bin"));

    // Hand-written (build.rs skips the derive): ids and states, never e-mail
    // addresses, phone numbers or display names, so that a `{:?}` in a log
    // line cannot leak them.
    impl std::fmt::Debug for Identity {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Identity")
                .field("id", &self.id)
                .field("organization_id", &self.organization_id)
                .field("agent_handle", &self.agent_handle)
                .field("status", &self.status())
                .field("mailbox", &self.mailbox)
                .field("phone_number", &self.phone_number)
                .finish_non_exhaustive()
        }
    }

    impl std::fmt::Debug for Mailbox {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Mailbox")
                .field("id", &self.id)
                .field("status", &self.status())
                .finish_non_exhaustive()
        }
    }

    impl std::fmt::Debug for LookupIdentityRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let key = match &self.channel {
                Some(lookup_identity_request::Channel::MailboxId(id)) => {
                    ("mailbox_id", id.as_str())
                }
                Some(lookup_identity_request::Channel::PhoneNumberId(id)) => {
                    ("phone_number_id", id.as_str())
                }
                Some(lookup_identity_request::Channel::EmailAddress(_)) => ("email_address", "…"),
                Some(lookup_identity_request::Channel::PhoneNumber(_)) => ("phone_number", "…"),
                None => ("none", ""),
            };
            f.debug_struct("LookupIdentityRequest")
                .field(key.0, &key.1)
                .finish()
        }
    }

    impl std::fmt::Debug for UpsertIdentityRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("UpsertIdentityRequest")
                .field("agent_handle", &self.agent_handle)
                .field("status", &self.status())
                .finish_non_exhaustive()
        }
    }

    impl std::fmt::Debug for UpsertMailboxRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("UpsertMailboxRequest")
                .field("mailbox_id", &self.mailbox_id)
                .field("status", &self.status())
                .finish_non_exhaustive()
        }
    }

    impl std::fmt::Debug for UpsertPhoneNumberRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("UpsertPhoneNumberRequest")
                .field("phone_number_id", &self.phone_number_id)
                .field("type", &self.r#type())
                .field("status", &self.status())
                .finish_non_exhaustive()
        }
    }

    impl std::fmt::Debug for PhoneNumber {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("PhoneNumber")
                .field("id", &self.id)
                .field("type", &self.r#type())
                .field("status", &self.status())
                .finish_non_exhaustive()
        }
    }
}

/// The schema's migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[cfg(test)]
mod tests {
    use crate::proto::{Identity, Mailbox, PhoneNumber};

    #[test]
    fn debug_output_carries_no_personal_data() {
        let identity = Identity {
            id: "identity-id".into(),
            display_name: "Jane Secret".into(),
            mailbox: Some(Mailbox {
                id: "mailbox-id".into(),
                email_address: "jane@secret.example".into(),
                display_name: "Jane's inbox".into(),
                ..Default::default()
            }),
            phone_number: Some(PhoneNumber {
                id: "number-id".into(),
                number: "+14155550123".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let rendered = format!("{identity:?}");
        assert!(
            rendered.contains("mailbox-id") && rendered.contains("number-id"),
            "{rendered}"
        );
        for secret in ["Jane", "jane@secret.example", "+14155550123"] {
            assert!(!rendered.contains(secret), "{rendered}");
        }
    }
}
