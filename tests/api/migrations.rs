//! Upgrading a database that holds data of the first schema: the second
//! migration applies to it, leaves every row as it was, and the service
//! serves the old data; and it refuses, changing nothing, when the data
//! breaks the uniqueness it is about to enforce.

use channel_assignment::{
    MIGRATOR,
    config::AuthSettings,
    proto::{
        self, IdentityStatus, MailboxStatus, UpsertMailboxRequest, UpsertPhoneNumberRequest,
        lookup_identity_request::Channel,
    },
};
use sqlx::{PgPool, migrate::MigrateError};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use uuid::Uuid;

use crate::helpers::*;

const FIRST: i64 = 20261123000001;
const SECOND: i64 = 20261125000001;

const OTHER_ORGS_TOO: &str = "org_gamma";

/// Ids of the old data, fixed so that the assertions can name them.
const SALES_MAILBOX: Uuid = Uuid::from_u128(0x1001);
const SALES_MAILBOX_DELETED_TWIN: Uuid = Uuid::from_u128(0x1002);
const SUPPORT_MAILBOX: Uuid = Uuid::from_u128(0x1003);
const LEGACY_MAILBOX: Uuid = Uuid::from_u128(0x1004);
const FREE_MAILBOX: Uuid = Uuid::from_u128(0x1005);
const BETA_MAILBOX: Uuid = Uuid::from_u128(0x1006);
const SALES_NUMBER: Uuid = Uuid::from_u128(0x2001);
const SALES_NUMBER_RELEASED_TWIN: Uuid = Uuid::from_u128(0x2002);
const PAUSED_NUMBER: Uuid = Uuid::from_u128(0x2003);
const BETA_NUMBER: Uuid = Uuid::from_u128(0x2004);

