//! GetIdentity, ListIdentities and LookupIdentity over the real server: the
//! same detail as an assign returns, byte-ordered pages with tamper-proof
//! tokens, and lookups that tell "no such channel" from "linked to nobody".

use std::collections::BTreeSet;

use channel_assignment::proto::{self, lookup_identity_request::Channel};
use sqlx::PgPool;
use tonic::Code;

use crate::helpers::*;

#[sqlx::test]
async fn get_identity_is_the_detail_an_assign_returns(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await.to_string();
    let number = insert_phone_number(&pool, ORG).await.to_string();
    app.assign_mailbox(ORG, "sales-agent", &mailbox)
        .await
        .unwrap();
    let assigned = app
        .assign_phone_number(ORG, "sales-agent", &number)
        .await
        .unwrap();

    let got = app.get_identity(ORG, "@sales-agent").await.unwrap();
    assert_eq!(got, assigned);
    assert_eq!(got.mailbox.as_ref().unwrap().id, mailbox);
    assert_eq!(got.phone_number.as_ref().unwrap().id, number);
}

#[sqlx::test]
async fn get_identity_of_a_deleted_missing_or_foreign_identity_is_not_found(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "gone").await;
    set_identity_status(&pool, ORG, "gone", "deleted").await;
    insert_identity(&pool, OTHER_ORG, "theirs").await;
    insert_identity(&pool, ORG, "paused-one").await;
    set_identity_status(&pool, ORG, "paused-one", "paused").await;
    let before = snapshot(&pool).await;

    let mut answers = Vec::new();
    for handle in ["gone", "nobody", "theirs"] {
        let status = assert_error(
            app.get_identity(ORG, handle).await,
            Code::NotFound,
            "IDENTITY_NOT_FOUND",
        );
        answers.push(status.message().replace(handle, "HANDLE"));
    }
    assert!(
        answers.windows(2).all(|pair| pair[0] == pair[1]),
        "{answers:?}"
    );
    let paused = app.get_identity(ORG, "paused-one").await.unwrap();
    assert_eq!(paused.status(), proto::IdentityStatus::Paused);
    let status = assert_error(
        app.get_identity(ORG, "not a handle").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(field_violations(&status), ["agent_handle"]);
    assert_eq!(snapshot(&pool).await, before);
}

/// Every page of the caller's identities, following the tokens.
async fn list_all(app: &TestApp, org: &str, page_size: i32) -> (Vec<String>, usize) {
    let mut handles = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = app.list_identities(org, page_size, &token).await.unwrap();
        pages += 1;
        handles.extend(page.identities.into_iter().map(|i| i.agent_handle));
        if page.next_page_token.is_empty() {
            return (handles, pages);
        }
        token = page.next_page_token;
    }
}

#[sqlx::test]
async fn identities_are_listed_in_byte_order_a_page_at_a_time(pool: PgPool) {
    let app = spawn_app(&pool).await;
    // Byte order: digits < upper case < '_' < lower case; '-' and '.' first.
    let handles = [
        "b", "B", "a", "A", "_x", "-x", ".x", "1", "a.b", "a-b", "a_b", "Zed", "zed",
    ];
    for handle in handles {
        insert_identity(&pool, ORG, handle).await;
    }
    insert_identity(&pool, ORG, "deleted-one").await;
    set_identity_status(&pool, ORG, "deleted-one", "deleted").await;
    insert_identity(&pool, OTHER_ORG, "not-mine").await;
    let mut expected: Vec<&str> = handles.to_vec();
    expected.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));

    for page_size in [1, 2, 5, 13, 14, 0] {
        let (listed, pages) = list_all(&app, ORG, page_size).await;
        assert_eq!(listed, expected, "page size {page_size}");
        let expected_pages = match page_size {
            0 => 1,
            size => expected.len().div_ceil(usize::try_from(size).unwrap()),
        };
        // The page holding the last identity has no next token.
        assert_eq!(pages, expected_pages, "page size {page_size}");
    }
}

