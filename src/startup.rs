//! Builds the server from settings, binds it, serves, and drains on shutdown.

use std::{future::Future, net::SocketAddr, str::FromStr, sync::Arc, time::Duration};

use anyhow::Context as _;
use sqlx::postgres::PgConnectOptions;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::task::AbortOnDropHandle;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::api::grpc::assignment::ChannelAssignmentService;
use crate::api::grpc::connections::{ConnectionLimits, Incoming};
use crate::api::grpc::health::{
    DATABASE_DEPENDENT_SERVICES, LIVENESS, LimitWatchStreams, monitor_database,
};
use crate::api::grpc::inventory::ChannelInventoryService;
use crate::api::grpc::observe::{self, ObserveRpcLayer};
use crate::api::grpc::streams::StreamBudgetLayer;
use crate::api::grpc::transport_errors::TransportErrorsLayer;
use crate::api::grpc::{MAX_MESSAGE_SIZE, MAX_RESPONSE_SIZE};
use crate::api::http::{self as rest, HttpState, server::HttpLimits};
use crate::auth::{Authenticator, INVENTORY_SCOPE};
use crate::config::ServeSettings;
use crate::error::ServiceError;
use crate::events::hub::EventHub;
use crate::events::relay::Relay;
use crate::metrics::Metrics;
use crate::operations::Operations;
use crate::operations::admission::Admission;
use crate::operations::page::PageTokens;
use crate::proto::channel_assignment_server::ChannelAssignmentServer;
use crate::proto::channel_inventory_server::ChannelInventoryServer;
use crate::store::Store;
use crate::store::database::Database;
use tonic::service::interceptor::InterceptedService;
use tower::Layer as _;

/// How long a keepalive ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Room for an oversized token to reach the auth check (which refuses it
/// with UNAUTHENTICATED) instead of failing as HTTP 431.
const MAX_HEADER_LIST_SIZE: u32 = 4 * crate::auth::MAX_TOKEN_LEN as u32;
/// Every unary RPC, health and reflection included, must be answered within
/// the request timeout plus this, counted from its headers: a stream whose
/// body never arrives is not held for ever. The service's own RPCs answer
/// within the request timeout; the slack keeps this bound from cutting them.
const UNARY_SLACK: Duration = Duration::from_secs(1);

/// Connection options for `database_url`, with a server-side statement
/// timeout so that abandoned statements do not run on.
pub fn connect_options(
    database_url: &str,
    statement_timeout: Duration,
) -> anyhow::Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(database_url)
        .context("DATABASE_URL is not a valid PostgreSQL connection string")?;
    Ok(service_options(options, statement_timeout))
}

/// `options` with what the service sets on each of its sessions.
pub fn service_options(options: PgConnectOptions, statement_timeout: Duration) -> PgConnectOptions {
    let statement_timeout_ms = statement_timeout.as_millis().to_string();
    options
        .application_name("channel-assignment")
        .options([("statement_timeout", statement_timeout_ms.as_str())])
}

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    http_listener: TcpListener,
    http_addr: SocketAddr,
    metrics_listener: Option<TcpListener>,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    settings: ServeSettings,
    authenticator: Arc<Authenticator>,
    store: Store,
}