async fn versions(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Data as an operator kept it under the first schema, with plain SQL and
/// only the first schema's columns: several organizations, a paused and a
/// deleted identity, mixed-case addresses (two differ only by case, one of
/// them deleted), an address the new format check would refuse, a released
/// duplicate of a live number, and links. Timestamps in the past, so that a
/// rewrite of any row would show.
async fn insert_old_data(pool: &PgPool) {
    sqlx::query(
        "INSERT INTO mailboxes (organization_id, id, email_address, display_name, status, created_at, updated_at)
         VALUES
            ($1, $3, 'Sales@Agents.Example', 'Sales', 'active', '2025-01-01Z', '2025-01-02Z'),
            ($1, $4, 'sales@agents.example', 'Old sales', 'deleted', '2024-06-01Z', '2024-12-31Z'),
            ($1, $5, 'Support@agents.EXAMPLE', NULL, 'paused', '2025-02-01Z', '2025-02-01Z'),
            ($1, $6, 'legacy inbox', 'From before the format check', 'active', '2023-01-01Z', '2023-01-01Z'),
            ($1, $7, 'Free@Agents.example', NULL, 'active', '2025-03-01Z', '2025-03-01Z'),
            ($2, $8, 'SALES@agents.example', 'Beta sales', 'active', '2025-01-01Z', '2025-01-01Z')",
    )
    .bind(ORG)
    .bind(OTHER_ORG)
    .bind(SALES_MAILBOX)
    .bind(SALES_MAILBOX_DELETED_TWIN)
    .bind(SUPPORT_MAILBOX)
    .bind(LEGACY_MAILBOX)
    .bind(FREE_MAILBOX)
    .bind(BETA_MAILBOX)
    .execute(pool)
    .await
    .expect("mailboxes of the first schema");
    sqlx::query(
        "INSERT INTO phone_numbers (organization_id, id, number, type, status, created_at, updated_at)
         VALUES
            ($1, $3, '+14155550100', 'local', 'active', '2025-01-01Z', '2025-01-01Z'),
            ($1, $4, '+14155550100', 'toll_free', 'released', '2024-01-01Z', '2024-05-01Z'),
            ($1, $5, '+14155550101', 'local', 'paused', '2025-01-01Z', '2025-01-01Z'),
            ($2, $6, '+14155550100', 'local', 'active', '2025-01-01Z', '2025-01-01Z')",
    )
    .bind(ORG)
    .bind(OTHER_ORG)
    .bind(SALES_NUMBER)
    .bind(SALES_NUMBER_RELEASED_TWIN)
    .bind(PAUSED_NUMBER)
    .bind(BETA_NUMBER)
    .execute(pool)
    .await
    .expect("phone numbers of the first schema");
    sqlx::query(
        "INSERT INTO identities
            (organization_id, agent_handle, display_name, mailbox_id, phone_number_id, status, created_at, updated_at)
         VALUES
            ($1, 'sales-agent', 'Sales', $4, $5, 'active', '2025-01-01Z', '2025-01-03Z'),
            ($1, 'support-agent', NULL, $6, NULL, 'paused', '2025-01-01Z', '2025-01-01Z'),
            ($1, 'gone-agent', 'Gone', NULL, NULL, 'deleted', '2024-01-01Z', '2024-02-01Z'),
            ($1, 'Zed.agent', NULL, NULL, $7, 'active', '2025-01-01Z', '2025-01-01Z'),
            ($2, 'sales-agent', 'Beta sales', $8, $9, 'active', '2025-01-01Z', '2025-01-01Z'),
            ($3, 'lone-agent', NULL, NULL, NULL, 'active', '2025-01-01Z', '2025-01-01Z')",
    )
    .bind(ORG)
    .bind(OTHER_ORG)
    .bind(OTHER_ORGS_TOO)
    .bind(SALES_MAILBOX)
    .bind(SALES_NUMBER)
    .bind(SUPPORT_MAILBOX)
    .bind(PAUSED_NUMBER)
    .bind(BETA_MAILBOX)
    .bind(BETA_NUMBER)
    .execute(pool)
    .await
    .expect("identities of the first schema");
}

fn handles(page: &proto::ListIdentitiesResponse) -> Vec<&str> {
    page.identities
        .iter()
        .map(|identity| identity.agent_handle.as_str())
        .collect()
}

#[sqlx::test(migrations = false)]
async fn the_second_migration_keeps_old_data_and_the_service_serves_it(pool: PgPool) {
    MIGRATOR.run_to(FIRST, &pool).await.expect("first schema");
    assert_eq!(versions(&pool).await, [FIRST]);
    insert_old_data(&pool).await;
    let before = snapshot(&pool).await;

    // The second migration, and every later one, on top of the old data.
    MIGRATOR
        .run(&pool)
        .await
        .expect("the second migration applies to old data");
    assert_eq!(versions(&pool).await[..2], [FIRST, SECOND]);
    assert_eq!(snapshot(&pool).await, before, "every row as it was");
    let rows: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM identities), (SELECT count(*) FROM mailboxes),
                (SELECT count(*) FROM phone_numbers)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(rows, (6, 6, 4));

    let app = spawn_app(&pool).await;

    // GetIdentity: the old links, statuses and timestamps.
    let sales = app.get_identity(ORG, "sales-agent").await.unwrap();
    assert_eq!(sales.organization_id, ORG);
    assert_eq!(sales.display_name, "Sales");
    assert_eq!(sales.status(), IdentityStatus::Active);
    let mailbox = sales.mailbox.clone().expect("linked before the migration");
    assert_eq!(mailbox.id, SALES_MAILBOX.to_string());
    assert_eq!(
        mailbox.email_address, "Sales@Agents.Example",
        "stored as given"
    );
    assert_eq!(mailbox.status(), MailboxStatus::Active);
    assert_eq!(
        sales.phone_number.as_ref().map(|p| p.id.clone()),
        Some(SALES_NUMBER.to_string())
    );
    assert_eq!(sales.created_at.unwrap().seconds, 1_735_689_600); // 2025-01-01
    let support = app.get_identity(ORG, "support-agent").await.unwrap();
    assert_eq!(support.status(), IdentityStatus::Paused);
    assert_eq!(
        support.mailbox.as_ref().map(|m| m.status()),
        Some(MailboxStatus::Paused)
    );
    assert_error(
        app.get_identity(ORG, "gone-agent").await,
        Code::NotFound,
        "IDENTITY_NOT_FOUND",
    );
    let beta = app.get_identity(OTHER_ORG, "sales-agent").await.unwrap();
    assert_eq!(
        beta.mailbox.as_ref().map(|m| m.id.clone()),
        Some(BETA_MAILBOX.to_string())
    );

    // LookupIdentity: addresses case-insensitively, the live one of twins.
    for address in [
        "Sales@Agents.Example",
        "sales@agents.example",
        "SALES@AGENTS.EXAMPLE",
    ] {
        let found = app
            .lookup(ORG, Channel::EmailAddress(address.to_owned()))
            .await
            .unwrap_or_else(|status| panic!("{address}: {status:?}"));
        assert_eq!(found, sales, "{address}");
        let theirs = app
            .lookup(OTHER_ORG, Channel::EmailAddress(address.to_owned()))
            .await
            .unwrap();
        assert_eq!(theirs, beta, "{address} in the other organization");
    }
    let found = app
        .lookup(ORG, Channel::EmailAddress("support@AGENTS.example".into()))
        .await
        .unwrap();
    assert_eq!(found.agent_handle, "support-agent");
    let by_number = app
        .lookup(ORG, Channel::PhoneNumber("+14155550100".into()))
        .await
        .unwrap();
    assert_eq!(by_number, sales, "the live number, not its released twin");
    assert_eq!(
        app.lookup(ORG, Channel::MailboxId(SALES_MAILBOX.to_string()))
            .await
            .unwrap(),
        sales
    );
    assert_eq!(
        app.lookup(ORG, Channel::PhoneNumberId(PAUSED_NUMBER.to_string()))
            .await
            .unwrap()
            .agent_handle,
        "Zed.agent"
    );
    assert_error(
        app.lookup(
            ORG,
            Channel::MailboxId(SALES_MAILBOX_DELETED_TWIN.to_string()),
        )
        .await,
        Code::NotFound,
        "MAILBOX_NOT_FOUND",
    );
    assert_error(
        app.lookup(
            ORG,
            Channel::PhoneNumberId(SALES_NUMBER_RELEASED_TWIN.to_string()),
        )
        .await,
        Code::NotFound,
        "PHONE_NUMBER_NOT_FOUND",
    );
    assert_error(
        app.lookup(ORG, Channel::EmailAddress("free@agents.EXAMPLE".into()))
            .await,
        Code::NotFound,
        "MAILBOX_NOT_ASSIGNED",
    );

    // ListIdentities: byte order, no deleted ones, one organization each.
    let listed = app.list_identities(ORG, 0, "").await.unwrap();
    assert_eq!(
        handles(&listed),
        ["Zed.agent", "sales-agent", "support-agent"]
    );
    assert!(listed.next_page_token.is_empty());
    let first = app.list_identities(ORG, 2, "").await.unwrap();
    let rest = app
        .list_identities(ORG, 2, &first.next_page_token)
        .await
        .unwrap();
    assert_eq!(handles(&first), ["Zed.agent", "sales-agent"]);
    assert_eq!(handles(&rest), ["support-agent"]);
    assert_eq!(
        handles(&app.list_identities(OTHER_ORG, 0, "").await.unwrap()),
        ["sales-agent"]
    );
    assert_eq!(
        handles(&app.list_identities(OTHER_ORGS_TOO, 0, "").await.unwrap()),
        ["lone-agent"]
    );

    // ListMailboxes: the live ones, the legacy address included, by id.
    let mailboxes = app
        .inventory()
        .list_mailboxes(inventory_authorized(
            proto::ListMailboxesRequest::default(),
            ORG,
        ))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = mailboxes.mailboxes.iter().map(|m| m.id.clone()).collect();
    let expected: Vec<String> = [SALES_MAILBOX, SUPPORT_MAILBOX, LEGACY_MAILBOX, FREE_MAILBOX]
        .iter()
        .map(Uuid::to_string)
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(mailboxes.mailboxes[2].email_address, "legacy inbox");

    // New writes obey the new uniqueness, against the old rows.
    let before = snapshot(&pool).await;
    for address in ["sales@agents.example", "SUPPORT@agents.example"] {
        let taken = app
            .upsert_mailbox(
                ORG,
                UpsertMailboxRequest {
                    mailbox_id: Uuid::new_v4().to_string(),
                    email_address: address.to_owned(),
                    ..Default::default()
                },
            )
            .await;
        assert_error(taken, Code::AlreadyExists, "EMAIL_ADDRESS_ALREADY_EXISTS");
    }
    let taken = app
        .upsert_phone_number(
            ORG,
            UpsertPhoneNumberRequest {
                phone_number_id: Uuid::new_v4().to_string(),
                number: "+14155550101".into(),
                ..Default::default()
            },
        )
        .await;
    assert_error(taken, Code::AlreadyExists, "PHONE_NUMBER_ALREADY_EXISTS");
    // Restoring the deleted twin while its address is live is refused too.
    let restore = app
        .upsert_mailbox(
            ORG,
            UpsertMailboxRequest {
                mailbox_id: SALES_MAILBOX_DELETED_TWIN.to_string(),
                email_address: "sales@agents.example".into(),
                display_name: "Old sales".into(),
                status: MailboxStatus::Active.into(),
            },
        )
        .await;
    assert_error(restore, Code::AlreadyExists, "EMAIL_ADDRESS_ALREADY_EXISTS");
    assert_eq!(snapshot(&pool).await, before, "refusals change nothing");

    // Another organization may use the address; the legacy mailbox can be
    // given a well-formed address.
    app.upsert_mailbox(
        OTHER_ORGS_TOO,
        UpsertMailboxRequest {
            mailbox_id: Uuid::new_v4().to_string(),
            email_address: "sales@agents.example".into(),
            ..Default::default()
        },
    )
    .await
    .expect("addresses are unique per organization");
    let fixed = app
        .upsert_mailbox(
            ORG,
            UpsertMailboxRequest {
                mailbox_id: LEGACY_MAILBOX.to_string(),
                email_address: "legacy@agents.example".into(),
                display_name: "From before the format check".into(),
                status: MailboxStatus::Unspecified.into(),
            },
        )
        .await
        .expect("a legacy address can be corrected");
    assert_eq!(fixed.status(), MailboxStatus::Active);

    // The new unlinking triggers act on old links.
    let mut delete = UpsertMailboxRequest {
        mailbox_id: SUPPORT_MAILBOX.to_string(),
        email_address: "Support@agents.EXAMPLE".into(),
        status: MailboxStatus::Deleted.into(),
        ..Default::default()
    };
    app.upsert_mailbox(ORG, delete.clone()).await.unwrap();
    let support = app.get_identity(ORG, "support-agent").await.unwrap();
    assert!(support.mailbox.is_none(), "unlinked with its deletion");
    delete.status = MailboxStatus::Active.into();
    app.upsert_mailbox(ORG, delete).await.unwrap();
}

