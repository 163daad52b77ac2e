//! AssignMailbox and AssignPhoneNumber: every scenario runs for both kinds.

use sqlx::PgPool;
use tonic::Code;
use tonic_types::StatusExt as _;
use uuid::Uuid;

use crate::for_each_kind;
use crate::helpers::*;

for_each_kind!(
    links_a_free_channel_and_returns_the_full_identity,
    assigning_the_same_channel_again_changes_nothing,
    assigning_another_channel_replaces_and_frees_the_previous_one,
    a_leading_at_sign_names_the_same_identity,
    paused_identities_and_channels_can_be_linked,
    unknown_identity_is_not_found,
    unknown_channel_is_not_found,
    another_organizations_channel_answers_exactly_like_a_missing_one,
    another_organizations_identity_answers_exactly_like_a_missing_one,
    a_deleted_identity_is_not_found_and_unchanged,
    a_gone_channel_cannot_be_linked,
    a_channel_linked_to_another_identity_is_already_assigned,
    malformed_or_missing_arguments_are_invalid,
    the_identity_is_reported_missing_before_the_channel,
);

async fn links_a_free_channel_and_returns_the_full_identity(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    let identity_id = insert_identity(&pool, ORG, "sales-agent").await;
    let channel = kind.insert(&pool, ORG).await;

    let identity = kind
        .assign(&app, ORG, "sales-agent", &channel.to_string())
        .await
        .expect("the channel is linked");

    assert_eq!(identity.id, identity_id.to_string());
    assert_eq!(identity.organization_id, ORG);
    assert_eq!(identity.agent_handle, "sales-agent");
    assert_eq!(identity.display_name, "Test sales-agent");
    assert_eq!(
        identity.status,
        channel_assignment::proto::IdentityStatus::Active as i32
    );
    assert!(identity.created_at.is_some() && identity.updated_at.is_some());
    assert_eq!(kind.linked_in(&identity), Some(channel.to_string()));
    match kind {
        Kind::Mailbox => {
            let mailbox = identity.mailbox.expect("mailbox detail");
            assert_eq!(
                mailbox.email_address,
                format!("{}@agents.example", channel.simple())
            );
            assert_eq!(mailbox.display_name, "Inbox");
            assert!(mailbox.created_at.is_some());
            assert!(identity.phone_number.is_none());
        }
        Kind::PhoneNumber => {
            let number = identity.phone_number.expect("phone number detail");
            assert!(number.number.starts_with("+1415"), "{}", number.number);
            assert_eq!(
                number.r#type,
                channel_assignment::proto::PhoneNumberType::Local as i32
            );
            assert!(number.created_at.is_some());
            assert!(identity.mailbox.is_none());
        }
    }
    assert_eq!(
        kind.linked_to(&pool, ORG, "sales-agent").await,
        Some(channel)
    );
}

async fn assigning_the_same_channel_again_changes_nothing(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let channel = kind.insert(&pool, ORG).await.to_string();
    let first = kind
        .assign(&app, ORG, "sales-agent", &channel)
        .await
        .expect("linked");
    let before = snapshot(&pool).await;

    let second = kind
        .assign(&app, ORG, "sales-agent", &channel)
        .await
        .expect("still linked");

    assert_eq!(second, first, "the same detail, updated_at included");
    assert_eq!(snapshot(&pool).await, before, "no write at all");
}

async fn assigning_another_channel_replaces_and_frees_the_previous_one(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    insert_identity(&pool, ORG, "support-agent").await;
    let old = kind.insert(&pool, ORG).await;
    let new = kind.insert(&pool, ORG).await;
    kind.assign(&app, ORG, "sales-agent", &old.to_string())
        .await
        .expect("linked");

    let identity = kind
        .assign(&app, ORG, "sales-agent", &new.to_string())
        .await
        .expect("replaced");

    assert_eq!(kind.linked_in(&identity), Some(new.to_string()));
    assert_eq!(
        kind.holders(&pool, old).await,
        0,
        "the old channel is unlinked"
    );
    let old_still_exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM mailboxes WHERE id = $1)
             OR EXISTS (SELECT 1 FROM phone_numbers WHERE id = $1)",
    )
    .bind(old)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(old_still_exists, "the old channel is not deleted");
    // ...and is free for any identity of the organization.
    let other = kind
        .assign(&app, ORG, "support-agent", &old.to_string())
        .await
        .expect("the freed channel can be linked elsewhere");
    assert_eq!(kind.linked_in(&other), Some(old.to_string()));
}

