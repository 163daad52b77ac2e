//! The serving role apart from the owner, as in Kubernetes: `migrate`
//! grants it what the service needs, and a role without it is an unready
//! pod with a logged cause, not `INTERNAL` on every call.

use std::{process::Stdio, time::Duration};

use channel_assignment::{
    config::AuthSettings,
    startup,
    store::{database::Database, privileges},
};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::*;

/// A login role of the test's own (roles are server-wide), dropped at the
/// end of the test.
struct ServingRole {
    name: String,
    pool: PgPool,
}

impl ServingRole {
    async fn create(pool: &PgPool) -> Self {
        let name = format!(
            "ca_app_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {name} LOGIN")))
            .execute(pool)
            .await
            .unwrap();
        Self {
            name,
            pool: pool.clone(),
        }
    }

    /// The service's pool, connecting as this role.
    fn database(&self) -> (Database, channel_assignment::config::ServeSettings) {
        let settings = test_settings(AuthSettings::hs256(SECRET));
        let options = (*self.pool.connect_options()).clone().username(&self.name);
        let options = startup::service_options(options, settings.request_timeout);
        let database = Database::new(options, &settings.database).unwrap();
        (database, settings)
    }

    async fn drop_role(self) {
        wait_until_service_gone(&self.pool).await;
        for statement in [
            format!("DROP OWNED BY {}", self.name),
            format!("DROP ROLE {}", self.name),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&self.pool)
                .await
                .unwrap();
        }
    }
}

/// `migrate` as operators run it, with `DATABASE_APP_ROLE`.
async fn migrate_granting(pool: &PgPool, role: &str) -> std::process::Output {
    crate::binary::command(pool)
        .arg("migrate")
        .env("DATABASE_APP_ROLE", role)
        .output()
        .await
        .unwrap()
}

#[sqlx::test]
async fn a_role_that_migrate_granted_serves_every_kind_of_call(pool: PgPool) {
    let role = ServingRole::create(&pool).await;
    let migrated = migrate_granting(&pool, &role.name).await;
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    // Granted again by the next release's run: idempotent.
    assert!(migrate_granting(&pool, &role.name).await.status.success());

    let (database, settings) = role.database();
    let app = spawn_app_on(database, settings).await;
    // Readiness checks every privilege of the list.
    wait_for(&app, "readiness", ServingStatus::Serving).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    app.assign_mailbox(ORG, "sales-agent", &mailbox)
        .await
        .unwrap();
    app.get_identity(ORG, "sales-agent").await.unwrap();
    app.list_identities(ORG, 10, "").await.unwrap();
    app.unassign_mailbox(ORG, "sales-agent").await.unwrap();
    app.upsert_identity(
        ORG,
        channel_assignment::proto::UpsertIdentityRequest {
            agent_handle: "new-agent".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM assignment_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        events, 2,
        "the triggers, run as the serving role, recorded both"
    );
    // What no call above used: retention's delete.
    let lacking: Vec<String> = sqlx::query_scalar(
        "SELECT t || ':' || p FROM unnest($1::text[], $2::text[]) AS n (t, p)
         WHERE NOT has_table_privilege($3, t, p)",
    )
    .bind(
        privileges::NEEDED
            .iter()
            .flat_map(|(table, privileges)| privileges.iter().map(|_| table.to_string()))
            .collect::<Vec<_>>(),
    )
    .bind(
        privileges::NEEDED
            .iter()
            .flat_map(|(_, privileges)| privileges.iter().map(|p| p.to_string()))
            .collect::<Vec<_>>(),
    )
    .bind(&role.name)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(lacking, Vec::<String>::new());
    app.stop().await;
    role.drop_role().await;
}

#[sqlx::test]
async fn the_owner_as_serving_role_is_granted_nothing_and_refused_nothing(pool: PgPool) {
    let migrated = migrate_granting(&pool, "postgres").await;
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    assert!(
        String::from_utf8_lossy(&migrated.stderr).contains("nothing to grant"),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let unknown = migrate_granting(&pool, "no_such_role_here").await;
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
}

#[sqlx::test]
async fn a_role_without_grants_is_unready_with_its_cause_logged(pool: PgPool) {
    let role = ServingRole::create(&pool).await;
    let (database, settings) = role.database();
    let app = spawn_app_on(database, settings).await;
    wait_for(&app, "readiness", ServingStatus::NotServing).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    let before = snapshot(&pool).await;
    // A call that reaches it anyway (no load balancer here) is INTERNAL,
    // counted as a privilege error.
    assert_error(
        app.assign_mailbox(ORG, "sales-agent", &mailbox).await,
        Code::Internal,
        "INTERNAL",
    );
    assert_eq!(snapshot(&pool).await, before);
    let metrics = crate::metrics::scrape(app.metrics_addr).await;
    // The scrape's count of events and retention's first round are
    // refused too.
    let privilege_errors: f64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(r#"channel_assignment_db_errors_total{kind="privilege"} "#)
        })
        .and_then(|value| value.parse().ok())
        .unwrap_or_default();
    assert!(privilege_errors >= 1.0, "{metrics}");
    app.stop().await;

    // The binary logs why it is not ready, naming what is missing.
    let options = pool.connect_options();
    let url = format!(
        "postgres://{}@{}:{}/{}",
        role.name,
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres"),
    );
    let mut serve = crate::binary::command(&pool)
        .arg("serve")
        .env("DATABASE_URL", url)
        .env("AUTH_JWT_HS256_SECRET", SECRET)
        .env("HEALTH_CHECK_INTERVAL", "200ms")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(serve.stderr.take().unwrap()).lines();
    let cause = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
            if entry["message"] == "database not fit to serve: NOT_SERVING" {
                return entry["cause"].as_str().unwrap_or_default().to_owned();
            }
        }
        panic!("exited without saying why it is not ready");
    })
    .await
    .expect("the cause is logged within seconds");
    serve.kill().await.unwrap();
    assert!(cause.contains("lacks privileges"), "{cause}");
    assert!(cause.contains("SELECT on identities"), "{cause}");
    assert!(cause.contains("DATABASE_APP_ROLE"), "{cause}");
    role.drop_role().await;
}
