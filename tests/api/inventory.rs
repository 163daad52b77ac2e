//! ChannelInventory over the real server: the scope it needs, idempotent
//! upserts, uniqueness the database enforces, unlinking on deletion, lists,
//! and a deletion racing an assign.

use channel_assignment::{
    config::AuthSettings,
    proto::{
        self, IdentityStatus, MailboxStatus, PhoneNumberStatus, PhoneNumberType,
        UpsertIdentityRequest, UpsertMailboxRequest, UpsertPhoneNumberRequest,
    },
};
use futures_util::future::join_all;
use sqlx::PgPool;
use tonic::{Code, Request};
use uuid::Uuid;

use crate::helpers::*;

fn mailbox(id: Uuid, address: &str) -> UpsertMailboxRequest {
    UpsertMailboxRequest {
        mailbox_id: id.to_string(),
        email_address: address.to_owned(),
        display_name: "Inbox".to_owned(),
        status: MailboxStatus::Unspecified.into(),
    }
}

fn phone_number(id: Uuid, number: &str) -> UpsertPhoneNumberRequest {
    UpsertPhoneNumberRequest {
        phone_number_id: id.to_string(),
        number: number.to_owned(),
        ..Default::default()
    }
}

fn identity(handle: &str, display_name: &str, status: IdentityStatus) -> UpsertIdentityRequest {
    UpsertIdentityRequest {
        agent_handle: handle.to_owned(),
        display_name: display_name.to_owned(),
        status: status.into(),
    }
}

#[sqlx::test]
async fn inventory_needs_the_inventory_scope_checked_after_the_organization(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let before = snapshot(&pool).await;
    let upsert = |token: Option<String>| {
        let mut request = Request::new(identity("sales-agent", "", IdentityStatus::Unspecified));
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let mut inventory = app.inventory();
        async move { inventory.upsert_identity(request).await }
    };

    assert_error(upsert(None).await, Code::Unauthenticated, "UNAUTHENTICATED");
    let no_org = sign_hs256(
        &serde_json::json!({ "exp": now() + 60, "scope": "channels.inventory" }),
        SECRET,
    );
    assert_error(
        upsert(Some(no_org)).await,
        Code::PermissionDenied,
        "ORGANIZATION_ID_MISSING",
    );
    for scope in ["", "channels.inventory.read", "channels", "openid profile"] {
        let status = assert_error(
            upsert(Some(scoped_token(ORG, scope))).await,
            Code::PermissionDenied,
            "SCOPE_MISSING",
        );
        assert!(
            status.message().contains("channels.inventory"),
            "{status:?}"
        );
    }
    let plain = upsert(Some(hs256_token(ORG))).await;
    assert_error(plain, Code::PermissionDenied, "SCOPE_MISSING");
    assert_eq!(snapshot(&pool).await, before);

    upsert(Some(scoped_token(ORG, "openid channels.inventory profile")))
        .await
        .expect("a whole scope token among others");
    // ChannelAssignment needs no scope.
    app.get_identity(ORG, "sales-agent")
        .await
        .expect("no scope needed");
}

#[sqlx::test]
async fn with_the_trusted_header_the_gateway_passes_scopes_in_x_scope(pool: PgPool) {
    let auth = AuthSettings {
        trusted_header: true,
        ..AuthSettings::hs256(SECRET)
    };
    let app = spawn_app_with(&pool, auth).await;
    let request = |scope: Option<&str>| {
        let mut request = Request::new(identity("sales-agent", "", IdentityStatus::Unspecified));
        request
            .metadata_mut()
            .insert("x-organization-id", ORG.parse().unwrap());
        if let Some(scope) = scope {
            request
                .metadata_mut()
                .insert("x-scope", scope.parse().unwrap());
        }
        request
    };
    assert_error(
        app.inventory().upsert_identity(request(None)).await,
        Code::PermissionDenied,
        "SCOPE_MISSING",
    );
    let identity = app
        .inventory()
        .upsert_identity(request(Some("channels.inventory")))
        .await
        .expect("scope from the gateway")
        .into_inner();
    assert_eq!(identity.organization_id, ORG);
}