/// The second migration's refusal, as `MIGRATOR.run` reports it.
async fn refusal(pool: &PgPool) -> String {
    let error = MIGRATOR
        .run(pool)
        .await
        .expect_err("the migration refuses duplicated live records");
    let MigrateError::ExecuteMigration(sqlx::Error::Database(database), version) = &error else {
        panic!("not the migration's own refusal: {error:?}");
    };
    assert_eq!(*version, SECOND);
    assert!(
        database
            .message()
            .contains("used by more than one live record"),
        "{error}"
    );
    // The operator is told how to find them.
    let hint = database
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|pg| pg.hint())
        .unwrap_or_default();
    assert!(hint.contains("SELECT organization_id"), "hint: {hint:?}");
    database.message().to_owned()
}

/// Nothing of the second migration exists: it ran in one transaction.
async fn assert_second_migration_absent(pool: &PgPool) {
    assert_eq!(versions(pool).await, [FIRST]);
    let leftovers: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM (
            SELECT to_regclass('mailboxes_email_address_unique')::text AS name
            UNION ALL SELECT to_regclass('phone_numbers_number_unique')::text
            UNION ALL SELECT to_regclass('identities_listing')::text
            UNION ALL SELECT conname::text FROM pg_constraint
                WHERE conname = 'mailboxes_email_address_format'
            UNION ALL SELECT tgname::text FROM pg_trigger WHERE tgname LIKE '%unlink%'
            UNION ALL SELECT proname::text FROM pg_proc WHERE proname LIKE 'unlink%'
         ) AS found WHERE name IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(leftovers.is_empty(), "applied in part: {leftovers:?}");
}