async fn a_leading_at_sign_names_the_same_identity(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    let identity_id = insert_identity(&pool, ORG, "sales-agent").await;
    let channel = kind.insert(&pool, ORG).await;

    let identity = kind
        .assign(&app, ORG, "@sales-agent", &channel.to_string())
        .await
        .expect("linked");

    assert_eq!(identity.id, identity_id.to_string());
    assert_eq!(identity.agent_handle, "sales-agent");
    assert_eq!(
        kind.linked_to(&pool, ORG, "sales-agent").await,
        Some(channel)
    );
}

async fn paused_identities_and_channels_can_be_linked(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    set_identity_status(&pool, ORG, "sales-agent", "paused").await;
    let channel = kind.insert(&pool, ORG).await;
    kind.set_status(&pool, channel, "paused").await;

    let identity = kind
        .assign(&app, ORG, "sales-agent", &channel.to_string())
        .await
        .expect("pausing stops traffic, not ownership");

    assert_eq!(
        identity.status,
        channel_assignment::proto::IdentityStatus::Paused as i32
    );
    assert_eq!(
        kind.linked_to(&pool, ORG, "sales-agent").await,
        Some(channel)
    );
}

async fn unknown_identity_is_not_found(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    let channel = kind.insert(&pool, ORG).await;
    let before = snapshot(&pool).await;

    let status = assert_error(
        kind.assign(&app, ORG, "nobody", &channel.to_string()).await,
        Code::NotFound,
        "IDENTITY_NOT_FOUND",
    );

    let resource = status.get_details_resource_info().expect("ResourceInfo");
    assert_eq!(resource.resource_type, "channels.v1.Identity");
    assert_eq!(resource.resource_name, "nobody");
    assert_eq!(snapshot(&pool).await, before);
}

async fn unknown_channel_is_not_found(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let missing = Uuid::new_v4().to_string();
    let before = snapshot(&pool).await;

    let status = assert_error(
        kind.assign(&app, ORG, "sales-agent", &missing).await,
        Code::NotFound,
        kind.not_found_reason(),
    );

    let resource = status.get_details_resource_info().expect("ResourceInfo");
    assert_eq!(resource.resource_name, missing);
    assert!(resource.owner.is_empty(), "no owner is ever named");
    assert_eq!(snapshot(&pool).await, before);
}

async fn another_organizations_channel_answers_exactly_like_a_missing_one(
    kind: Kind,
    pool: PgPool,
) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let foreign = kind.insert(&pool, OTHER_ORG).await;
    let before = snapshot(&pool).await;

    let exists_elsewhere = kind
        .assign(&app, ORG, "sales-agent", &foreign.to_string())
        .await
        .expect_err("not ours");
    assert_eq!(snapshot(&pool).await, before);
    sqlx::query("DELETE FROM mailboxes WHERE id = $1")
        .bind(foreign)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM phone_numbers WHERE id = $1")
        .bind(foreign)
        .execute(&pool)
        .await
        .unwrap();
    let missing = kind
        .assign(&app, ORG, "sales-agent", &foreign.to_string())
        .await
        .expect_err("gone");

    assert_error(
        Err::<(), _>(exists_elsewhere.clone()),
        Code::NotFound,
        kind.not_found_reason(),
    );
    assert_same_answer(&exists_elsewhere, &missing);
}

async fn another_organizations_identity_answers_exactly_like_a_missing_one(
    kind: Kind,
    pool: PgPool,
) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, OTHER_ORG, "their-agent").await;
    let channel = kind.insert(&pool, ORG).await.to_string();
    let before = snapshot(&pool).await;

    let exists_elsewhere = kind
        .assign(&app, ORG, "their-agent", &channel)
        .await
        .expect_err("not ours");
    assert_eq!(snapshot(&pool).await, before);
    sqlx::query("DELETE FROM identities WHERE agent_handle = 'their-agent'")
        .execute(&pool)
        .await
        .unwrap();
    let missing = kind
        .assign(&app, ORG, "their-agent", &channel)
        .await
        .expect_err("gone");

    assert_error(
        Err::<(), _>(exists_elsewhere.clone()),
        Code::NotFound,
        "IDENTITY_NOT_FOUND",
    );
    assert_same_answer(&exists_elsewhere, &missing);
}

