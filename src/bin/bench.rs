//! Benchmark tools for `bench/run`: a dataset seeder, a gRPC load generator,
//! and pgbench scripts that run exactly the service's statements with the
//! same random picks, so that the service can be measured against what
//! PostgreSQL itself sustains.
//!
//! The dataset is deterministic, so that neither the load generator nor
//! pgbench has to read it: identity `i` (of `N`) is `agent-i` in organization
//! `org_(i mod K)` and holds mailbox `i`; mailboxes and phone numbers
//! `0..2N+K` exist, `j` belonging to organization `org_((j mod N) mod K)`.
//! Their ids are `kind-nibble ‖ j` as a UUID. Identity `i` is only ever
//! given its own channels `i` and `N+i`; each organization `o` also has an
//! identity `anchor-o`, untouched by the workload, holding mailbox and phone
//! number `2N+o`: conflicts aim at those, so no two requests ever race for a
//! free channel (pgbench would abort a client on the unique violation the
//! service answers as ALREADY_EXISTS).
//!
//! Reads (`--workload reads-get`, `reads-lookup`) pick identity `i` uniformly
//! and ask for it by handle (`GetIdentity`) or by the address of mailbox `i`,
//! `agent{i}@bench.example`, which the seed links to it (`LookupIdentity`):
//! on a freshly seeded dataset every read finds its identity.
//!
//! Change events: `watch` consumes one `WatchAssignmentEvents` stream per
//! organization while the writes run and reports whether it kept up (rate,
//! delay from commit to receipt, caught up with the table at the end);
//! `watchers` holds many idle streams open, so that `bench/run` can read
//! what they cost the server.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use channel_assignment::{
    MIGRATOR, auth,
    proto::{
        AssignMailboxRequest, AssignPhoneNumberRequest, AssignmentEvent, GetIdentityRequest,
        LookupIdentityRequest, UnassignMailboxRequest, UnassignPhoneNumberRequest,
        WatchAssignmentEventsRequest, channel_assignment_client::ChannelAssignmentClient,
        lookup_identity_request,
    },
    store, telemetry,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tonic::{
    Request, Streaming,
    metadata::{AsciiMetadataValue, MetadataValue},
    transport::Channel,
};
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Dataset seeder and load generator for bench/run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fill the database (migrated first) with the benchmark dataset.
    Seed(SeedArgs),
    /// Send a workload to a running service and report what it sustained.
    Load(LoadArgs),
    /// Write pgbench scripts running the service's own statements.
    PgbenchScripts(ScriptArgs),
    /// Consume one event stream per organization until SIGTERM/SIGINT (the
    /// writes ended), then until caught up with the table; report as JSON.
    Watch(WatchArgs),
    /// Hold idle event streams open until SIGTERM/SIGINT; report as JSON.
    Watchers(WatchersArgs),
}

#[derive(Args, Clone, Copy)]
struct Dataset {
    /// Identities (rounded down to a multiple of --organizations).
    #[arg(long, default_value_t = 10_000)]
    identities: u64,
    #[arg(long, default_value_t = 100)]
    organizations: u64,
}

impl Dataset {
    fn identities(self) -> u64 {
        (self.identities / self.organizations).max(1) * self.organizations
    }
}

#[derive(Args)]
struct SeedArgs {
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[command(flatten)]
    dataset: Dataset,
}

/// The share of assign requests aimed at a missing channel, or at one that
/// another identity holds, in thousandths.
#[derive(Args, Clone, Copy)]
struct Mix {
    #[arg(long, default_value_t = 40)]
    assign_mailbox: u32,
    #[arg(long, default_value_t = 10)]
    unassign_mailbox: u32,
    #[arg(long, default_value_t = 40)]
    assign_phone_number: u32,
    #[arg(long, default_value_t = 10)]
    unassign_phone_number: u32,
    #[arg(long, default_value_t = 50)]
    not_found_permille: u64,
    #[arg(long, default_value_t = 100)]
    conflict_permille: u64,
}

/// What the load generator sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// The write mix (`Mix`): assigns and unassigns.
    Writes,
    /// `GetIdentity` of a random identity, by handle.
    ReadsGet,
    /// `LookupIdentity` by the email address of a random identity's mailbox.
    ReadsLookup,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::Writes => "writes",
            Self::ReadsGet => "reads-get",
            Self::ReadsLookup => "reads-lookup",
        }
    }
}

/// How the load generator reaches the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// gRPC over HTTP/2: `--connections` shared by the requests in flight.
    Grpc,
    /// The REST API over HTTP/1.1 keep-alive at `--http-endpoint`: one
    /// connection per request in flight (HTTP/1.1 has no multiplexing).
    Http,
}

