//! A server-wide budget of requests in progress, over every service and
//! connection (health and reflection included): each one held costs memory
//! (its HTTP/2 stream, its request, its handler), and an unauthenticated
//! caller can open streams whose bodies never come on as many connections as
//! the connection cap allows. Past the budget, a new request is answered
//! RESOURCE_EXHAUSTED at once and costs nothing more; a place is held until
//! the response has been sent (a `Watch` stream's for as long as it lasts).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::sync::Semaphore;
use tonic::{body::Body, server::NamedService};
use tower::{Layer, Service};

use crate::api::grpc::body::GuardedBody;
use crate::error::ServiceError;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct StreamBudgetLayer {
    places: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl StreamBudgetLayer {
    pub fn new(budget: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            places: Arc::new(Semaphore::new(budget)),
            metrics,
        }
    }
}

impl<S> Layer<S> for StreamBudgetLayer {
    type Service = StreamBudget<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StreamBudget {
            inner,
            places: Arc::clone(&self.places),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Clone)]
pub struct StreamBudget<S> {
    inner: S,
    places: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl<S: NamedService> NamedService for StreamBudget<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for StreamBudget<S>
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
        let Ok(place) = Arc::clone(&self.places).try_acquire_owned() else {
            self.metrics.request_shed("streams");
            let status = tonic::Status::from(ServiceError::ServerBusy);
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| GuardedBody::wrap(body, place)))
        })
    }
}
