//! Settings from flags, each with an environment variable as fallback.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "channel-assignment",
    version,
    about = "Links mailboxes and phone numbers to AI-agent identities, over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// How a command that logs writes its log lines.
#[derive(Debug, Clone, Args)]
pub struct LogSettings {
    /// How log lines are written.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Logs and trace export, for the commands that serve.
#[derive(Debug, Clone, Args)]
pub struct TelemetrySettings {
    #[command(flatten)]
    pub log: LogSettings,

    /// OTLP/gRPC endpoint (e.g. http://otel-collector:4317) to export trace
    /// spans to. Off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending database migrations, grant the serving role its
    /// privileges, and exit.
    Migrate(MigrateSettings),
    /// Serve gRPC and the REST API until SIGTERM or SIGINT.
    Serve(ServeSettings),
    /// A ready-to-try local instance: creates and migrates its own database,
    /// puts the demo organization back to its seed, prints a token and
    /// grpcurl commands, then serves.
    // Its database is its own: DATABASE_URL is the tests' (.cargo/config.toml
    // sets it, and cargo passes it to `cargo run` too), so dev reads
    // DEV_DATABASE_URL instead.
    #[command(mut_arg("database_url", |arg| arg
        .env("DEV_DATABASE_URL")
        .help("PostgreSQL connection string of dev's own database [default: postgres://postgres@127.0.0.1:5432/channel_assignment_dev]")))]
    Dev(ServeSettings),
    /// Print an HS256 token for an organization, signed with
    /// AUTH_JWT_HS256_SECRET; refuses (exit 1) what the server would refuse.
    Token(TokenSettings),
}

impl Command {
    /// How the command logs; `token` does not.
    pub fn log_format(&self) -> LogFormat {
        match self {
            Self::Serve(settings) | Self::Dev(settings) => settings.telemetry.log.log_format,
            Self::Migrate(settings) => settings.log.log_format,
            Self::Token(_) => LogFormat::Text,
        }
    }

    /// Where the command exports trace spans: only the commands that serve.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        match self {
            Self::Serve(settings) | Self::Dev(settings) => {
                settings.telemetry.otlp_endpoint.as_deref()
            }
            Self::Migrate(_) | Self::Token(_) => None,
        }
    }
}

const DATABASE_URL_HELP: &str = "PostgreSQL connection string.";

