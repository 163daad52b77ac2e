//! The service's transports. Each adapts requests to `operations` and
//! renders `error::ServiceError` in its own terms.

pub mod grpc;
pub mod http;
