//! Refusals that tonic makes before the service's code runs (a message over
//! the size limit, an unknown method, a request whose body never arrived
//! whole) get the contract's error details too: every error of the service
//! carries an `ErrorInfo`, whoever produced it.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use tonic::{Code, Status, body::Body, server::NamedService};
use tower::{Layer, Service};

use crate::error::{FieldViolation, ServiceError};

#[derive(Clone, Copy, Default)]
pub struct TransportErrorsLayer;

impl<S> Layer<S> for TransportErrorsLayer {
    type Service = TransportErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TransportErrors { inner }
    }
}

#[derive(Clone)]
pub struct TransportErrors<S> {
    inner: S,
}

impl<S: NamedService> NamedService for TransportErrors<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for TransportErrors<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let body_failed = Arc::new(AtomicBool::new(false));
        let request = request.map(|body| {
            Body::new(WatchedBody {
                body,
                failed: Arc::clone(&body_failed),
            })
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(with_details(response, body_failed.load(Ordering::Acquire)))
        })
    }
}

/// `response`, or the contract's version of it when it is an error that
/// carries no details (so it came from tonic, not from the service).
fn with_details(response: http::Response<Body>, body_failed: bool) -> http::Response<Body> {
    let headers = response.headers();
    if headers.contains_key("grpc-status-details-bin") {
        return response;
    }
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map(Code::from_i32)
    else {
        return response;
    };
    let error = if body_failed {
        // The client reset the stream or went away mid-request: nobody is
        // left to answer, and it is no fault of the server's.
        ServiceError::RequestAbandoned
    } else {
        match code {
            Code::Ok => return response,
            Code::OutOfRange => ServiceError::MessageTooLarge(super::MAX_MESSAGE_SIZE),
            Code::Unimplemented => ServiceError::UnknownMethod,
            // tonic's own INTERNAL before the service ran: the request's
            // framing was broken (a length prefix longer than the body, a
            // compressed flag without an encoding). The caller's fault.
            Code::Internal | Code::Unknown => ServiceError::InvalidArgument(vec![FieldViolation {
                field: "request",
                description: "the request is not a well-formed gRPC message".to_owned(),
            }]),
            _ => {
                let message = headers
                    .get("grpc-message")
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or_default();
                ServiceError::Transport(code, message.to_owned())
            }
        }
    };
    Status::from(error).into_http()
}

/// A request body that remembers whether reading it failed.
struct WatchedBody {
    body: Body,
    failed: Arc<AtomicBool>,
}

impl http_body::Body for WatchedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &frame {
            self.failed.store(true, Ordering::Release);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