#[derive(Args)]
struct LoadArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    #[arg(long, value_enum, default_value_t = Transport::Grpc)]
    transport: Transport,
    /// The REST API's address, for `--transport http`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_endpoint: String,
    #[arg(long, env = "AUTH_JWT_HS256_SECRET")]
    secret: String,
    #[command(flatten)]
    dataset: Dataset,
    #[arg(long, value_enum, default_value_t = Workload::Writes)]
    workload: Workload,
    /// The write mix; ignored by the read workloads.
    #[command(flatten)]
    mix: Mix,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// HTTP/2 connections they share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// A second service (gRPC) that takes turns with --endpoint: in each
    /// --turn every request goes to one of the two, and each gets its own
    /// count. A change of the machine's speed that lasts longer than a turn
    /// slows both alike, which rounds a minute apart cannot promise.
    #[arg(long)]
    in_turns_with: Option<String>,
    /// How long each service's turn lasts, with --in-turns-with.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    turn: Duration,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// What `watch` and `watchers` share.
#[derive(Args)]
struct StreamArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    #[arg(long, env = "AUTH_JWT_HS256_SECRET")]
    secret: String,
    /// Where each stream starts: after the table's last event of its
    /// organization, read here (so that only new events arrive).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Organizations `org_0` … `org_(K-1)`; stream `i` watches `org_(i mod K)`.
    #[arg(long, default_value_t = 100)]
    organizations: u64,
    /// Streams per HTTP/2 connection: the server may cap watch streams per
    /// connection (GRPC_MAX_WATCH_STREAMS_PER_CONNECTION, 16 by default).
    #[arg(long, default_value_t = 10)]
    streams_per_connection: usize,
    /// Created once every stream is open.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Args)]
struct WatchArgs {
    #[command(flatten)]
    streams: StreamArgs,
    /// After the signal: how long the streams may take to reach the table's
    /// last event before the watcher counts as not caught up.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    settle: Duration,
}

#[derive(Args)]
struct WatchersArgs {
    #[command(flatten)]
    streams: StreamArgs,
    /// Streams to hold open.
    #[arg(long, default_value_t = 1000)]
    count: usize,
}

#[derive(Args)]
struct ScriptArgs {
    /// Directory to write the scripts into.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Operation {
    AssignMailbox,
    UnassignMailbox,
    AssignPhoneNumber,
    UnassignPhoneNumber,
    GetIdentity,
    LookupIdentityByEmailAddress,
}

impl Operation {
    const WRITES: [Self; 4] = [
        Self::AssignMailbox,
        Self::UnassignMailbox,
        Self::AssignPhoneNumber,
        Self::UnassignPhoneNumber,
    ];
    const ALL: [Self; 6] = [
        Self::AssignMailbox,
        Self::UnassignMailbox,
        Self::AssignPhoneNumber,
        Self::UnassignPhoneNumber,
        Self::GetIdentity,
        Self::LookupIdentityByEmailAddress,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::AssignMailbox => "assign_mailbox",
            Self::UnassignMailbox => "unassign_mailbox",
            Self::AssignPhoneNumber => "assign_phone_number",
            Self::UnassignPhoneNumber => "unassign_phone_number",
            Self::GetIdentity => "get_identity",
            Self::LookupIdentityByEmailAddress => "lookup_identity_by_email_address",
        }
    }

    fn weight(self, mix: &Mix) -> u32 {
        match self {
            Self::AssignMailbox => mix.assign_mailbox,
            Self::UnassignMailbox => mix.unassign_mailbox,
            Self::AssignPhoneNumber => mix.assign_phone_number,
            Self::UnassignPhoneNumber => mix.unassign_phone_number,
            Self::GetIdentity | Self::LookupIdentityByEmailAddress => 0,
        }
    }
}

/// The address of mailbox `index`, as `bench seed` writes it.
fn email_address(index: u64) -> String {
    format!("agent{index}@bench.example")
}

const MAILBOX_NIBBLE: u128 = 1;
const PHONE_NUMBER_NIBBLE: u128 = 2;

fn channel_uuid(nibble: u128, index: u64) -> Uuid {
    Uuid::from_u128((nibble << 124) | u128::from(index))
}

/// SplitMix64: small, fast, good enough to spread picks; no RNG crate.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// The identity and channel one assign request names; the same rule as the
/// pgbench scripts' `\set` lines.
fn pick(dice: &mut Dice, dataset: Dataset, mix: &Mix) -> (u64, u64) {
    let n = dataset.identities();
    let identity = dice.below(n);
    let roll = dice.below(1000) + 1;
    let channel = if roll <= mix.not_found_permille {
        3 * n + identity
    } else if roll <= mix.not_found_permille + mix.conflict_permille {
        2 * n + identity % dataset.organizations
    } else {
        identity + dice.below(2) * n
    };
    (identity, channel)
}

