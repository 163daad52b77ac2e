//! UnassignMailbox and UnassignPhoneNumber: every scenario runs for both kinds.

use sqlx::PgPool;
use tonic::Code;

use crate::for_each_kind;
use crate::helpers::*;

for_each_kind!(
    unlinks_without_deleting_the_channel,
    unassigning_with_nothing_linked_succeeds_and_writes_nothing,
    only_the_named_kind_is_unlinked,
    unknown_identity_is_not_found,
    another_organizations_identity_answers_exactly_like_a_missing_one,
    a_deleted_identity_cannot_be_changed,
    a_malformed_handle_is_invalid,
);

async fn unlinks_without_deleting_the_channel(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    insert_identity(&pool, ORG, "support-agent").await;
    let channel = kind.insert(&pool, ORG).await;
    kind.assign(&app, ORG, "sales-agent", &channel.to_string())
        .await
        .expect("linked");

    kind.unassign(&app, ORG, "@sales-agent")
        .await
        .expect("unlinked");

    assert_eq!(kind.linked_to(&pool, ORG, "sales-agent").await, None);
    let channels: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM mailboxes WHERE id = $1) + (SELECT count(*) FROM phone_numbers WHERE id = $1)",
    )
    .bind(channel)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(channels, 1, "the channel itself is kept");
    kind.assign(&app, ORG, "support-agent", &channel.to_string())
        .await
        .expect("and is free for another identity of the organization");
}

async fn unassigning_with_nothing_linked_succeeds_and_writes_nothing(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let before = snapshot(&pool).await;

    kind.unassign(&app, ORG, "sales-agent")
        .await
        .expect("idempotent, like DELETE");
    kind.unassign(&app, ORG, "sales-agent")
        .await
        .expect("and again");

    assert_eq!(snapshot(&pool).await, before, "updated_at untouched");
}

async fn only_the_named_kind_is_unlinked(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await;
    let number = insert_phone_number(&pool, ORG).await;
    app.assign_mailbox(ORG, "sales-agent", &mailbox.to_string())
        .await
        .expect("linked");
    app.assign_phone_number(ORG, "sales-agent", &number.to_string())
        .await
        .expect("linked");

    kind.unassign(&app, ORG, "sales-agent")
        .await
        .expect("unlinked");

    let (kept_kind, kept) = match kind {
        Kind::Mailbox => (Kind::PhoneNumber, number),
        Kind::PhoneNumber => (Kind::Mailbox, mailbox),
    };
    assert_eq!(kind.linked_to(&pool, ORG, "sales-agent").await, None);
    assert_eq!(
        kept_kind.linked_to(&pool, ORG, "sales-agent").await,
        Some(kept)
    );
}

async fn unknown_identity_is_not_found(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let before = snapshot(&pool).await;

    assert_error(
        kind.unassign(&app, ORG, "nobody").await,
        Code::NotFound,
        "IDENTITY_NOT_FOUND",
    );
    assert_eq!(snapshot(&pool).await, before);
}

async fn another_organizations_identity_answers_exactly_like_a_missing_one(
    kind: Kind,
    pool: PgPool,
) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, OTHER_ORG, "their-agent").await;
    let channel = kind.insert(&pool, OTHER_ORG).await;
    let their_app_view = kind
        .assign(&app, OTHER_ORG, "their-agent", &channel.to_string())
        .await
        .expect("linked in their organization");
    let before = snapshot(&pool).await;

    let exists_elsewhere = kind
        .unassign(&app, ORG, "their-agent")
        .await
        .expect_err("not ours");
    let missing = kind
        .unassign(&app, ORG, "nobody-at-all")
        .await
        .expect_err("missing");

    assert_error(
        Err::<(), _>(exists_elsewhere.clone()),
        Code::NotFound,
        "IDENTITY_NOT_FOUND",
    );
    assert_eq!(exists_elsewhere.code(), missing.code());
    assert_eq!(
        exists_elsewhere
            .message()
            .replace("their-agent", "nobody-at-all"),
        missing.message(),
        "the same words, but for the handle the caller gave"
    );
    assert_eq!(snapshot(&pool).await, before, "their link is untouched");
    assert_eq!(
        kind.linked_to(&pool, OTHER_ORG, "their-agent")
            .await
            .map(|id| id.to_string()),
        kind.linked_in(&their_app_view)
    );
}

async fn a_deleted_identity_cannot_be_changed(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let channel = kind.insert(&pool, ORG).await;
    kind.assign(&app, ORG, "sales-agent", &channel.to_string())
        .await
        .expect("linked");
    set_identity_status(&pool, ORG, "sales-agent", "deleted").await;
    let before = snapshot(&pool).await;

    assert_error(
        kind.unassign(&app, ORG, "sales-agent").await,
        Code::NotFound,
        "IDENTITY_NOT_FOUND",
    );
    assert_eq!(snapshot(&pool).await, before);
}

async fn a_malformed_handle_is_invalid(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let before = snapshot(&pool).await;

    for handle in ["", "@", &"x".repeat(256), "sales-agent\u{0}", "sales/agent"] {
        let status = assert_error(
            kind.unassign(&app, ORG, handle).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(
            field_violations(&status),
            vec!["agent_handle".to_owned()],
            "{handle:?}"
        );
    }
    assert_eq!(snapshot(&pool).await, before);
}