/// What `migrate` uses, and nothing it would ignore.
#[derive(Debug, Clone, Args)]
pub struct MigrateSettings {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, help = DATABASE_URL_HELP)]
    pub database_url: Option<String>,

    /// How long to wait for the connection to the database.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub database_acquire_timeout: Duration,

    /// The role `serve` connects as, when it is not the owner: granted
    /// exactly what the service needs on every table (schema usage; select,
    /// insert, update, and delete of old events), again on every run so that
    /// new tables are covered. Unset, or the owner itself: nothing is granted.
    #[arg(long, env = "DATABASE_APP_ROLE")]
    pub app_role: Option<String>,

    #[command(flatten)]
    pub log: LogSettings,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseSettings {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, help = DATABASE_URL_HELP)]
    pub database_url: Option<String>,

    /// Most connections the service opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,

    /// How long a request waits for a free connection before it fails with
    /// UNAVAILABLE. Keep it below the request timeout.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub database_acquire_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ServeSettings {
    #[command(flatten)]
    pub database: DatabaseSettings,

    #[command(flatten)]
    pub auth: AuthSettings,

    #[command(flatten)]
    pub telemetry: TelemetrySettings,

    /// Address the gRPC server listens on: host:port, [v6]:port, or :port
    /// for all IPv4 interfaces.
    #[arg(long, env = "GRPC_LISTEN_ADDR", default_value = "0.0.0.0:50051", value_parser = parse_listen_address)]
    pub grpc_listen_addr: String,

    /// Address the REST API (HTTP/1.1, JSON) listens on, beside gRPC:
    /// host:port, [v6]:port, or :port.
    #[arg(long, env = "HTTP_LISTEN_ADDR", default_value = "0.0.0.0:8080", value_parser = parse_listen_address)]
    pub http_listen_addr: String,

    /// Address of the Prometheus metrics endpoint (plain HTTP, /metrics).
    /// Unset, 0.0.0.0:9090 is tried, and if that port is taken the service
    /// runs without metrics (with a warning) rather than not at all; set, a
    /// port that cannot be bound stops the start.
    #[arg(long, env = "METRICS_LISTEN_ADDR", value_parser = parse_listen_address)]
    pub metrics_listen_addr: Option<String>,

    /// Most ChannelAssignment RPCs handled at once; more are refused at once
    /// with RESOURCE_EXHAUSTED instead of queueing. Health is never shed.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,

    /// Most ChannelAssignment RPCs of one organization handled at once, so
    /// that one tenant's flood leaves room for the others; more are refused
    /// at once with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "MAX_CONCURRENT_REQUESTS_PER_ORGANIZATION",
        default_value_t = 64
    )]
    pub max_concurrent_requests_per_organization: usize,

    /// Key that signs list page tokens; give every replica the same one.
    /// Unset: derived from AUTH_JWT_HS256_SECRET, else random per process
    /// (tokens then work on the replica that issued them only).
    #[arg(long, env = "PAGE_TOKEN_SECRET", hide_env_values = true)]
    pub page_token_secret: Option<String>,

    /// How long change events are kept (e.g. 90s, 30m, 12h, 7d); older ones
    /// are removed at least once a minute, and resuming before them is
    /// EVENTS_EXPIRED.
    #[arg(long, env = "EVENTS_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub events_retention: Duration,

    /// NATS server (e.g. nats://nats:4222) to publish change events to, on
    /// JetStream (stream CHANNELS_ASSIGNMENT_EVENTS, created when missing).
    /// Off when unset.
    #[arg(long, env = "EVENTS_NATS_URL")]
    pub events_nats_url: Option<String>,

    /// Most HTTP/2 streams (RPCs in progress) one connection may have open;
    /// one more is refused with REFUSED_STREAM, which clients retry.
    #[arg(long, env = "GRPC_MAX_CONCURRENT_STREAMS", default_value_t = 200)]
    pub max_concurrent_streams: u32,

    /// Most requests in progress on the server at once, over every service
    /// and connection (health and reflection included), each held until its
    /// response is sent; one more is answered RESOURCE_EXHAUSTED at once.
    /// Bounds the memory that streams whose bodies never come can take.
    #[arg(long, env = "GRPC_MAX_STREAMS_IN_PROGRESS", default_value_t = 2048)]
    pub max_streams_in_progress: usize,

    /// Most gRPC connections open at once; one more is closed at once (with
    /// a rate-limited warning).
    #[arg(long, env = "GRPC_MAX_CONNECTIONS", default_value_t = 1000)]
    pub max_connections: usize,

    /// How long a new connection may take to start HTTP/2 (send its preface
    /// and first frame) before it is closed.
    #[arg(long, env = "GRPC_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Most health Watch streams one connection may hold open; one more is
    /// answered RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "GRPC_MAX_WATCH_STREAMS_PER_CONNECTION",
        default_value_t = 16
    )]
    pub max_watch_streams_per_connection: usize,

    /// HTTP/2 keepalive ping interval: finds dead peers behind load balancers
    /// and NAT that drop idle connections silently.
    #[arg(long, env = "GRPC_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a connection lives before the server asks the client to
    /// reconnect (GOAWAY), so that new pods get their share of long-lived
    /// HTTP/2 connections.
    #[arg(long, env = "GRPC_MAX_CONNECTION_AGE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_connection_age: Duration,

    /// How long RPCs on an aged-out connection may still run.
    #[arg(long, env = "GRPC_MAX_CONNECTION_AGE_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub max_connection_age_grace: Duration,

    /// After SIGTERM, how long to keep serving while reporting NOT_SERVING,
    /// so that load balancers stop sending new requests before the drain.
    #[arg(long, env = "SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// Longest time one RPC may take, database work included; a shorter
    /// client deadline (grpc-timeout) wins. Past it: DEADLINE_EXCEEDED.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// How often the database is checked for the health service.
    #[arg(long, env = "HEALTH_CHECK_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub health_check_interval: Duration,

    /// Longest wait for in-flight RPCs after SIGTERM/SIGINT before exiting.
    #[arg(long, env = "SHUTDOWN_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_drain_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct AuthSettings {
    /// Shared secret for HS256 tokens: not empty (refused at start); under
    /// 32 bytes, what RFC 7518 asks of an HS256 key, the service starts with
    /// a warning.
    #[arg(
        long = "auth-jwt-hs256-secret",
        env = "AUTH_JWT_HS256_SECRET",
        hide_env_values = true
    )]
    pub hs256_secret: Option<String>,

    /// PEM public key (RSA, EC P-256/P-384 or Ed25519) for asymmetric
    /// tokens; read once, at start. With a JWKS also set, tokens that name a
    /// kid are verified with the JWKS only.
    #[arg(long = "auth-jwt-public-key-file", env = "AUTH_JWT_PUBLIC_KEY_FILE")]
    pub public_key_file: Option<PathBuf>,

    /// URL (https://…) of the identity provider's JWKS, whose public keys
    /// verify asymmetric tokens, chosen by the token's kid. Fetched at start
    /// (the service does not start without it), then again in the
    /// background (AUTH_JWKS_REFRESH_INTERVAL, and when a token names an
    /// unknown kid); a failed fetch keeps the last good keys. At most 256 KiB,
    /// within 5 s.
    #[arg(long = "auth-jwks-url", env = "AUTH_JWKS_URL", value_parser = parse_jwks_url)]
    pub jwks_url: Option<url::Url>,

    /// A JWKS file ({"keys": [...]}) holding one or more public keys, chosen
    /// by the token's kid. Must load at start; read again like
    /// AUTH_JWKS_URL, so a mounted ConfigMap or Secret rotates keys without
    /// a restart.
    #[arg(long = "auth-jwks-file", env = "AUTH_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// How often the JWKS (URL or file) is loaded again. A key removed from
    /// it stops verifying tokens, remembered ones included, at the first
    /// load after its removal.
    #[arg(long = "auth-jwks-refresh-interval", env = "AUTH_JWKS_REFRESH_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub jwks_refresh_interval: Duration,

    /// Least time between two loads of the JWKS asked for by tokens with an
    /// unknown kid: however many come, one load per this time at most (such
    /// a token is refused; once the load brings its key, it is accepted).
    #[arg(long = "auth-jwks-min-refresh-interval", env = "AUTH_JWKS_MIN_REFRESH_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub jwks_min_refresh_interval: Duration,

    /// Required `iss` claim, when set.
    #[arg(long = "auth-jwt-issuer", env = "AUTH_JWT_ISSUER")]
    pub issuer: Option<String>,

    /// Required `aud` claim, when set.
    #[arg(long = "auth-jwt-audience", env = "AUTH_JWT_AUDIENCE")]
    pub audience: Option<String>,

    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[arg(
        long = "auth-jwt-leeway-seconds",
        env = "AUTH_JWT_LEEWAY_SECONDS",
        default_value_t = 5
    )]
    pub leeway_seconds: u64,

    /// Accept the caller's organization from the x-organization-id header
    /// without a token. Only behind a gateway or mesh that authenticated the
    /// caller and sets that header itself.
    #[arg(long = "auth-trusted-header", env = "AUTH_TRUSTED_HEADER", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub trusted_header: bool,
}