// One thread: the load generator mostly waits for answers, and a second
// worker thread only added cross-thread wakeups (its CPU per request went
// from ~55 to ~40 µs on one thread, on cores it shares with the service).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(channel_assignment::config::LogFormat::Text, None)?;
    match cli.command {
        Command::Seed(args) => seed(args).await,
        Command::Load(args) => load(args).await,
        Command::PgbenchScripts(args) => pgbench_scripts(&args),
        Command::Watch(args) => watch_events(args).await,
        Command::Watchers(args) => idle_watchers(args).await,
    }
}

async fn seed(args: SeedArgs) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(&args.database_url)
        .await
        .context("cannot connect")?;
    MIGRATOR.run(&pool).await?;
    let (n, k) = (
        i64::try_from(args.dataset.identities())?,
        i64::try_from(args.dataset.organizations)?,
    );
    let started = Instant::now();
    // Server-side generation: one statement per table, no row leaves the
    // database, faster than COPY from a client.
    // The events of earlier runs too: a run counts the events it wrote.
    sqlx::query(
        "TRUNCATE identities, mailboxes, phone_numbers,
                  assignment_events, event_sequences, event_relay_positions",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO mailboxes (organization_id, id, email_address, display_name)
         SELECT 'org_' || ((j % $1) % $2), ('1' || lpad(to_hex(j), 31, '0'))::uuid,
                'agent' || j || '@bench.example', 'Mailbox ' || j
         FROM generate_series(0::bigint, 2 * $1 + $2 - 1) AS j",
    )
    .bind(n)
    .bind(k)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO phone_numbers (organization_id, id, number)
         SELECT 'org_' || ((j % $1) % $2), ('2' || lpad(to_hex(j), 31, '0'))::uuid,
                '+1' || (2000000000 + j)::text
         FROM generate_series(0::bigint, 2 * $1 + $2 - 1) AS j",
    )
    .bind(n)
    .bind(k)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO identities (organization_id, id, agent_handle, display_name, mailbox_id)
         SELECT 'org_' || (i % $2), ('3' || lpad(to_hex(i), 31, '0'))::uuid,
                'agent-' || i, 'Agent ' || i, ('1' || lpad(to_hex(i), 31, '0'))::uuid
         FROM generate_series(0::bigint, $1 - 1) AS i",
    )
    .bind(n)
    .bind(k)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO identities (organization_id, agent_handle, mailbox_id, phone_number_id)
         SELECT 'org_' || o, 'anchor-' || o,
                ('1' || lpad(to_hex(2 * $1 + o), 31, '0'))::uuid,
                ('2' || lpad(to_hex(2 * $1 + o), 31, '0'))::uuid
         FROM generate_series(0::bigint, $2 - 1) AS o",
    )
    .bind(n)
    .bind(k)
    .execute(&pool)
    .await?;
    sqlx::query("VACUUM ANALYZE identities, mailboxes, phone_numbers")
        .execute(&pool)
        .await?;
    eprintln!(
        "seeded {n} identities, {} mailboxes, {} phone numbers in {k} organizations in {:.1?}",
        2 * n,
        2 * n,
        started.elapsed()
    );
    Ok(())
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    codes: BTreeMap<&'static str, u64>,
}