#[sqlx::test]
async fn upsert_identity_creates_updates_and_changes_nothing_when_repeated(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let created = app
        .upsert_identity(
            ORG,
            identity("@sales-agent", "Sales", IdentityStatus::Unspecified),
        )
        .await
        .unwrap();
    assert_eq!(created.agent_handle, "sales-agent");
    assert_eq!(created.display_name, "Sales");
    assert_eq!(created.status(), IdentityStatus::Active);

    let again = app
        .upsert_identity(
            ORG,
            identity("sales-agent", "Sales", IdentityStatus::Unspecified),
        )
        .await
        .unwrap();
    assert_eq!(
        again, created,
        "a repeated upsert changes nothing, updated_at included"
    );

    let paused = app
        .upsert_identity(
            ORG,
            identity("sales-agent", "Sales", IdentityStatus::Paused),
        )
        .await
        .unwrap();
    assert_eq!(paused.status(), IdentityStatus::Paused);
    assert_eq!(
        (paused.id.clone(), paused.created_at),
        (created.id.clone(), created.created_at)
    );
    let renamed = app
        .upsert_identity(
            ORG,
            identity("sales-agent", "", IdentityStatus::Unspecified),
        )
        .await
        .unwrap();
    assert_eq!(
        renamed.status(),
        IdentityStatus::Paused,
        "unspecified: unchanged"
    );
    assert_eq!(renamed.display_name, "", "empty clears it");
    let stored: Option<String> = sqlx::query_scalar(
        "SELECT display_name FROM identities WHERE organization_id = $1 AND agent_handle = 'sales-agent'",
    )
    .bind(ORG)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stored, None);
}

#[sqlx::test]
async fn deleting_an_identity_frees_its_channels_and_restoring_it_keeps_them_free(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox_id = insert_mailbox(&pool, ORG).await;
    let number_id = insert_phone_number(&pool, ORG).await;
    app.assign_mailbox(ORG, "sales-agent", &mailbox_id.to_string())
        .await
        .unwrap();
    app.assign_phone_number(ORG, "sales-agent", &number_id.to_string())
        .await
        .unwrap();

    let deleted = app
        .upsert_identity(ORG, identity("sales-agent", "", IdentityStatus::Deleted))
        .await
        .unwrap();
    assert_eq!(deleted.status(), IdentityStatus::Deleted);
    assert!(deleted.mailbox.is_none() && deleted.phone_number.is_none());
    assert_eq!(Kind::Mailbox.holders(&pool, mailbox_id).await, 0);
    assert_eq!(Kind::PhoneNumber.holders(&pool, number_id).await, 0);
    assert_error(
        app.get_identity(ORG, "sales-agent").await,
        Code::NotFound,
        "IDENTITY_NOT_FOUND",
    );
    // The freed channel can go to another identity at once.
    insert_identity(&pool, ORG, "support-agent").await;
    app.assign_mailbox(ORG, "support-agent", &mailbox_id.to_string())
        .await
        .expect("the mailbox is free");

    let restored = app
        .upsert_identity(ORG, identity("sales-agent", "", IdentityStatus::Active))
        .await
        .unwrap();
    assert_eq!(restored.status(), IdentityStatus::Active);
    assert!(restored.mailbox.is_none() && restored.phone_number.is_none());
    app.get_identity(ORG, "sales-agent")
        .await
        .expect("restored");
}