#[sqlx::test(migrations = false)]
async fn live_addresses_that_differ_only_by_case_stop_the_migration_and_nothing_applies(
    pool: PgPool,
) {
    MIGRATOR.run_to(FIRST, &pool).await.expect("first schema");
    insert_old_data(&pool).await;
    let twin = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO mailboxes (organization_id, id, email_address) VALUES ($1, $2, 'sales@AGENTS.example')",
    )
    .bind(ORG)
    .bind(twin)
    .execute(&pool)
    .await
    .unwrap();
    let before = snapshot(&pool).await;

    let message = refusal(&pool).await;
    assert!(
        message.starts_with("1 e-mail addresses (case-insensitively) and 0 phone numbers"),
        "{message}"
    );
    assert_second_migration_absent(&pool).await;
    assert_eq!(snapshot(&pool).await, before, "no row changed");

    // As the hint says: mark all but one deleted, then migrate again.
    sqlx::query("UPDATE mailboxes SET status = 'deleted' WHERE id = $1")
        .bind(twin)
        .execute(&pool)
        .await
        .unwrap();
    MIGRATOR
        .run_to(SECOND, &pool)
        .await
        .expect("applies once resolved");
    assert_eq!(versions(&pool).await, [FIRST, SECOND]);
}

#[sqlx::test(migrations = false)]
async fn live_duplicate_numbers_stop_the_migration_a_paused_one_counting_as_live(pool: PgPool) {
    MIGRATOR.run_to(FIRST, &pool).await.expect("first schema");
    insert_old_data(&pool).await;
    // A paused twin of a live number, and a live case twin of an address.
    sqlx::query(
        "INSERT INTO phone_numbers (organization_id, id, number, status)
         VALUES ($1, $2, '+14155550100', 'paused')",
    )
    .bind(ORG)
    .bind(Uuid::new_v4())
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO mailboxes (organization_id, id, email_address, status)
         VALUES ($1, $2, 'FREE@agents.example', 'paused')",
    )
    .bind(ORG)
    .bind(Uuid::new_v4())
    .execute(&pool)
    .await
    .unwrap();
    let before = snapshot(&pool).await;

    let message = refusal(&pool).await;
    assert!(
        message.starts_with("1 e-mail addresses (case-insensitively) and 1 phone numbers"),
        "{message}"
    );
    assert_second_migration_absent(&pool).await;
    assert_eq!(snapshot(&pool).await, before, "no row changed");
}