async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let dataset = args.dataset;
    let mix = args.mix;
    let workload = args.workload;
    let operations: Vec<Operation> = match workload {
        Workload::Writes => Operation::WRITES
            .into_iter()
            .flat_map(|op| std::iter::repeat_n(op, op.weight(&mix) as usize))
            .collect(),
        Workload::ReadsGet => vec![Operation::GetIdentity],
        Workload::ReadsLookup => vec![Operation::LookupIdentityByEmailAddress],
    };
    anyhow::ensure!(!operations.is_empty(), "the mix has no weight");
    anyhow::ensure!(
        args.transport == Transport::Grpc || workload != Workload::ReadsLookup,
        "the REST API has no lookup"
    );
    anyhow::ensure!(
        args.transport == Transport::Grpc || args.in_turns_with.is_none(),
        "--in-turns-with takes a gRPC service"
    );
    // Whole pairs of turns, so that each side has exactly half the time.
    anyhow::ensure!(
        args.in_turns_with.is_none()
            || (!args.turn.is_zero()
                && args
                    .duration
                    .as_nanos()
                    .is_multiple_of(2 * args.turn.as_nanos())),
        "--duration must be a whole number of twice --turn"
    );
    // One token per organization, parsed into metadata once.
    let tokens = Arc::new(tokens(&args.secret, dataset.organizations)?);
    let channels = match args.transport {
        Transport::Grpc => connect(&args.endpoint, args.connections.max(1)).await?,
        Transport::Http => Vec::new(),
    };
    let second_channels = match &args.in_turns_with {
        Some(endpoint) => Some(connect(endpoint, args.connections.max(1)).await?),
        None => None,
    };
    let sides = if second_channels.is_some() { 2 } else { 1 };
    let turn_nanos = args.turn.as_nanos().max(1);

    let warm_until = Instant::now() + args.warmup;
    let stop_at = warm_until + args.duration;
    let cpu_before = process_cpu_seconds();
    let mut tasks = Vec::new();
    for task in 0..args.concurrency {
        let mut clients = vec![match args.transport {
            Transport::Grpc => Client::Grpc(ChannelAssignmentClient::new(
                channels[task % channels.len()].clone(),
            )),
            Transport::Http => Client::Http(HttpClient::connect(&args.http_endpoint).await?),
        }];
        if let Some(second) = &second_channels {
            clients.push(Client::Grpc(ChannelAssignmentClient::new(
                second[task % second.len()].clone(),
            )));
        }
        let tokens = Arc::clone(&tokens);
        let operations = operations.clone();
        tasks.push(tokio::spawn(async move {
            let mut dice = Dice(0x5EED ^ (task as u64) << 32);
            let mut tallies: Vec<Tally> = (0..sides).map(|_| Tally::default()).collect();
            loop {
                let now = Instant::now();
                if now >= stop_at {
                    return tallies;
                }
                // Whose turn it is: every task agrees, as all read one clock
                // (the warm-up is the first side's).
                let side = (now.saturating_duration_since(warm_until).as_nanos() / turn_nanos)
                    as usize
                    % sides;
                let operation = operations[dice.below(operations.len() as u64) as usize];
                let (identity, channel) = match workload {
                    Workload::Writes => pick(&mut dice, dataset, &mix),
                    Workload::ReadsGet | Workload::ReadsLookup => {
                        (dice.below(dataset.identities()), 0)
                    }
                };
                let token = tokens[(identity % dataset.organizations) as usize].clone();
                // The handle, or for a lookup the address of the identity's mailbox.
                let key = match operation {
                    Operation::LookupIdentityByEmailAddress => email_address(identity),
                    _ => format!("agent-{identity}"),
                };
                let started = Instant::now();
                let code = match &mut clients[side] {
                    Client::Grpc(client) => send(client, operation, key, channel, token).await,
                    Client::Http(client) => client.send(operation, &key, channel, &token).await,
                };
                if started >= warm_until {
                    let tally = &mut tallies[side];
                    let micros = started.elapsed().as_micros();
                    tally
                        .latencies_us
                        .push(u32::try_from(micros).unwrap_or(u32::MAX));
                    *tally.codes.entry(code).or_default() += 1;
                }
            }
        }));
    }
    let mut totals: Vec<Tally> = (0..sides).map(|_| Tally::default()).collect();
    for task in tasks {
        for (total, tally) in totals.iter_mut().zip(task.await?) {
            total.latencies_us.extend(tally.latencies_us);
            for (code, count) in tally.codes {
                *total.codes.entry(code).or_default() += count;
            }
        }
    }
    let cpu_seconds = process_cpu_seconds() - cpu_before;
    if let Some(second) = &args.in_turns_with {
        // Each side had every other turn: half the time each.
        let seconds = args.duration.as_secs_f64() / 2.0;
        let requests: usize = totals.iter().map(|t| t.latencies_us.len()).sum();
        let client_cpu_us_per_request = cpu_seconds * 1e6 / requests.max(1) as f64;
        let turns: Vec<serde_json::Value> = [&args.endpoint, second]
            .into_iter()
            .zip(totals)
            .map(|(endpoint, total)| {
                let mut summary = summarize(&args, total, seconds, client_cpu_us_per_request);
                summary["endpoint"] = endpoint.as_str().into();
                summary
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "turn_ms": args.turn.as_secs_f64() * 1e3, "turns": turns })
        );
        return Ok(());
    }
    let total = totals.pop().unwrap_or_default();
    report(&args, total, cpu_seconds);
    Ok(())
}

enum Client {
    Grpc(ChannelAssignmentClient<Channel>),
    Http(HttpClient),
}

/// One HTTP/1.1 keep-alive connection to the REST API.
struct HttpClient {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
}