async fn a_deleted_identity_is_not_found_and_unchanged(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "gone-agent").await;
    set_identity_status(&pool, ORG, "gone-agent", "deleted").await;
    let channel = kind.insert(&pool, ORG).await;
    let before = snapshot(&pool).await;

    assert_error(
        kind.assign(&app, ORG, "gone-agent", &channel.to_string())
            .await,
        Code::NotFound,
        "IDENTITY_NOT_FOUND",
    );
    assert_eq!(snapshot(&pool).await, before);
}

async fn a_gone_channel_cannot_be_linked(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let channel = kind.insert(&pool, ORG).await;
    kind.set_status(&pool, channel, kind.gone_status()).await;
    let before = snapshot(&pool).await;

    assert_error(
        kind.assign(&app, ORG, "sales-agent", &channel.to_string())
            .await,
        Code::NotFound,
        kind.not_found_reason(),
    );
    assert_eq!(snapshot(&pool).await, before);
}

async fn a_channel_linked_to_another_identity_is_already_assigned(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    insert_identity(&pool, ORG, "support-agent").await;
    let mine = kind.insert(&pool, ORG).await;
    let taken = kind.insert(&pool, ORG).await;
    kind.assign(&app, ORG, "sales-agent", &mine.to_string())
        .await
        .expect("linked");
    kind.assign(&app, ORG, "support-agent", &taken.to_string())
        .await
        .expect("linked");
    let before = snapshot(&pool).await;

    let status = assert_error(
        kind.assign(&app, ORG, "sales-agent", &taken.to_string())
            .await,
        Code::AlreadyExists,
        kind.already_assigned_reason(),
    );

    assert!(
        !status.message().contains("support-agent"),
        "the holder is not named"
    );
    assert_eq!(
        snapshot(&pool).await,
        before,
        "sales-agent keeps its own channel"
    );
}

async fn malformed_or_missing_arguments_are_invalid(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let channel = kind.insert(&pool, ORG).await.to_string();
    let before = snapshot(&pool).await;
    let too_long = "a".repeat(256);
    let cases: [(&str, &str, &[&str]); 9] = [
        ("sales-agent", "", &[kind.id_field()]),
        ("sales-agent", "not-a-uuid", &[kind.id_field()]),
        (
            "sales-agent",
            "0b6a4b9e3c1f4f8e9d2a5c7e1f0a9b3d",
            &[kind.id_field()],
        ),
        (
            "sales-agent",
            "'; DROP TABLE identities; --",
            &[kind.id_field()],
        ),
        ("", &channel, &["agent_handle"]),
        ("@", &channel, &["agent_handle"]),
        (&too_long, &channel, &["agent_handle"]),
        ("sales agent; --", &channel, &["agent_handle"]),
        ("", "", &["agent_handle", kind.id_field()]),
    ];

    for (handle, id, fields) in cases {
        let status = assert_error(
            kind.assign(&app, ORG, handle, id).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(
            field_violations(&status),
            fields.to_vec(),
            "{handle:?} {id:?}"
        );
    }
    assert_eq!(snapshot(&pool).await, before);
}

async fn the_identity_is_reported_missing_before_the_channel(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    let before = snapshot(&pool).await;

    assert_error(
        kind.assign(&app, ORG, "nobody", &Uuid::new_v4().to_string())
            .await,
        Code::NotFound,
        "IDENTITY_NOT_FOUND",
    );
    assert_eq!(snapshot(&pool).await, before);
}

/// Same code, same message, same details: nothing tells the two apart.
fn assert_same_answer(left: &tonic::Status, right: &tonic::Status) {
    assert_eq!(left.code(), right.code());
    assert_eq!(left.message(), right.message());
    assert_eq!(left.details(), right.details());
}
