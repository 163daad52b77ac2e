//! Starts the real server on an ephemeral port against the test's own
//! database, and talks to it with the generated tonic clients.

use std::{path::PathBuf, time::Duration};

use channel_assignment::{
    config::{AuthSettings, ServeSettings},
    proto::{
        self, Identity, channel_assignment_client::ChannelAssignmentClient,
        channel_inventory_client::ChannelInventoryClient,
    },
    startup::{self, Application},
    store::database::Database,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sqlx::PgPool;
use tokio::{sync::oneshot, task::JoinHandle};
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt as _;
use uuid::Uuid;

pub const SECRET: &str = "integration-test-secret-0123456789";
pub const ORG: &str = "org_alpha";
pub const OTHER_ORG: &str = "org_beta";

pub struct TestApp {
    pub address: std::net::SocketAddr,
    pub channel: Channel,
    pub metrics_addr: std::net::SocketAddr,
    /// The REST API's address (tests/api/http*.rs).
    pub http_addr: std::net::SocketAddr,
    pub client: ChannelAssignmentClient<Channel>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<anyhow::Result<()>>,
}

/// The server with HS256 authentication, over the test's database.
pub async fn spawn_app(pool: &PgPool) -> TestApp {
    spawn_app_with(pool, AuthSettings::hs256(SECRET)).await
}

pub async fn spawn_app_with(pool: &PgPool, auth: AuthSettings) -> TestApp {
    spawn_app_with_settings(pool, test_settings(auth)).await
}

/// Settings as in production, but on an ephemeral loopback port and with a
/// fast health check.
pub fn test_settings(auth: AuthSettings) -> ServeSettings {
    let mut settings = ServeSettings::with_defaults(auth);
    settings.health_check_interval = Duration::from_millis(100);
    settings
}

/// The server over the test's database, with its own pool and session
/// settings, as in production.
pub async fn spawn_app_with_settings(pool: &PgPool, settings: ServeSettings) -> TestApp {
    let database = database_for(pool, &settings);
    let app = spawn_app_on(database, settings).await;
    // Ready, as Kubernetes would wait for it to be, before any test step.
    wait_for(&app, "readiness", ServingStatus::Serving).await;
    app
}

/// The service as in production (its own pool, `application_name`,
/// `statement_timeout`), reaching the test's database on `port`.
pub async fn spawn_app_via_port(
    pool: &PgPool,
    port: u16,
    tweak: impl FnOnce(&mut ServeSettings),
) -> TestApp {
    let mut settings = test_settings(AuthSettings::hs256(SECRET));
    tweak(&mut settings);
    let options = startup::service_options(
        (*pool.connect_options()).clone().port(port),
        settings.request_timeout,
    );
    let database = Database::new(options, &settings.database).unwrap();
    spawn_app_on(database, settings).await
}

/// Where the test's database listens.
pub async fn database_address(pool: &PgPool) -> std::net::SocketAddr {
    let options = pool.connect_options();
    tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap()
}

/// A service pool on the test's database.
pub fn database_for(pool: &PgPool, settings: &ServeSettings) -> Database {
    let options =
        startup::service_options((*pool.connect_options()).clone(), settings.request_timeout);
    Database::new(options, &settings.database).expect("valid pool settings")
}

pub async fn spawn_app_on(database: Database, settings: ServeSettings) -> TestApp {
    let application = Application::build(settings, database)
        .await
        .expect("the application builds");
    let address = application.local_addr();
    let http_addr = application.http_addr();
    let metrics_addr = application
        .metrics_addr()
        .expect("test settings name a metrics address");
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(application.run(async {
        if shutdown_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    }));
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("a valid uri")
        .connect()
        .await
        .expect("the server accepts connections once bound");
    TestApp {
        address,
        metrics_addr,
        http_addr,
        client: ChannelAssignmentClient::new(channel.clone()),
        channel,
        shutdown: Some(shutdown),
        server,
    }
}

/// Waits, through the health Watch stream, until `service` reports `wanted`.
pub async fn wait_for(app: &TestApp, service: &str, wanted: ServingStatus) {
    let mut updates = HealthClient::new(app.channel.clone())
        .watch(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("watch")
        .into_inner();
    let reached = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(update) = updates.next().await {
            if update.expect("health update").status() == wanted {
                return;
            }
        }
        panic!("the health stream ended");
    })
    .await;
    assert!(reached.is_ok(), "{service:?} never became {wanted:?}");
}