impl HttpClient {
    async fn connect(address: &str) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .with_context(|| format!("cannot connect to the REST API at {address}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    /// The operation as the REST API takes it; the answer's gRPC code name,
    /// from the status the error table gives each code.
    async fn send(
        &mut self,
        operation: Operation,
        handle: &str,
        channel: u64,
        token: &AsciiMetadataValue,
    ) -> &'static str {
        let (method, path, body) = match operation {
            Operation::AssignMailbox => (
                http::Method::POST,
                format!("/identities/{handle}/mailbox"),
                format!(
                    r#"{{"mailbox_id":"{}"}}"#,
                    channel_uuid(MAILBOX_NIBBLE, channel)
                ),
            ),
            Operation::UnassignMailbox => (
                http::Method::DELETE,
                format!("/identities/{handle}/mailbox"),
                String::new(),
            ),
            Operation::AssignPhoneNumber => (
                http::Method::POST,
                format!("/identities/{handle}/phone_number"),
                format!(
                    r#"{{"phone_number_id":"{}"}}"#,
                    channel_uuid(PHONE_NUMBER_NIBBLE, channel)
                ),
            ),
            Operation::UnassignPhoneNumber => (
                http::Method::DELETE,
                format!("/identities/{handle}/phone_number"),
                String::new(),
            ),
            Operation::GetIdentity => (
                http::Method::GET,
                format!("/identities/{handle}"),
                String::new(),
            ),
            Operation::LookupIdentityByEmailAddress => return "UNIMPLEMENTED",
        };
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "bench")
            .header(http::header::AUTHORIZATION, token.as_bytes());
        if !body.is_empty() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let Ok(request) = request.body(http_body_util::Full::new(bytes::Bytes::from(body))) else {
            return "INTERNAL";
        };
        let Ok(response) = self.sender.send_request(request).await else {
            return "TRANSPORT_ERROR";
        };
        let status = response.status().as_u16();
        // Read the body to its end, so the connection can carry the next one.
        let _ = http_body_util::BodyExt::collect(response.into_body()).await;
        match status {
            200 | 204 => "OK",
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            409 => "ALREADY_EXISTS",
            422 => "INVALID_ARGUMENT",
            429 => "RESOURCE_EXHAUSTED",
            503 => "UNAVAILABLE",
            504 => "DEADLINE_EXCEEDED",
            _ => "INTERNAL",
        }
    }
}

/// One bearer token per organization `org_0` …, parsed into metadata once.
fn tokens(secret: &str, organizations: u64) -> anyhow::Result<Vec<AsciiMetadataValue>> {
    (0..organizations)
        .map(|org| {
            let token = auth::mint_hs256_token(
                secret,
                &format!("org_{org}"),
                Duration::from_secs(3600),
                None,
                None,
                &[],
            )?;
            Ok(MetadataValue::try_from(format!("Bearer {token}"))?)
        })
        .collect()
}

/// `count` HTTP/2 connections: each `Channel::connect` opens one of its own.
async fn connect(endpoint: &str, count: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        channels.push(
            Channel::from_shared(endpoint.to_owned())?
                .tcp_nodelay(true)
                .connect()
                .await
                .context("cannot connect to the service")?,
        );
    }
    Ok(channels)
}

fn authorized<T>(message: T, token: AsciiMetadataValue) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", token);
    request
}

async fn send(
    client: &mut ChannelAssignmentClient<Channel>,
    operation: Operation,
    key: String,
    channel: u64,
    token: AsciiMetadataValue,
) -> &'static str {
    let handle = key;
    let result = match operation {
        Operation::AssignMailbox => client
            .assign_mailbox(authorized(
                AssignMailboxRequest {
                    agent_handle: handle,
                    mailbox_id: channel_uuid(MAILBOX_NIBBLE, channel).to_string(),
                },
                token,
            ))
            .await
            .map(drop),
        Operation::UnassignMailbox => client
            .unassign_mailbox(authorized(
                UnassignMailboxRequest {
                    agent_handle: handle,
                },
                token,
            ))
            .await
            .map(drop),
        Operation::AssignPhoneNumber => client
            .assign_phone_number(authorized(
                AssignPhoneNumberRequest {
                    agent_handle: handle,
                    phone_number_id: channel_uuid(PHONE_NUMBER_NIBBLE, channel).to_string(),
                },
                token,
            ))
            .await
            .map(drop),
        Operation::UnassignPhoneNumber => client
            .unassign_phone_number(authorized(
                UnassignPhoneNumberRequest {
                    agent_handle: handle,
                },
                token,
            ))
            .await
            .map(drop),
        Operation::GetIdentity => client
            .get_identity(authorized(
                GetIdentityRequest {
                    agent_handle: handle,
                },
                token,
            ))
            .await
            .map(drop),
        Operation::LookupIdentityByEmailAddress => client
            .lookup_identity(authorized(
                LookupIdentityRequest {
                    channel: Some(lookup_identity_request::Channel::EmailAddress(handle)),
                },
                token,
            ))
            .await
            .map(drop),
    };
    match result {
        Ok(()) => "OK",
        Err(status) => channel_assignment::error::code_name(status.code()),
    }
}

/// CPU time this process has used (user + system), from /proc.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name, which ends with ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn percentile(sorted: &[u32], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1]) / 1000.0
}