#[sqlx::test]
async fn page_sizes_default_to_50_and_are_capped_at_1000(pool: PgPool) {
    let app = spawn_app(&pool).await;
    sqlx::query(
        "INSERT INTO identities (organization_id, agent_handle)
         SELECT $1, 'agent-' || lpad(n::text, 5, '0') FROM generate_series(1, 1001) AS n",
    )
    .bind(ORG)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        app.list_identities(ORG, 0, "")
            .await
            .unwrap()
            .identities
            .len(),
        50
    );
    let capped = app.list_identities(ORG, 5000, "").await.unwrap();
    assert_eq!(capped.identities.len(), 1000);
    assert!(!capped.next_page_token.is_empty());
    let last = app
        .list_identities(ORG, 5000, &capped.next_page_token)
        .await
        .unwrap();
    assert_eq!(last.identities.len(), 1);
    assert!(last.next_page_token.is_empty());

    let status = assert_error(
        app.list_identities(ORG, -1, "").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(field_violations(&status), ["page_size"]);
}

#[sqlx::test]
async fn altered_or_foreign_page_tokens_are_invalid(pool: PgPool) {
    let app = spawn_app(&pool).await;
    for handle in ["a", "b", "c"] {
        insert_identity(&pool, ORG, handle).await;
        insert_identity(&pool, OTHER_ORG, handle).await;
    }
    let token = app
        .list_identities(ORG, 1, "")
        .await
        .unwrap()
        .next_page_token;
    assert!(!token.is_empty());

    let mut altered = token.clone().into_bytes();
    let middle = altered.len() / 2;
    altered[middle] = if altered[middle] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    let mailboxes_token = {
        insert_mailbox(&pool, ORG).await;
        insert_mailbox(&pool, ORG).await;
        app.inventory()
            .list_mailboxes(inventory_authorized(
                proto::ListMailboxesRequest {
                    page_size: 1,
                    ..Default::default()
                },
                ORG,
            ))
            .await
            .unwrap()
            .into_inner()
            .next_page_token
    };
    for (case, org, bad) in [
        ("altered", ORG, altered.as_str()),
        ("another organization's", OTHER_ORG, token.as_str()),
        ("another list's", ORG, mailboxes_token.as_str()),
        ("made up", ORG, "bm90IGEgdG9rZW4"),
        ("not base64", ORG, "%%%"),
    ] {
        let status = assert_error(
            app.list_identities(org, 1, bad).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(field_violations(&status), ["page_token"], "{case}");
    }
}

/// Paging while others insert and delete: every identity that existed
/// throughout is listed exactly once, and nothing is listed twice.
#[sqlx::test]
async fn paging_under_concurrent_writes_never_repeats_or_skips(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let mut stable = BTreeSet::new();
    for i in 0..120 {
        let handle = format!("stable-{i:03}");
        insert_identity(&pool, ORG, &handle).await;
        stable.insert(handle);
    }
    for i in 0..60 {
        insert_identity(&pool, ORG, &format!("doomed-{i:03}")).await;
    }

    // Writers interleave inserts and deletes on either side of any position.
    let writer = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                for prefix in ["a-new", "m-new", "z-new"] {
                    insert_identity(&pool, ORG, &format!("{prefix}-{i:03}")).await;
                }
                sqlx::query(
                    "DELETE FROM identities WHERE organization_id = $1 AND agent_handle = $2",
                )
                .bind(ORG)
                .bind(format!("doomed-{i:03}"))
                .execute(&pool)
                .await
                .unwrap();
                set_identity_status(&pool, ORG, &format!("a-new-{i:03}"), "deleted").await;
                tokio::task::yield_now().await;
            }
        })
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = app.list_identities(ORG, 7, &token).await.unwrap();
        seen.extend(page.identities.into_iter().map(|i| i.agent_handle));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    writer.await.unwrap();

    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "an identity was listed twice");
    let missing: Vec<_> = stable.difference(&unique).collect();
    assert!(missing.is_empty(), "skipped: {missing:?}");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(seen, sorted, "pages follow byte order");
}