#[sqlx::test]
async fn upsert_mailbox_is_idempotent_and_addresses_are_unique_case_insensitively(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let id = Uuid::new_v4();
    let created = app
        .upsert_mailbox(ORG, mailbox(id, "Sales@Agents.example"))
        .await
        .unwrap();
    assert_eq!(created.id, id.to_string());
    assert_eq!(created.email_address, "Sales@Agents.example");
    assert_eq!(created.status(), MailboxStatus::Active);
    let again = app
        .upsert_mailbox(ORG, mailbox(id, "Sales@Agents.example"))
        .await
        .unwrap();
    assert_eq!(
        again, created,
        "a repeated upsert changes nothing, updated_at included"
    );

    // The same id in another organization names another record.
    let theirs = app
        .upsert_mailbox(OTHER_ORG, mailbox(id, "sales@agents.example"))
        .await
        .expect("ids are scoped to the organization");
    assert_eq!(theirs.id, id.to_string());

    let before = snapshot(&pool).await;
    let taken = app
        .upsert_mailbox(ORG, mailbox(Uuid::new_v4(), "sales@AGENTS.example"))
        .await;
    assert_error(taken, Code::AlreadyExists, "EMAIL_ADDRESS_ALREADY_EXISTS");
    assert_eq!(snapshot(&pool).await, before);

    // Deleted, its address is free again; restoring it while taken is refused.
    let mut delete = mailbox(id, "Sales@Agents.example");
    delete.status = MailboxStatus::Deleted.into();
    app.upsert_mailbox(ORG, delete).await.unwrap();
    let successor = Uuid::new_v4();
    app.upsert_mailbox(ORG, mailbox(successor, "sales@agents.example"))
        .await
        .expect("the address of a deleted mailbox is free");
    let mut restore = mailbox(id, "Sales@Agents.example");
    restore.status = MailboxStatus::Active.into();
    let before = snapshot(&pool).await;
    assert_error(
        app.upsert_mailbox(ORG, restore).await,
        Code::AlreadyExists,
        "EMAIL_ADDRESS_ALREADY_EXISTS",
    );
    assert_eq!(snapshot(&pool).await, before);
}