/// What a run sustained, as the JSON that `--json` prints.
fn summarize(
    args: &LoadArgs,
    mut total: Tally,
    seconds: f64,
    client_cpu_us_per_request: f64,
) -> serde_json::Value {
    total.latencies_us.sort_unstable();
    let requests = total.latencies_us.len();
    let codes: serde_json::Map<String, serde_json::Value> = total
        .codes
        .iter()
        .map(|(code, count)| ((*code).to_owned(), (*count).into()))
        .collect();
    serde_json::json!({
        "workload": args.workload.name(),
        "concurrency": args.concurrency,
        "identities": args.dataset.identities(),
        "duration_s": seconds,
        "requests": requests,
        "rps": requests as f64 / seconds,
        "p50_ms": percentile(&total.latencies_us, 0.50),
        "p90_ms": percentile(&total.latencies_us, 0.90),
        "p99_ms": percentile(&total.latencies_us, 0.99),
        "max_ms": total.latencies_us.last().map_or(0.0, |m| f64::from(*m) / 1000.0),
        "codes": codes,
        "client_cpu_us_per_request": client_cpu_us_per_request,
    })
}

fn report(args: &LoadArgs, total: Tally, client_cpu_seconds: f64) {
    let requests = total.latencies_us.len();
    let client_cpu_us_per_request = client_cpu_seconds * 1e6 / requests.max(1) as f64;
    let summary = summarize(
        args,
        total,
        args.duration.as_secs_f64(),
        client_cpu_us_per_request,
    );
    if args.json {
        println!("{summary}");
    } else {
        let number = |key: &str| summary[key].as_f64().unwrap_or(0.0);
        println!(
            "{} {requests} requests in {:.1} s at C={}: {:.0} rps, p50 {:.2} ms, \
             p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms, codes {}, \
             load generator CPU {client_cpu_us_per_request:.1} µs/request",
            args.workload.name(),
            number("duration_s"),
            args.concurrency,
            number("rps"),
            number("p50_ms"),
            number("p90_ms"),
            number("p99_ms"),
            number("max_ms"),
            summary["codes"],
        );
    }
}

/// Each organization's events in the table: `(count, last sequence)`.
async fn table_events(pool: &sqlx::PgPool) -> anyhow::Result<HashMap<String, (i64, i64)>> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT organization_id, count(*), max(sequence)
         FROM assignment_events GROUP BY organization_id",
    )
    .fetch_all(pool)
    .await
    .context("cannot count the events")?;
    Ok(rows
        .into_iter()
        .map(|(organization, count, last)| (organization, (count, last)))
        .collect())
}

fn organization(index: usize) -> String {
    format!("org_{index}")
}

/// Opens `count` streams over `count / streams_per_connection` connections,
/// stream `i` watching organization `i mod K` after `start`'s last event of
/// it; returns each with its organization's index. An opened stream is a
/// registered watcher: the server answers only after its first read.
async fn open_streams(
    args: &StreamArgs,
    count: usize,
    start: &HashMap<String, (i64, i64)>,
) -> anyhow::Result<(usize, Vec<(usize, Streaming<AssignmentEvent>)>)> {
    anyhow::ensure!(args.organizations > 0, "--organizations must be at least 1");
    let tokens = tokens(&args.secret, args.organizations)?;
    let per_connection = args.streams_per_connection.max(1);
    let channels = connect(&args.endpoint, count.div_ceil(per_connection)).await?;
    let mut streams = Vec::with_capacity(count);
    for i in 0..count {
        let org = i % tokens.len();
        let after_sequence = start.get(&organization(org)).map_or(0, |&(_, last)| last);
        let mut client = ChannelAssignmentClient::new(channels[i / per_connection].clone());
        let stream = client
            .watch_assignment_events(authorized(
                WatchAssignmentEventsRequest { after_sequence },
                tokens[org].clone(),
            ))
            .await
            .with_context(|| format!("cannot open watch stream {i}"))?
            .into_inner();
        streams.push((org, stream));
    }
    Ok((channels.len(), streams))
}

