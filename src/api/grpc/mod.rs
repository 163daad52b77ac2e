//! gRPC: one module per service, and the layers every connection and call
//! of the server goes through.

pub mod assignment;
pub mod codec;
pub mod connections;
pub mod convert;
pub mod health;
pub mod observe;
pub mod transport_errors;

/// Largest request message accepted; the real ones are a few hundred bytes.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;
