//! gRPC: one module per service, and the layers every connection and call
//! of the server goes through.

pub mod assignment;
pub mod body;
pub mod codec;
pub mod connections;
pub mod convert;
pub mod health;
pub mod inventory;
pub mod observe;
pub mod streams;
pub mod transport_errors;

/// Largest request message accepted; the real ones are a few hundred bytes.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// Largest response sent: a page of 1000 identities with their channels
/// (every text field bounded at upsert) stays well under it.
pub const MAX_RESPONSE_SIZE: usize = 4 * 1024 * 1024;