/// SIGTERM or SIGINT: bench/run's way of saying the writes ended. Installed
/// before the ready file is written, so that an early signal is not fatal.
struct Stop {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Stop {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

fn ready(file: Option<&PathBuf>) -> anyhow::Result<()> {
    if let Some(file) = file {
        fs::write(file, "ready\n").with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(())
}

/// What one stream saw.
#[derive(Default)]
struct StreamTally {
    received: u64,
    received_while_writing: u64,
    /// Commit (the event's `occurred_at`) to receipt.
    delays_us: Vec<u32>,
    /// Events at or below a sequence already received: repeated or reordered.
    out_of_order: u64,
    /// How the stream ended before it was let go: "end of stream" or a code.
    ended: Option<&'static str>,
}

fn ended_counts(tallies: &[StreamTally]) -> serde_json::Map<String, serde_json::Value> {
    let mut ended: BTreeMap<&str, u64> = BTreeMap::new();
    for end in tallies.iter().filter_map(|tally| tally.ended) {
        *ended.entry(end).or_default() += 1;
    }
    ended
        .into_iter()
        .map(|(end, count)| (end.to_owned(), count.into()))
        .collect()
}

/// Receives one stream until `stop`; `last` is its organization's last
/// received sequence, shared with the check for having caught up.
async fn consume(
    mut stream: Streaming<AssignmentEvent>,
    last: Arc<AtomicI64>,
    writing: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) -> StreamTally {
    let mut tally = StreamTally::default();
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            _ = stop.wait_for(|stop| *stop) => return tally,
        };
        match message {
            Ok(Some(event)) => {
                let delay = event
                    .occurred_at
                    .and_then(|at| SystemTime::try_from(at).ok())
                    .and_then(|at| SystemTime::now().duration_since(at).ok())
                    .unwrap_or_default();
                tally
                    .delays_us
                    .push(u32::try_from(delay.as_micros()).unwrap_or(u32::MAX));
                tally.received += 1;
                if writing.load(Ordering::Relaxed) {
                    tally.received_while_writing += 1;
                }
                if event.sequence <= last.load(Ordering::Relaxed) {
                    tally.out_of_order += 1;
                }
                last.store(event.sequence, Ordering::Relaxed);
            }
            Ok(None) => {
                tally.ended = Some("end of stream");
                return tally;
            }
            Err(status) => {
                tally.ended = Some(channel_assignment::error::code_name(status.code()));
                return tally;
            }
        }
    }
}

async fn watch_events(args: WatchArgs) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.streams.database_url)
        .await
        .context("cannot connect to the database")?;
    let before = table_events(&pool).await?;
    let organizations = usize::try_from(args.streams.organizations)?;
    let (connections, streams) = open_streams(&args.streams, organizations, &before).await?;
    let last: Vec<Arc<AtomicI64>> = (0..organizations)
        .map(|org| {
            let start = before.get(&organization(org)).map_or(0, |&(_, last)| last);
            Arc::new(AtomicI64::new(start))
        })
        .collect();
    let writing = Arc::new(AtomicBool::new(true));
    let (stop_streams, stopping) = watch::channel(false);
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|(org, stream)| {
            tokio::spawn(consume(
                stream,
                Arc::clone(&last[org]),
                Arc::clone(&writing),
                stopping.clone(),
            ))
        })
        .collect();

    let mut stop = Stop::new()?;
    ready(args.streams.ready_file.as_ref())?;
    let ready_at = Instant::now();
    let cpu_before = process_cpu_seconds();
    stop.wait().await;
    writing.store(false, Ordering::Relaxed);
    let window = ready_at.elapsed();
    // The writes have ended: the table's last events are the goal.
    let after = table_events(&pool).await?;
    let goal: Vec<i64> = (0..organizations)
        .map(|org| after.get(&organization(org)).map_or(0, |&(_, last)| last))
        .collect();
    let behind = || {
        goal.iter()
            .zip(&last)
            .filter(|(goal, last)| last.load(Ordering::Relaxed) != **goal)
            .count()
    };
    let signalled = Instant::now();
    while behind() > 0 && signalled.elapsed() < args.settle {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let catch_up = signalled.elapsed();
    let behind = behind();
    let _ = stop_streams.send(true);
    let mut tallies = Vec::with_capacity(tasks.len());
    for task in tasks {
        tallies.push(task.await?);
    }
    let cpu_seconds = process_cpu_seconds() - cpu_before;

    let written: i64 = after
        .iter()
        .map(|(org, &(count, _))| count - before.get(org).map_or(0, |&(count, _)| count))
        .sum();
    let received: u64 = tallies.iter().map(|tally| tally.received).sum();
    let mut delays: Vec<u32> = tallies
        .iter()
        .flat_map(|tally| tally.delays_us.iter().copied())
        .collect();
    delays.sort_unstable();
    let max = delays.last().map_or(0.0, |max| f64::from(*max) / 1000.0);
    println!(
        "{}",
        serde_json::json!({
            "streams": tallies.len(),
            "connections": connections,
            "window_s": window.as_secs_f64(),
            "written": written,
            "received": received,
            "received_while_writing": tallies.iter().map(|t| t.received_while_writing).sum::<u64>(),
            "delay_p50_ms": percentile(&delays, 0.50),
            "delay_p99_ms": percentile(&delays, 0.99),
            "delay_max_ms": max,
            "out_of_order": tallies.iter().map(|t| t.out_of_order).sum::<u64>(),
            "ended": ended_counts(&tallies),
            // Every stream's last sequence equals its organization's last in the table.
            "caught_up": behind == 0,
            "organizations_behind": behind,
            "catch_up_ms": catch_up.as_secs_f64() * 1000.0,
            "cpu_us_per_event": cpu_seconds * 1e6 / received.max(1) as f64,
        })
    );
    Ok(())
}