#[derive(Debug, Clone, Args)]
pub struct TokenSettings {
    /// The organization the token speaks for (the org_id claim): 1-64 ASCII
    /// letters, digits, '_' or '-'.
    #[arg(long)]
    pub org_id: String,

    /// How long the token is valid.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,

    /// The secret to sign with: the server's AUTH_JWT_HS256_SECRET (not
    /// empty; under 32 bytes the token is printed with a warning, as the
    /// server starts with one).
    #[arg(
        long = "auth-jwt-hs256-secret",
        env = "AUTH_JWT_HS256_SECRET",
        hide_env_values = true
    )]
    pub hs256_secret: Option<String>,

    /// The iss claim: the server's AUTH_JWT_ISSUER, which it requires when set.
    #[arg(long = "auth-jwt-issuer", env = "AUTH_JWT_ISSUER")]
    pub issuer: Option<String>,

    /// The aud claim: the server's AUTH_JWT_AUDIENCE, which it requires when set.
    #[arg(long = "auth-jwt-audience", env = "AUTH_JWT_AUDIENCE")]
    pub audience: Option<String>,

    /// OAuth 2 scopes to grant (the `scope` claim), repeatable or
    /// space-separated: `--scope channels.inventory` for ChannelInventory.
    #[arg(long = "scope")]
    pub scope: Vec<String>,
}