#[sqlx::test]
async fn upsert_phone_number_keeps_its_type_unless_told_and_numbers_are_unique(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let id = Uuid::new_v4();
    let created = app
        .upsert_phone_number(ORG, phone_number(id, "+14155550100"))
        .await
        .unwrap();
    assert_eq!(created.r#type(), PhoneNumberType::Local);
    assert_eq!(created.status(), PhoneNumberStatus::Active);
    let mut toll_free = phone_number(id, "+14155550100");
    toll_free.r#type = PhoneNumberType::TollFree.into();
    toll_free.incoming_call_action = "forward".into();
    let updated = app.upsert_phone_number(ORG, toll_free).await.unwrap();
    assert_eq!(updated.r#type(), PhoneNumberType::TollFree);
    assert_eq!(updated.incoming_call_action, "forward");
    let unchanged_type = app
        .upsert_phone_number(ORG, phone_number(id, "+14155550100"))
        .await
        .unwrap();
    assert_eq!(
        unchanged_type.r#type(),
        PhoneNumberType::TollFree,
        "unset: unchanged"
    );
    assert_eq!(unchanged_type.incoming_call_action, "", "empty clears it");

    let before = snapshot(&pool).await;
    assert_error(
        app.upsert_phone_number(ORG, phone_number(Uuid::new_v4(), "+14155550100"))
            .await,
        Code::AlreadyExists,
        "PHONE_NUMBER_ALREADY_EXISTS",
    );
    assert_eq!(snapshot(&pool).await, before);
}

#[sqlx::test]
async fn removing_a_channel_unlinks_it_in_the_same_transaction(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox_id = Uuid::new_v4();
    let number_id = Uuid::new_v4();
    app.upsert_mailbox(ORG, mailbox(mailbox_id, "a@agents.example"))
        .await
        .unwrap();
    app.upsert_phone_number(ORG, phone_number(number_id, "+14155550101"))
        .await
        .unwrap();
    app.assign_mailbox(ORG, "sales-agent", &mailbox_id.to_string())
        .await
        .unwrap();
    app.assign_phone_number(ORG, "sales-agent", &number_id.to_string())
        .await
        .unwrap();

    let mut delete = mailbox(mailbox_id, "a@agents.example");
    delete.status = MailboxStatus::Deleted.into();
    let deleted = app.upsert_mailbox(ORG, delete).await.unwrap();
    assert_eq!(deleted.status(), MailboxStatus::Deleted);
    let mut release = phone_number(number_id, "+14155550101");
    release.status = PhoneNumberStatus::Released.into();
    app.upsert_phone_number(ORG, release).await.unwrap();

    let identity = app.get_identity(ORG, "sales-agent").await.unwrap();
    assert!(identity.mailbox.is_none() && identity.phone_number.is_none());
    assert_eq!(Kind::Mailbox.holders(&pool, mailbox_id).await, 0);
    assert_eq!(Kind::PhoneNumber.holders(&pool, number_id).await, 0);

    // Restored, it is active and unlinked, and can be linked again.
    let restored = app
        .upsert_mailbox(ORG, {
            let mut restore = mailbox(mailbox_id, "a@agents.example");
            restore.status = MailboxStatus::Active.into();
            restore
        })
        .await
        .unwrap();
    assert_eq!(restored.status(), MailboxStatus::Active);
    app.assign_mailbox(ORG, "sales-agent", &mailbox_id.to_string())
        .await
        .unwrap();
}

#[sqlx::test]
async fn malformed_upserts_are_invalid_and_change_nothing(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let before = snapshot(&pool).await;
    let cases: Vec<(&str, Result<(), tonic::Status>, Vec<&str>)> = vec![
        (
            "handle",
            app.upsert_identity(ORG, identity("no spaces", "", IdentityStatus::Unspecified))
                .await
                .map(drop),
            vec!["agent_handle"],
        ),
        (
            "identity status out of range",
            app.upsert_identity(
                ORG,
                UpsertIdentityRequest {
                    agent_handle: "ok".into(),
                    display_name: String::new(),
                    status: 42,
                },
            )
            .await
            .map(drop),
            vec!["status"],
        ),
        (
            "mailbox id and address",
            app.upsert_mailbox(
                ORG,
                UpsertMailboxRequest {
                    mailbox_id: "nope".into(),
                    email_address: "not an address".into(),
                    ..Default::default()
                },
            )
            .await
            .map(drop),
            vec!["mailbox_id", "email_address"],
        ),
        (
            "address too long",
            app.upsert_mailbox(
                ORG,
                mailbox(Uuid::new_v4(), &format!("{}@b.example", "a".repeat(320))),
            )
            .await
            .map(drop),
            vec!["email_address"],
        ),
        (
            "NUL in a display name",
            app.upsert_identity(ORG, identity("ok", "a\0b", IdentityStatus::Unspecified))
                .await
                .map(drop),
            vec!["display_name"],
        ),
        (
            "NUL in an address",
            app.upsert_mailbox(ORG, mailbox(Uuid::new_v4(), "a\0@b.example"))
                .await
                .map(drop),
            vec!["email_address"],
        ),
        (
            "number",
            app.upsert_phone_number(ORG, phone_number(Uuid::new_v4(), "555-0100"))
                .await
                .map(drop),
            vec!["number"],
        ),
        (
            "type",
            app.upsert_phone_number(
                ORG,
                UpsertPhoneNumberRequest {
                    phone_number_id: Uuid::new_v4().to_string(),
                    number: "+14155550199".into(),
                    r#type: 9,
                    ..Default::default()
                },
            )
            .await
            .map(drop),
            vec!["type"],
        ),
    ];
    for (case, result, fields) in cases {
        let status = assert_error(result, Code::InvalidArgument, "INVALID_ARGUMENT");
        assert_eq!(field_violations(&status), fields, "{case}");
    }
    assert_eq!(snapshot(&pool).await, before);
}

#[sqlx::test]
async fn channel_lists_are_by_id_without_removed_ones_and_can_keep_the_unassigned(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mut live = Vec::new();
    for _ in 0..7 {
        live.push(insert_mailbox(&pool, ORG).await);
    }
    let deleted = insert_mailbox(&pool, ORG).await;
    Kind::Mailbox.set_status(&pool, deleted, "deleted").await;
    insert_mailbox(&pool, OTHER_ORG).await;
    app.assign_mailbox(ORG, "sales-agent", &live[3].to_string())
        .await
        .unwrap();
    live.sort();

    let list = |unassigned_only: bool| {
        let app = &app;
        async move {
            let mut ids = Vec::new();
            let mut token = String::new();
            loop {
                let page = app
                    .inventory()
                    .list_mailboxes(inventory_authorized(
                        proto::ListMailboxesRequest {
                            page_size: 3,
                            page_token: token.clone(),
                            unassigned_only,
                        },
                        ORG,
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                ids.extend(
                    page.mailboxes
                        .into_iter()
                        .map(|m| m.id.parse::<Uuid>().unwrap()),
                );
                if page.next_page_token.is_empty() {
                    return ids;
                }
                token = page.next_page_token;
            }
        }
    };
    assert_eq!(list(false).await, live);
    let linked: Uuid = Kind::Mailbox
        .linked_to(&pool, ORG, "sales-agent")
        .await
        .unwrap();
    let unassigned: Vec<Uuid> = live.iter().copied().filter(|id| *id != linked).collect();
    assert_eq!(list(true).await, unassigned);

    let mut numbers = Vec::new();
    for _ in 0..3 {
        numbers.push(insert_phone_number(&pool, ORG).await);
    }
    let released = insert_phone_number(&pool, ORG).await;
    Kind::PhoneNumber
        .set_status(&pool, released, "released")
        .await;
    numbers.sort();
    let page = app
        .inventory()
        .list_phone_numbers(inventory_authorized(
            proto::ListPhoneNumbersRequest::default(),
            ORG,
        ))
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<Uuid> = page
        .phone_numbers
        .iter()
        .map(|p| p.id.parse().unwrap())
        .collect();
    assert_eq!(listed, numbers);
    assert!(page.next_page_token.is_empty());
}

/// Deleting a mailbox while requests race to link it: afterwards no deleted
/// mailbox is linked, whatever the interleaving.
#[sqlx::test]
async fn a_deletion_racing_assigns_leaves_no_deleted_channel_linked(pool: PgPool) {
    let app = spawn_app(&pool).await;
    for round in 0..20 {
        let handles: Vec<String> = (0..4).map(|i| format!("r{round}-agent-{i}")).collect();
        for handle in &handles {
            insert_identity(&pool, ORG, handle).await;
        }
        let id = Uuid::new_v4();
        let address = format!("race-{round}@agents.example");
        app.upsert_mailbox(ORG, mailbox(id, &address))
            .await
            .unwrap();
        let mut delete = mailbox(id, &address);
        delete.status = MailboxStatus::Deleted.into();
        let id_text = id.to_string();
        let assigns = join_all(
            handles
                .iter()
                .map(|handle| app.assign_mailbox(ORG, handle, &id_text)),
        );
        let (answers, deleted) = tokio::join!(assigns, app.upsert_mailbox(ORG, delete));
        deleted.expect("the deletion succeeds");
        for answer in answers {
            if let Err(status) = answer {
                assert!(
                    matches!(status.code(), Code::NotFound | Code::AlreadyExists),
                    "{status:?}"
                );
            }
        }
        let linked_deleted: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM identities i JOIN mailboxes m
               ON m.organization_id = i.organization_id AND m.id = i.mailbox_id
             WHERE m.status = 'deleted'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(linked_deleted, 0, "round {round}");
    }
}

#[sqlx::test]
async fn inventory_is_in_health_and_metrics_like_the_assignment_service(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "channels.v1.ChannelInventory".into(),
        })
        .await
        .expect("the inventory service has a health status")
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    app.upsert_mailbox(ORG, mailbox(Uuid::new_v4(), "metrics@agents.example"))
        .await
        .unwrap();
    let scraped = crate::metrics::scrape(app.metrics_addr).await;
    assert!(
        scraped.contains(
            r#"channel_assignment_rpc_requests_total{method="UpsertMailbox",code="OK"} 1"#
        ),
        "{scraped}"
    );
}