// Links the first schema left behind: nothing unlinked a channel when its
// identity was deleted, or when it was itself deleted / released, by plain
// SQL. The second migration unlinks them, so the service cannot contradict
// itself about them afterwards (each test lists what it would say).

/// Every `(what, observed)` that is wrong, reported together.
fn assert_no_problems(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// A mailbox whose identity was deleted before the migration: LookupIdentity
/// says it is linked to no identity, yet AssignMailbox refuses it as
/// assigned to another identity, ListMailboxes(unassigned_only) leaves it
/// out, and restoring the deleted identity hands it back still linked
/// (the contract: a restored identity is unlinked).
#[sqlx::test(migrations = false)]
async fn a_mailbox_held_by_an_identity_deleted_before_the_migration_is_free_afterwards(
    pool: PgPool,
) {
    MIGRATOR.run_to(FIRST, &pool).await.expect("first schema");
    insert_old_data(&pool).await;
    // As an operator did it under the first schema: linked, then deleted.
    sqlx::query(
        "UPDATE identities SET mailbox_id = $2, status = 'active'
         WHERE organization_id = $1 AND agent_handle = 'gone-agent'",
    )
    .bind(ORG)
    .bind(FREE_MAILBOX)
    .execute(&pool)
    .await
    .unwrap();
    set_identity_status(&pool, ORG, "gone-agent", "deleted").await;
    MIGRATOR
        .run_to(SECOND, &pool)
        .await
        .expect("the migration applies");
    let app = spawn_app_on_partial_schema(&pool).await;
    let mut problems = Vec::new();

    let lookup = app
        .lookup(ORG, Channel::MailboxId(FREE_MAILBOX.to_string()))
        .await;
    let lookup_reason = lookup
        .as_ref()
        .err()
        .and_then(|status| {
            tonic_types::StatusExt::get_details_error_info(status).map(|info| info.reason)
        })
        .unwrap_or_default();
    assert_eq!(
        lookup_reason, "MAILBOX_NOT_ASSIGNED",
        "a deleted identity holds nothing"
    );
    let unassigned = app
        .inventory()
        .list_mailboxes(inventory_authorized(
            proto::ListMailboxesRequest {
                unassigned_only: true,
                ..Default::default()
            },
            ORG,
        ))
        .await
        .unwrap()
        .into_inner();
    if !unassigned
        .mailboxes
        .iter()
        .any(|m| m.id == FREE_MAILBOX.to_string())
    {
        problems.push(
            "ListMailboxes(unassigned_only) leaves out a mailbox LookupIdentity calls not assigned"
                .to_owned(),
        );
    }
    if let Err(status) = app
        .assign_mailbox(ORG, "Zed.agent", &FREE_MAILBOX.to_string())
        .await
    {
        problems.push(format!(
            "AssignMailbox of a mailbox LookupIdentity calls not assigned: {:?} {:?}",
            status.code(),
            status.message()
        ));
    }
    let restored = app
        .upsert_identity(
            ORG,
            proto::UpsertIdentityRequest {
                agent_handle: "gone-agent".into(),
                display_name: "Gone".into(),
                status: IdentityStatus::Active.into(),
            },
        )
        .await
        .expect("a deleted identity can be restored");
    if restored.mailbox.is_some() {
        problems.push(
            "UpsertIdentity(active) restored a deleted identity with its old mailbox linked"
                .to_owned(),
        );
    }
    assert_no_problems(&problems);
}

/// An identity whose mailbox was deleted (or number released) before the
/// migration: GetIdentity shows the removed channel in its detail, while
/// LookupIdentity by that channel's id answers that it does not exist.
#[sqlx::test(migrations = false)]
async fn a_channel_removed_before_the_migration_is_not_in_its_identity_detail(pool: PgPool) {
    MIGRATOR.run_to(FIRST, &pool).await.expect("first schema");
    insert_old_data(&pool).await;
    // Linked, then removed with plain SQL, under the first schema.
    sqlx::query("UPDATE mailboxes SET status = 'deleted' WHERE organization_id = $1 AND id = $2")
        .bind(ORG)
        .bind(SALES_MAILBOX)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE phone_numbers SET status = 'released' WHERE organization_id = $1 AND id = $2",
    )
    .bind(ORG)
    .bind(SALES_NUMBER)
    .execute(&pool)
    .await
    .unwrap();
    MIGRATOR
        .run_to(SECOND, &pool)
        .await
        .expect("the migration applies");
    let app = spawn_app_on_partial_schema(&pool).await;
    let mut problems = Vec::new();

    assert_error(
        app.lookup(ORG, Channel::MailboxId(SALES_MAILBOX.to_string()))
            .await,
        Code::NotFound,
        "MAILBOX_NOT_FOUND",
    );
    assert_error(
        app.lookup(ORG, Channel::PhoneNumberId(SALES_NUMBER.to_string()))
            .await,
        Code::NotFound,
        "PHONE_NUMBER_NOT_FOUND",
    );
    let sales = app.get_identity(ORG, "sales-agent").await.unwrap();
    if let Some(mailbox) = &sales.mailbox {
        problems.push(format!(
            "GetIdentity shows mailbox {} with status {:?}",
            mailbox.id,
            mailbox.status()
        ));
    }
    if let Some(number) = &sales.phone_number {
        problems.push(format!(
            "GetIdentity shows phone number {} with status {:?}",
            number.id,
            number.status()
        ));
    }
    let listed = app.list_identities(ORG, 0, "").await.unwrap();
    let in_list = listed
        .identities
        .iter()
        .find(|identity| identity.agent_handle == "sales-agent")
        .expect("listed");
    if in_list.mailbox.is_some() || in_list.phone_number.is_some() {
        problems.push("ListIdentities shows the removed channels too".to_owned());
    }
    assert_no_problems(&problems);
}

/// The service over a schema migrated only part of the way: it answers, but
/// its readiness (which checks its privileges on every table of the full
/// schema) says NOT_SERVING, as it should before `migrate` has run to the end.
async fn spawn_app_on_partial_schema(pool: &PgPool) -> TestApp {
    let settings = test_settings(AuthSettings::hs256(SECRET));
    let app = spawn_app_on(database_for(pool, &settings), settings).await;
    wait_for(&app, "readiness", ServingStatus::NotServing).await;
    app
}