impl ServeSettings {
    /// The defaults, but listening on ephemeral loopback ports: for tests and
    /// embedding.
    pub fn with_defaults(auth: AuthSettings) -> Self {
        Self {
            database: DatabaseSettings {
                database_url: None,
                database_max_connections: 10,
                database_acquire_timeout: Duration::from_secs(2),
            },
            auth,
            telemetry: TelemetrySettings {
                log: LogSettings {
                    log_format: LogFormat::Text,
                },
                otlp_endpoint: None,
            },
            grpc_listen_addr: "127.0.0.1:0".to_owned(),
            http_listen_addr: "127.0.0.1:0".to_owned(),
            metrics_listen_addr: Some("127.0.0.1:0".to_owned()),
            max_concurrent_requests: 256,
            max_concurrent_requests_per_organization: 64,
            page_token_secret: None,
            events_retention: Duration::from_secs(7 * 24 * 3600),
            events_nats_url: None,
            max_concurrent_streams: 200,
            max_streams_in_progress: 2048,
            max_connections: 1000,
            handshake_timeout: Duration::from_secs(10),
            max_watch_streams_per_connection: 16,
            keepalive_interval: Duration::from_secs(30),
            max_connection_age: Duration::from_secs(300),
            max_connection_age_grace: Duration::from_secs(10),
            shutdown_delay: Duration::ZERO,
            request_timeout: Duration::from_secs(5),
            health_check_interval: Duration::from_secs(2),
            shutdown_drain_timeout: Duration::from_secs(20),
        }
    }
}

impl AuthSettings {
    pub fn hs256(secret: impl Into<String>) -> Self {
        Self {
            hs256_secret: Some(secret.into()),
            public_key_file: None,
            jwks_url: None,
            jwks_file: None,
            jwks_refresh_interval: Duration::from_secs(5 * 60),
            jwks_min_refresh_interval: Duration::from_secs(30),
            issuer: None,
            audience: None,
            leeway_seconds: 5,
            trusted_header: false,
        }
    }
}

/// An http(s) URL: the JWKS is fetched with nothing else.
fn parse_jwks_url(raw: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(raw).map_err(|error| format!("not a URL: {error}"))?;
    match url.scheme() {
        "https" | "http" => Ok(url),
        other => Err(format!("{other}: URLs are fetched over https (or http)")),
    }
}