#[sqlx::test]
async fn lookups_find_the_linked_identity_by_any_key(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await;
    let number = insert_phone_number(&pool, ORG).await;
    app.assign_mailbox(ORG, "sales-agent", &mailbox.to_string())
        .await
        .unwrap();
    let expected = app
        .assign_phone_number(ORG, "sales-agent", &number.to_string())
        .await
        .unwrap();
    let address: String = sqlx::query_scalar("SELECT email_address FROM mailboxes WHERE id = $1")
        .bind(mailbox)
        .fetch_one(&pool)
        .await
        .unwrap();
    let e164: String = sqlx::query_scalar("SELECT number FROM phone_numbers WHERE id = $1")
        .bind(number)
        .fetch_one(&pool)
        .await
        .unwrap();

    for (case, key) in [
        ("mailbox id", Channel::MailboxId(mailbox.to_string())),
        ("address", Channel::EmailAddress(address.clone())),
        (
            "address in upper case",
            Channel::EmailAddress(address.to_uppercase()),
        ),
        ("number id", Channel::PhoneNumberId(number.to_string())),
        ("number", Channel::PhoneNumber(e164)),
    ] {
        let found = app.lookup(ORG, key).await;
        assert_eq!(found.as_ref().ok(), Some(&expected), "{case}");
    }
}

#[sqlx::test]
async fn lookups_tell_missing_from_unassigned(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let free_mailbox = insert_mailbox(&pool, ORG).await;
    let free_number = insert_phone_number(&pool, ORG).await;
    let deleted_mailbox = insert_mailbox(&pool, ORG).await;
    Kind::Mailbox
        .set_status(&pool, deleted_mailbox, "deleted")
        .await;
    let released_number = insert_phone_number(&pool, ORG).await;
    Kind::PhoneNumber
        .set_status(&pool, released_number, "released")
        .await;
    let foreign_mailbox = insert_mailbox(&pool, OTHER_ORG).await;
    let foreign_number = insert_phone_number(&pool, OTHER_ORG).await;
    let before = snapshot(&pool).await;

    assert_error(
        app.lookup(ORG, Channel::MailboxId(free_mailbox.to_string()))
            .await,
        Code::NotFound,
        "MAILBOX_NOT_ASSIGNED",
    );
    assert_error(
        app.lookup(ORG, Channel::PhoneNumberId(free_number.to_string()))
            .await,
        Code::NotFound,
        "PHONE_NUMBER_NOT_ASSIGNED",
    );
    let mut mailbox_answers = Vec::new();
    for missing in [deleted_mailbox, foreign_mailbox, uuid::Uuid::new_v4()] {
        let status = assert_error(
            app.lookup(ORG, Channel::MailboxId(missing.to_string()))
                .await,
            Code::NotFound,
            "MAILBOX_NOT_FOUND",
        );
        mailbox_answers.push(format!("{:?}", (status.message(), status.details())));
    }
    assert!(mailbox_answers.windows(2).all(|pair| pair[0] == pair[1]));
    for missing in [released_number, foreign_number] {
        assert_error(
            app.lookup(ORG, Channel::PhoneNumberId(missing.to_string()))
                .await,
            Code::NotFound,
            "PHONE_NUMBER_NOT_FOUND",
        );
    }
    assert_error(
        app.lookup(ORG, Channel::EmailAddress("nobody@agents.example".into()))
            .await,
        Code::NotFound,
        "MAILBOX_NOT_FOUND",
    );
    assert_error(
        app.lookup(ORG, Channel::PhoneNumber("+14155550000".into()))
            .await,
        Code::NotFound,
        "PHONE_NUMBER_NOT_FOUND",
    );
    assert_eq!(snapshot(&pool).await, before);
}

#[sqlx::test]
async fn malformed_or_missing_lookup_keys_are_invalid(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let status = assert_error(
        app.client
            .clone()
            .lookup_identity(authorized(
                proto::LookupIdentityRequest { channel: None },
                ORG,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(field_violations(&status), ["channel"]);
    for (key, field) in [
        (Channel::MailboxId("nope".into()), "mailbox_id"),
        (Channel::PhoneNumberId(String::new()), "phone_number_id"),
        (Channel::EmailAddress("no-at-sign".into()), "email_address"),
        (Channel::PhoneNumber("4155550123".into()), "phone_number"),
    ] {
        let status = assert_error(
            app.lookup(ORG, key).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(field_violations(&status), [field]);
    }
}