impl Application {
    /// Checks the settings and binds the listener; serving starts with `run`.
    pub async fn build(settings: ServeSettings, database: Database) -> anyhow::Result<Self> {
        let authenticator = Arc::new(Authenticator::start(&settings.auth).await?);
        let listener = TcpListener::bind(settings.grpc_listen_addr.as_str())
            .await
            .with_context(|| format!("cannot listen on {}", settings.grpc_listen_addr))?;
        let local_addr = listener.local_addr()?;
        let http_listener = TcpListener::bind(settings.http_listen_addr.as_str())
            .await
            .with_context(|| format!("cannot listen on {}", settings.http_listen_addr))?;
        let http_addr = http_listener.local_addr()?;
        let metrics_listener = bind_metrics(settings.metrics_listen_addr.as_deref()).await?;
        let metrics_addr = metrics_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        let metrics = Metrics::new(settings.database.database_max_connections);
        Ok(Self {
            listener,
            local_addr,
            http_listener,
            http_addr,
            metrics_listener,
            metrics_addr,
            store: Store::new(database, Arc::clone(&metrics)),
            metrics,
            settings,
            authenticator,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the REST API is served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where metrics are served; `None` when the default port was taken.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Serves until `shutdown` completes, then reports NOT_SERVING, lets
    /// in-flight RPCs finish (bounded by the drain timeout) and closes the pool.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let Self {
            listener,
            local_addr,
            http_listener,
            http_addr,
            metrics_listener,
            metrics_addr,
            metrics,
            settings,
            authenticator,
            store,
        } = self;

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        // Nothing is SERVING before the database has answered once.
        for name in DATABASE_DEPENDENT_SERVICES {
            health_reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        health_reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        // Background tasks end with `run`, even if its future is dropped.
        let monitor = AbortOnDropHandle::new(tokio::spawn(monitor_database(
            store.clone(),
            health_reporter.clone(),
            settings.health_check_interval,
            settings.database.database_acquire_timeout,
        )));

        let trimmer = AbortOnDropHandle::new(tokio::spawn(give_back_freed_memory()));
        let pruner = AbortOnDropHandle::new(tokio::spawn(prune_events(
            store.clone(),
            settings.events_retention,
        )));

        let reflection_v1 = reflection_builder().build_v1()?;
        let reflection_v1alpha = reflection_builder().build_v1alpha()?;

        let admission = Admission::new(
            settings.max_concurrent_requests,
            settings.max_concurrent_requests_per_organization,
            Arc::clone(&metrics),
        );
        let (drain_started, drain_started_rx) = watch::channel(false);
        let (events, events_listener) = EventHub::start(store.database().connect_options());
        let events_listener = AbortOnDropHandle::new(events_listener);
        let relay = settings.events_nats_url.clone().map(|nats_url| {
            tokio::spawn(
                Relay {
                    store: store.clone(),
                    options: store.database().connect_options(),
                    nats_url,
                    events: events.clone(),
                    stopping: drain_started_rx.clone(),
                    metrics: Arc::clone(&metrics),
                }
                .run(),
            )
        });
        let operations = Operations::new(
            store.clone(),
            admission,
            settings.request_timeout,
            PageTokens::new(page_token_key(&settings)),
            events.clone(),
            drain_started_rx.clone(),
        );
        // The REST API: the same operations (and so the same admission,
        // deadlines and error table) and the same authenticator as gRPC.
        let http_router = rest::router(
            HttpState::new(
                operations.clone(),
                Arc::clone(&authenticator),
                settings.request_timeout,
            ),
            Arc::clone(&metrics),
        );
        let observe = ObserveRpcLayer::new(Arc::clone(&metrics));
        let assignment =
            ChannelAssignmentServer::new(ChannelAssignmentService::new(operations.clone()))
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_RESPONSE_SIZE);
        let assignment = InterceptedService::new(
            TransportErrorsLayer.layer(assignment),
            authenticate(Arc::clone(&authenticator), None),
        );
        let assignment = observe.layer(assignment);
        let inventory = ChannelInventoryServer::new(ChannelInventoryService::new(operations))
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_RESPONSE_SIZE);
        let inventory = InterceptedService::new(
            TransportErrorsLayer.layer(inventory),
            authenticate(authenticator, Some(INVENTORY_SCOPE)),
        );
        let inventory = observe.layer(inventory);

        // Metrics stay up through the drain, and stop with the gRPC server.
        let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics_task = metrics_listener.map(|metrics_listener| {
            let metrics_server = axum::serve(
                metrics_listener,
                crate::metrics::router(Arc::clone(&metrics), store.clone(), events.clone()),
            )
            .with_graceful_shutdown(async {
                let _ = metrics_stopped.await;
            });
            AbortOnDropHandle::new(tokio::spawn(async move {
                if let Err(error) = metrics_server.await {
                    tracing::error!(%error, "metrics endpoint failed");
                }
            }))
        });
        if let Some(address) = metrics_addr {
            tracing::info!(%address, "serving metrics");
        }

        let incoming = Incoming::new(
            listener,
            ConnectionLimits {
                max_connections: settings.max_connections,
                handshake_timeout: settings.handshake_timeout,
            },
            Arc::clone(&metrics),
        );
        let health_service =
            LimitWatchStreams::new(health_service, settings.max_watch_streams_per_connection);
        let mut drain_started_rx = drain_started_rx;
        let reporter = health_reporter.clone();
        let shutdown_delay = settings.shutdown_delay;
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: reporting NOT_SERVING and draining in-flight rpcs");
            // Stopped first, so that it cannot report SERVING again.
            monitor.abort();
            let _ = monitor.await;
            for name in DATABASE_DEPENDENT_SERVICES {
                reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            // Still serving, while load balancers notice NOT_SERVING.
            tokio::time::sleep(shutdown_delay).await;
            let _ = drain_started.send(true);
        };

        tracing::info!(address = %local_addr, "serving gRPC");
        let server = Server::builder()
            .layer(StreamBudgetLayer::new(
                settings.max_streams_in_progress,
                Arc::clone(&metrics),
            ))
            .max_concurrent_streams(Some(settings.max_concurrent_streams))
            .timeout(settings.request_timeout + UNARY_SLACK)
            .http2_keepalive_interval(Some(settings.keepalive_interval))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_connection_age(settings.max_connection_age)
            .max_connection_age_grace(settings.max_connection_age_grace)
            .http2_max_header_list_size(Some(MAX_HEADER_LIST_SIZE))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(assignment)
            .add_service(inventory)
            .serve_with_incoming_shutdown(incoming, signal);

        // Serves REST until the drain starts (when gRPC's does), then lets
        // its in-flight requests finish.
        tracing::info!(address = %http_addr, "serving REST");
        let http_server = rest::server::serve(
            http_listener,
            http_router,
            HttpLimits {
                max_connections: settings.max_connections,
                header_timeout: settings.handshake_timeout,
            },
            Arc::clone(&metrics),
            drain_started_rx.clone(),
        );
        let servers = async {
            // A gRPC server that fails drops its shutdown signal, and with
            // it the drain's sender: the REST server stops then too.
            let (grpc, ()) = tokio::join!(server, http_server);
            grpc
        };

        // An open stream (a health Watch) would hold the drain forever.
        let drain_timeout = settings.shutdown_drain_timeout;
        let drain_deadline = async move {
            let _ = drain_started_rx.wait_for(|started| *started).await;
            tokio::time::sleep(drain_timeout).await;
        };
        tokio::select! {
            served = servers => served.context("gRPC server failed")?,
            () = drain_deadline => {
                tracing::warn!(?drain_timeout, "drain timed out; closing remaining connections");
            }
        }
        let _ = stop_metrics.send(());
        if let Some(metrics_task) = metrics_task {
            let _ = metrics_task.await;
        }
        if let Some(relay) = relay {
            // It stops after the batch in progress; a stuck publish is cut.
            let relay = AbortOnDropHandle::new(relay);
            let _ = tokio::time::timeout(RELAY_STOP_TIMEOUT, relay).await;
        }
        trimmer.abort();
        pruner.abort();
        events_listener.abort();
        store.database().close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The interceptor of a service: the caller's credentials, checked before
/// the message is read (401, then 403 for the organization, then for the
/// scope, when the service needs one); the caller goes on the request.
fn authenticate(
    authenticator: Arc<Authenticator>,
    required_scope: Option<&'static str>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut request: tonic::Request<()>| {
        let caller = authenticator.caller(request.metadata())?;
        observe::record_organization(caller.organization.as_str());
        if let Some(scope) = required_scope
            && !caller.has_scope(scope)
        {
            return Err(ServiceError::ScopeMissing(scope).into());
        }
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The key page tokens are signed with: `PAGE_TOKEN_SECRET`, else one
/// derived from the HS256 secret (both shared by every replica, so a token
/// from one is good at another), else a random one (good on this replica
/// only, until it restarts; said at start).
fn page_token_key(settings: &ServeSettings) -> Vec<u8> {
    if let Some(secret) = &settings.page_token_secret {
        return secret.as_bytes().to_vec();
    }
    if let Some(secret) = &settings.auth.hs256_secret {
        use sha2::Digest as _;
        return sha2::Sha256::new()
            .chain_update(b"channel-assignment page tokens\0")
            .chain_update(secret.as_bytes())
            .finalize()
            .to_vec();
    }
    tracing::warn!(
        "PAGE_TOKEN_SECRET is not set: page tokens are signed with a random key, \
         good on this replica only until it restarts"
    );
    uuid::Uuid::new_v4().as_bytes().to_vec()
}

/// How long the event relay may take to finish its batch when the server
/// stops.
const RELAY_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How often events older than the retention are removed (the contract asks
/// for at least once a minute).
const PRUNE_INTERVAL: Duration = Duration::from_secs(30);

/// Removes change events older than `retention`, in the background; a
/// failure (the database away) is tried again at the next round.
async fn prune_events(store: Store, retention: Duration) {
    let mut ticks = tokio::time::interval(PRUNE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match store.prune_events(retention).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "removed change events past their retention"),
            Err(error) => tracing::warn!(%error, "could not remove old change events"),
        }
    }
}

/// How often memory freed by the allocator is handed back to the system.
const MEMORY_TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// glibc's allocator keeps what a burst (thousands of streams or
/// connections, gone again) freed inside its arenas: RSS stayed at the
/// burst's peak for good (RELIABILITY.md, "Hostile callers"). `malloc_trim`
/// returns the free pages of every arena; it takes well under a millisecond
/// on this service's heap. (mimalloc, tried instead, raised RSS.)
async fn give_back_freed_memory() {
    let mut ticks = tokio::time::interval(MEMORY_TRIM_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim takes no pointers and is thread-safe (it locks
        // each arena it trims); it only releases free memory.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Where metrics are served when METRICS_LISTEN_ADDR is not set.
pub const DEFAULT_METRICS_LISTEN_ADDR: &str = "0.0.0.0:9090";

/// Binds the metrics listener. A configured address must be bound; the
/// default one is best effort, so that a taken port 9090 (another instance,
/// another program) does not keep the service itself from starting.
async fn bind_metrics(configured: Option<&str>) -> anyhow::Result<Option<TcpListener>> {
    if let Some(address) = configured {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address} (METRICS_LISTEN_ADDR)"))?;
        return Ok(Some(listener));
    }
    match TcpListener::bind(DEFAULT_METRICS_LISTEN_ADDR).await {
        Ok(listener) => Ok(Some(listener)),
        Err(error) => {
            tracing::warn!(
                %error,
                address = DEFAULT_METRICS_LISTEN_ADDR,
                "metrics port taken: serving without metrics (set METRICS_LISTEN_ADDR to choose one)"
            );
            Ok(None)
        }
    }
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // So that grpcurl can decode google.rpc error details.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}