/// Accepts what `TcpListener::bind` resolves (`host:port`, `[::]:port`,
/// `localhost:port`) plus the common `:port` shorthand.
fn parse_listen_address(raw: &str) -> Result<String, String> {
    let address = match raw.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => raw.to_owned(),
    };
    let port = address
        .rsplit_once(':')
        .map(|(_, port)| port)
        .ok_or_else(|| format!("{raw:?} has no port: use host:port"))?;
    port.parse::<u16>()
        .map_err(|_| format!("{raw:?} has no valid port: use host:port"))?;
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen_address(":50051").unwrap(), "0.0.0.0:50051");
        assert_eq!(parse_listen_address("[::]:50051").unwrap(), "[::]:50051");
        assert_eq!(parse_listen_address("localhost:1").unwrap(), "localhost:1");
        assert!(parse_listen_address("localhost").is_err());
        assert!(parse_listen_address("0.0.0.0:http").is_err());
    }

    fn serve_settings(args: &[&str]) -> ServeSettings {
        let cli = Cli::try_parse_from(["channel-assignment", "serve"].iter().chain(args)).unwrap();
        let Command::Serve(settings) = cli.command else {
            panic!("serve")
        };
        settings
    }

    #[test]
    fn auth_settings_for_tests_have_the_flags_defaults() {
        let parsed = serve_settings(&[]).auth;
        let built = AuthSettings::hs256("secret");
        assert_eq!(parsed.leeway_seconds, built.leeway_seconds);
        assert_eq!(parsed.jwks_refresh_interval, built.jwks_refresh_interval);
        assert_eq!(
            parsed.jwks_min_refresh_interval,
            built.jwks_min_refresh_interval
        );
    }

    #[test]
    fn jwks_urls_are_http_or_https() {
        let settings = serve_settings(&["--auth-jwks-url", "https://idp.example/jwks.json"]);
        assert_eq!(
            settings.auth.jwks_url.unwrap().as_str(),
            "https://idp.example/jwks.json"
        );
        for refused in ["file:///etc/jwks.json", "idp.example/jwks.json", ""] {
            assert!(
                Cli::try_parse_from(["channel-assignment", "serve", "--auth-jwks-url", refused])
                    .is_err(),
                "{refused}"
            );
        }
    }

    /// The limits `--help` states for a JWKS fetch are the code's.
    #[test]
    fn the_jwks_url_help_states_the_fetch_limits() {
        let command = <Cli as clap::CommandFactory>::command();
        let serve = command.find_subcommand("serve").unwrap();
        let help = serve
            .get_arguments()
            .find(|argument| argument.get_id() == "jwks_url")
            .and_then(|argument| argument.get_help())
            .unwrap()
            .to_string();
        let size = format!("{} KiB", crate::auth::MAX_JWKS_BYTES / 1024);
        let time = format!("{} s", crate::auth::JWKS_FETCH_TIMEOUT.as_secs());
        assert!(help.contains(&size) && help.contains(&time), "{help}");
    }

    /// The README documents every authentication setting `serve` has.
    #[test]
    fn the_readme_names_every_auth_setting() {
        let readme = include_str!("../README.md");
        let command = <Cli as clap::CommandFactory>::command();
        let serve = command.find_subcommand("serve").unwrap();
        let variables: Vec<String> = serve
            .get_arguments()
            .filter_map(|argument| argument.get_env())
            .map(|env| env.to_string_lossy().into_owned())
            .filter(|env| env.starts_with("AUTH_"))
            .collect();
        assert!(variables.len() >= 10, "{variables:?}");
        for variable in variables {
            assert!(readme.contains(&format!("`{variable}`")), "{variable}");
        }
    }

    #[test]
    fn trusted_header_accepts_the_usual_spellings() {
        for (raw, expected) in [
            ("true", true),
            ("1", true),
            ("yes", true),
            ("false", false),
            ("0", false),
        ] {
            let cli =
                Cli::try_parse_from(["channel-assignment", "serve", "--auth-trusted-header", raw])
                    .unwrap();
            let Command::Serve(settings) = cli.command else {
                panic!("serve")
            };
            assert_eq!(settings.auth.trusted_header, expected, "{raw}");
        }
    }
}