async fn idle_watchers(args: WatchersArgs) -> anyhow::Result<()> {
    let start = {
        let pool = sqlx::PgPool::connect(&args.streams.database_url)
            .await
            .context("cannot connect to the database")?;
        let start = table_events(&pool).await?;
        // No connection of the bench's own while the server's are counted.
        pool.close().await;
        start
    };
    let started = Instant::now();
    let (connections, streams) = open_streams(&args.streams, args.count, &start).await?;
    let opened = started.elapsed();
    let last: Vec<Arc<AtomicI64>> = (0..streams.len())
        .map(|_| Arc::new(AtomicI64::new(0)))
        .collect();
    let idle = Arc::new(AtomicBool::new(true));
    let (stop_streams, stopping) = watch::channel(false);
    let tasks: Vec<_> = streams
        .into_iter()
        .zip(&last)
        .map(|((_, stream), last)| {
            tokio::spawn(consume(
                stream,
                Arc::clone(last),
                Arc::clone(&idle),
                stopping.clone(),
            ))
        })
        .collect();
    let mut stop = Stop::new()?;
    ready(args.streams.ready_file.as_ref())?;
    stop.wait().await;
    let _ = stop_streams.send(true);
    let mut tallies = Vec::with_capacity(tasks.len());
    for task in tasks {
        tallies.push(task.await?);
    }
    println!(
        "{}",
        serde_json::json!({
            "streams": tallies.len(),
            "connections": connections,
            "open_s": opened.as_secs_f64(),
            // Idle means nothing arrives and nothing ends.
            "received": tallies.iter().map(|t| t.received).sum::<u64>(),
            "ended": ended_counts(&tallies),
        })
    );
    Ok(())
}

/// The service's statements with pgbench variables for its parameters, and
/// the same picks as `pick` (reads: a uniform identity). Run with `-M prepared`, like sqlx.
fn pgbench_scripts(args: &ScriptArgs) -> anyhow::Result<()> {
    fs::create_dir_all(&args.out)?;
    let picks = r"\set identity random(0, :n - 1)
\set org :identity % :k
\set roll random(1, 1000)
\set channel :identity + random(0, 1) * :n
\if :roll <= :not_found
\set channel 3 * :n + :identity
\elif :roll <= :not_found + :conflict
\set channel 2 * :n + :org
\endif
";
    let identity_only = "\\set identity random(0, :n - 1)\n\\set org :identity % :k\n";
    let organization = "('org_' || :org)";
    let handle = "('agent-' || :identity)";
    let seconds_left = "5.0::float8";
    for operation in Operation::ALL {
        let script = match operation {
            Operation::AssignMailbox | Operation::AssignPhoneNumber => {
                let (sql, nibble) = if operation == Operation::AssignMailbox {
                    (store::ASSIGN_MAILBOX, '1')
                } else {
                    (store::ASSIGN_PHONE_NUMBER, '2')
                };
                let channel =
                    format!("('{nibble}' || lpad(to_hex(:channel::bigint), 31, '0'))::uuid");
                let sql = sql
                    .replace("$5", "''")
                    .replace("$4", seconds_left)
                    .replace("$3", &channel)
                    .replace("$2", handle)
                    .replace("$1", organization);
                format!("{picks}{};\n", one_line(&sql))
            }
            Operation::UnassignMailbox | Operation::UnassignPhoneNumber => {
                let sql = if operation == Operation::UnassignMailbox {
                    store::UNASSIGN_MAILBOX
                } else {
                    store::UNASSIGN_PHONE_NUMBER
                };
                let sql = sql
                    .replace("$4", "''")
                    .replace("$3", seconds_left)
                    .replace("$2", handle)
                    .replace("$1", organization);
                format!("{identity_only}{};\n", one_line(&sql))
            }
            Operation::GetIdentity => {
                let sql = store::GET_IDENTITY
                    .replace("$2", handle)
                    .replace("$1", organization);
                format!("{identity_only}{};\n", one_line(&sql))
            }
            Operation::LookupIdentityByEmailAddress => {
                // The address `email_address` builds, built by PostgreSQL.
                let sql = store::LOOKUP_BY_EMAIL_ADDRESS
                    .replace("$2", "('agent' || :identity || '@bench.example')")
                    .replace("$1", organization);
                format!("{identity_only}{};\n", one_line(&sql))
            }
        };
        fs::write(args.out.join(format!("{}.sql", operation.name())), script)?;
    }
    Ok(())
}

/// pgbench reads one SQL command per line (a command may continue only after
/// a backslash), so the statement goes on one line.
fn one_line(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}