/// A test that ends without `stop` takes the server (and its connections)
/// with it, so that the test's database can be dropped.
impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl TestApp {
    pub fn inventory(&self) -> ChannelInventoryClient<Channel> {
        ChannelInventoryClient::new(self.channel.clone())
    }

    pub async fn get_identity(&self, org: &str, handle: &str) -> Result<Identity, Status> {
        self.client
            .clone()
            .get_identity(authorized(
                proto::GetIdentityRequest {
                    agent_handle: handle.to_owned(),
                },
                org,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn lookup(
        &self,
        org: &str,
        channel: proto::lookup_identity_request::Channel,
    ) -> Result<Identity, Status> {
        self.client
            .clone()
            .lookup_identity(authorized(
                proto::LookupIdentityRequest {
                    channel: Some(channel),
                },
                org,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn list_identities(
        &self,
        org: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<proto::ListIdentitiesResponse, Status> {
        self.client
            .clone()
            .list_identities(authorized(
                proto::ListIdentitiesRequest {
                    page_size,
                    page_token: page_token.to_owned(),
                },
                org,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn upsert_identity(
        &self,
        org: &str,
        message: proto::UpsertIdentityRequest,
    ) -> Result<Identity, Status> {
        self.inventory()
            .upsert_identity(inventory_authorized(message, org))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn upsert_mailbox(
        &self,
        org: &str,
        message: proto::UpsertMailboxRequest,
    ) -> Result<proto::Mailbox, Status> {
        self.inventory()
            .upsert_mailbox(inventory_authorized(message, org))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn upsert_phone_number(
        &self,
        org: &str,
        message: proto::UpsertPhoneNumberRequest,
    ) -> Result<proto::PhoneNumber, Status> {
        self.inventory()
            .upsert_phone_number(inventory_authorized(message, org))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Asks the server to stop, as SIGTERM would, without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Stops the server as SIGTERM would and waits until it has drained.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        (&mut self.server)
            .await
            .expect("the server task does not panic")
            .expect("the server stops cleanly");
    }

    pub async fn assign_mailbox(
        &self,
        org: &str,
        handle: &str,
        mailbox_id: &str,
    ) -> Result<Identity, Status> {
        let message = proto::AssignMailboxRequest {
            agent_handle: handle.to_owned(),
            mailbox_id: mailbox_id.to_owned(),
        };
        self.client
            .clone()
            .assign_mailbox(authorized(message, org))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn unassign_mailbox(&self, org: &str, handle: &str) -> Result<(), Status> {
        let message = proto::UnassignMailboxRequest {
            agent_handle: handle.to_owned(),
        };
        self.client
            .clone()
            .unassign_mailbox(authorized(message, org))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn assign_phone_number(
        &self,
        org: &str,
        handle: &str,
        phone_number_id: &str,
    ) -> Result<Identity, Status> {
        let message = proto::AssignPhoneNumberRequest {
            agent_handle: handle.to_owned(),
            phone_number_id: phone_number_id.to_owned(),
        };
        self.client
            .clone()
            .assign_phone_number(authorized(message, org))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn unassign_phone_number(&self, org: &str, handle: &str) -> Result<(), Status> {
        let message = proto::UnassignPhoneNumberRequest {
            agent_handle: handle.to_owned(),
        };
        self.client
            .clone()
            .unassign_phone_number(authorized(message, org))
            .await
            .map(tonic::Response::into_inner)
    }
}

/// The kinds of channel, so that each scenario runs for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Mailbox,
    PhoneNumber,
}

impl Kind {
    pub async fn insert(self, pool: &PgPool, org: &str) -> Uuid {
        match self {
            Kind::Mailbox => insert_mailbox(pool, org).await,
            Kind::PhoneNumber => insert_phone_number(pool, org).await,
        }
    }

    pub async fn assign(
        self,
        app: &TestApp,
        org: &str,
        handle: &str,
        id: &str,
    ) -> Result<Identity, Status> {
        match self {
            Kind::Mailbox => app.assign_mailbox(org, handle, id).await,
            Kind::PhoneNumber => app.assign_phone_number(org, handle, id).await,
        }
    }

    pub async fn unassign(self, app: &TestApp, org: &str, handle: &str) -> Result<(), Status> {
        match self {
            Kind::Mailbox => app.unassign_mailbox(org, handle).await,
            Kind::PhoneNumber => app.unassign_phone_number(org, handle).await,
        }
    }

    /// The id of the channel of this kind in an identity detail.
    pub fn linked_in(self, identity: &Identity) -> Option<String> {
        match self {
            Kind::Mailbox => identity.mailbox.as_ref().map(|m| m.id.clone()),
            Kind::PhoneNumber => identity.phone_number.as_ref().map(|p| p.id.clone()),
        }
    }

    /// The id of the channel of this kind linked to `handle`, read from the database.
    pub async fn linked_to(self, pool: &PgPool, org: &str, handle: &str) -> Option<Uuid> {
        let sql = match self {
            Kind::Mailbox => {
                "SELECT mailbox_id FROM identities WHERE organization_id = $1 AND agent_handle = $2"
            }
            Kind::PhoneNumber => {
                "SELECT phone_number_id FROM identities WHERE organization_id = $1 AND agent_handle = $2"
            }
        };
        sqlx::query_scalar(sql)
            .bind(org)
            .bind(handle)
            .fetch_one(pool)
            .await
            .expect("the identity exists")
    }

    /// How many identities hold channel `id`.
    pub async fn holders(self, pool: &PgPool, id: Uuid) -> i64 {
        let sql = match self {
            Kind::Mailbox => "SELECT count(*) FROM identities WHERE mailbox_id = $1",
            Kind::PhoneNumber => "SELECT count(*) FROM identities WHERE phone_number_id = $1",
        };
        sqlx::query_scalar(sql)
            .bind(id)
            .fetch_one(pool)
            .await
            .expect("count")
    }

    pub async fn set_status(self, pool: &PgPool, id: Uuid, status: &str) {
        let sql = match self {
            Kind::Mailbox => "UPDATE mailboxes SET status = $2 WHERE id = $1",
            Kind::PhoneNumber => "UPDATE phone_numbers SET status = $2 WHERE id = $1",
        };
        sqlx::query(sql)
            .bind(id)
            .bind(status)
            .execute(pool)
            .await
            .expect("status set");
    }

    /// The status that means "gone" for this kind.
    pub fn gone_status(self) -> &'static str {
        match self {
            Kind::Mailbox => "deleted",
            Kind::PhoneNumber => "released",
        }
    }

    pub fn id_field(self) -> &'static str {
        match self {
            Kind::Mailbox => "mailbox_id",
            Kind::PhoneNumber => "phone_number_id",
        }
    }

    pub fn not_found_reason(self) -> &'static str {
        match self {
            Kind::Mailbox => "MAILBOX_NOT_FOUND",
            Kind::PhoneNumber => "PHONE_NUMBER_NOT_FOUND",
        }
    }

    pub fn already_assigned_reason(self) -> &'static str {
        match self {
            Kind::Mailbox => "MAILBOX_ALREADY_ASSIGNED",
            Kind::PhoneNumber => "PHONE_NUMBER_ALREADY_ASSIGNED",
        }
    }
}

/// Runs a scenario `async fn name(kind: Kind, pool: PgPool)` once per kind,
/// each on its own database.
#[macro_export]
macro_rules! for_each_kind {
    ($($scenario:ident),+ $(,)?) => {
        $(
            mod $scenario {
                #[sqlx::test]
                async fn mailbox(pool: sqlx::PgPool) {
                    super::$scenario($crate::helpers::Kind::Mailbox, pool).await
                }

                #[sqlx::test]
                async fn phone_number(pool: sqlx::PgPool) {
                    super::$scenario($crate::helpers::Kind::PhoneNumber, pool).await
                }
            }
        )+
    };
}

pub fn authorized<T>(message: T, org: &str) -> Request<T> {
    with_bearer(message, &hs256_token(org))
}

pub fn with_bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii metadata"),
    );
    request
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A request with a token that grants the inventory scope.
pub fn inventory_authorized<T>(message: T, org: &str) -> Request<T> {
    with_bearer(message, &scoped_token(org, "channels.inventory"))
}

/// A token for `org` granting `scope` (space-separated OAuth 2 scopes).
pub fn scoped_token(org: &str, scope: &str) -> String {
    sign_hs256(
        &serde_json::json!({ "org_id": org, "exp": now() + 3600, "scope": scope }),
        SECRET,
    )
}

/// A token as the identity provider issues it: `org_id`, valid for an hour.
pub fn hs256_token(org: &str) -> String {
    sign_hs256(
        &serde_json::json!({ "org_id": org, "exp": now() + 3600 }),
        SECRET,
    )
}

pub fn sign_hs256(claims: &serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token signs")
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn sign_with_pem(
    algorithm: Algorithm,
    private_key_file: &str,
    claims: &serde_json::Value,
) -> String {
    let pem = std::fs::read(fixture(private_key_file)).expect("fixture key");
    let key = match algorithm {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    }
    .expect("fixture key parses");
    jsonwebtoken::encode(&Header::new(algorithm), claims, &key).expect("token signs")
}

pub async fn insert_identity(pool: &PgPool, org: &str, handle: &str) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO identities (organization_id, agent_handle, display_name)
         VALUES ($1, $2, 'Test ' || $2) RETURNING id",
    )
    .bind(org)
    .bind(handle)
    .fetch_one(pool)
    .await
    .expect("identity inserted")
}

pub async fn insert_mailbox(pool: &PgPool, org: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO mailboxes (organization_id, id, email_address, display_name)
         VALUES ($1, $2, $3, 'Inbox')",
    )
    .bind(org)
    .bind(id)
    .bind(format!("{}@agents.example", id.simple()))
    .execute(pool)
    .await
    .expect("mailbox inserted");
    id
}

pub async fn insert_phone_number(pool: &PgPool, org: &str) -> Uuid {
    let id = Uuid::new_v4();
    let digits = id.as_u128() % 10_000_000;
    sqlx::query("INSERT INTO phone_numbers (organization_id, id, number) VALUES ($1, $2, $3)")
        .bind(org)
        .bind(id)
        .bind(format!("+1415{digits:07}"))
        .execute(pool)
        .await
        .expect("phone number inserted");
    id
}

pub async fn set_identity_status(pool: &PgPool, org: &str, handle: &str, status: &str) {
    sqlx::query(
        "UPDATE identities SET status = $3 WHERE organization_id = $1 AND agent_handle = $2",
    )
    .bind(org)
    .bind(handle)
    .bind(status)
    .execute(pool)
    .await
    .expect("status set");
}

/// Every row of every table, to show that a failed request changed nothing.
pub async fn snapshot(pool: &PgPool) -> String {
    sqlx::query_scalar(
        "SELECT json_build_object(
            'identities', (SELECT coalesce(json_agg(t ORDER BY t.organization_id, t.id), '[]') FROM identities t),
            'mailboxes', (SELECT coalesce(json_agg(t ORDER BY t.organization_id, t.id), '[]') FROM mailboxes t),
            'phone_numbers', (SELECT coalesce(json_agg(t ORDER BY t.organization_id, t.id), '[]') FROM phone_numbers t)
        )::text",
    )
    .fetch_one(pool)
    .await
    .expect("snapshot")
}

/// Checks the code, the `ErrorInfo` (reason, domain, HTTP status of the REST
/// origin) and that the message leaks nothing internal.
pub fn assert_error(
    result: Result<impl std::fmt::Debug, Status>,
    code: Code,
    reason: &str,
) -> Status {
    let status = result.expect_err("the request fails");
    assert_eq!(status.code(), code, "code of {status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "reason of {status:?}");
    assert_eq!(info.domain, "channel-assignment");
    let http_status = match code {
        Code::Unauthenticated => "401",
        Code::PermissionDenied => "403",
        Code::NotFound => "404",
        Code::AlreadyExists => "409",
        Code::InvalidArgument => "422",
        Code::ResourceExhausted => "429",
        Code::Unavailable => "503",
        Code::DeadlineExceeded => "504",
        Code::FailedPrecondition => "410",
        _ => "500",
    };
    assert_eq!(
        info.metadata.get("http_status").map(String::as_str),
        Some(http_status)
    );
    let message = status.message().to_lowercase();
    for leak in [
        "select",
        "insert",
        "update ",
        "constraint",
        "sqlx",
        "postgres",
        "panicked",
    ] {
        assert!(!message.contains(leak), "message leaks {leak:?}: {message}");
    }
    status
}

/// The field violations of an INVALID_ARGUMENT error, as (field, description).
pub fn field_violations(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|bad_request| {
            bad_request
                .field_violations
                .into_iter()
                .map(|violation| violation.field)
                .collect()
        })
        .unwrap_or_default()
}

/// Holds the identity's row lock, so that a request for it has to wait.
pub async fn lock_identity(
    pool: &PgPool,
    handle: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM identities WHERE agent_handle = $1 FOR UPDATE")
        .bind(handle)
        .execute(&mut *lock)
        .await
        .unwrap();
    lock
}

/// Sends AssignMailbox for `handle` of ORG in the background, as a second
/// client would.
pub fn spawn_assign_mailbox(
    channel: Channel,
    handle: &str,
    mailbox: String,
) -> JoinHandle<Result<tonic::Response<Identity>, Status>> {
    let message = proto::AssignMailboxRequest {
        agent_handle: handle.to_owned(),
        mailbox_id: mailbox,
    };
    tokio::spawn(async move {
        ChannelAssignmentClient::new(channel)
            .assign_mailbox(authorized(message, ORG))
            .await
    })
}

/// Waits until a statement of the service waits on a lock.
pub async fn wait_until_blocked(pool: &PgPool) {
    let someone_waits = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock')";
    poll_until(pool, someone_waits, true).await;
}

/// Waits until no other session of this database runs a statement.
pub async fn wait_until_quiet(pool: &PgPool) {
    let someone_works = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'active')";
    poll_until(pool, someone_works, false).await;
}

/// Waits until the service's sessions have left this database (a stopped
/// or killed server's backends exit a moment after their sockets close), so
/// that the test's database can be dropped.
pub async fn wait_until_service_gone(pool: &PgPool) {
    let service_connected = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
        WHERE datname = current_database() AND application_name = 'channel-assignment')";
    poll_until(pool, service_connected, false).await;
}

/// Polls a yes/no query (every 25 ms, 10 s at most) until it answers `wanted`.
async fn poll_until(pool: &PgPool, question: &'static str, wanted: bool) {
    for _ in 0..400 {
        let answer: bool = sqlx::query_scalar(question).fetch_one(pool).await.unwrap();
        if answer == wanted {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{question} never answered {wanted}");
}
