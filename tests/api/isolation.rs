//! The isolation matrix: for every RPC, every caller organization, and every
//! owner of the identity and of the channel (the caller's organization, the
//! other one, or nobody), a caller reaches only its own resources, and "it
//! exists elsewhere" is answered exactly like "it does not exist".

use channel_assignment::proto::{self, lookup_identity_request::Channel};
use sqlx::PgPool;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::helpers::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Caller,
    Other,
    Nobody,
}

const HANDLE: &str = "subject";

fn org_of(owner: Owner, caller: &'static str) -> Option<&'static str> {
    let other = if caller == ORG { OTHER_ORG } else { ORG };
    match owner {
        Owner::Caller => Some(caller),
        Owner::Other => Some(other),
        Owner::Nobody => None,
    }
}

/// Empties the tables and places the identity and the channel as asked.
async fn arrange(
    pool: &PgPool,
    kind: Kind,
    caller: &'static str,
    identity: Owner,
    channel: Owner,
    channel_id: Uuid,
) {
    sqlx::raw_sql("DELETE FROM identities; DELETE FROM mailboxes; DELETE FROM phone_numbers")
        .execute(pool)
        .await
        .unwrap();
    if let Some(org) = org_of(identity, caller) {
        insert_identity(pool, org, HANDLE).await;
    }
    if let Some(org) = org_of(channel, caller) {
        let sql = match kind {
            Kind::Mailbox => {
                "INSERT INTO mailboxes (organization_id, id, email_address) VALUES ($1, $2, 'x@example.com')"
            }
            Kind::PhoneNumber => {
                "INSERT INTO phone_numbers (organization_id, id, number) VALUES ($1, $2, '+14155550100')"
            }
        };
        sqlx::query(sql)
            .bind(org)
            .bind(channel_id)
            .execute(pool)
            .await
            .unwrap();
    }
}

fn same_answer(left: &Status, right: &Status) -> bool {
    left.code() == right.code()
        && left.message() == right.message()
        && left.details() == right.details()
}

#[sqlx::test]
async fn callers_reach_only_their_own_resources_and_learn_nothing_of_others(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let owners = [Owner::Caller, Owner::Other, Owner::Nobody];
    let channel_id = Uuid::new_v4();
    let mut cases = 0;

    for caller in [ORG, OTHER_ORG] {
        for kind in [Kind::Mailbox, Kind::PhoneNumber] {
            // Assign: identity owner × channel owner.
            for identity in owners {
                let mut answers = Vec::new();
                for channel in owners {
                    arrange(&pool, kind, caller, identity, channel, channel_id).await;
                    let before = snapshot(&pool).await;
                    let result = kind
                        .assign(&app, caller, HANDLE, &channel_id.to_string())
                        .await;
                    cases += 1;
                    let refusal = result.as_ref().err().cloned();
                    match (identity, channel) {
                        (Owner::Caller, Owner::Caller) => {
                            let linked = result.expect("own identity, own channel");
                            assert_eq!(linked.organization_id, caller);
                        }
                        (Owner::Caller, _) => {
                            assert_error(result.clone(), Code::NotFound, kind.not_found_reason());
                            assert_eq!(snapshot(&pool).await, before);
                        }
                        _ => {
                            assert_error(result.clone(), Code::NotFound, "IDENTITY_NOT_FOUND");
                            assert_eq!(snapshot(&pool).await, before);
                        }
                    }
                    answers.push((channel, refusal));
                }
                // The channel elsewhere vs nowhere: the same answer.
                let elsewhere = answers
                    .iter()
                    .find(|(o, _)| *o == Owner::Other)
                    .and_then(|(_, s)| s.as_ref());
                let nowhere = answers
                    .iter()
                    .find(|(o, _)| *o == Owner::Nobody)
                    .and_then(|(_, s)| s.as_ref());
                let (elsewhere, nowhere) = (elsewhere.unwrap(), nowhere.unwrap());
                assert!(
                    same_answer(elsewhere, nowhere),
                    "{caller} {kind:?} {identity:?}: {elsewhere:?} vs {nowhere:?}"
                );
            }
            // The identity elsewhere vs nowhere, for every channel owner.
            for channel in owners {
                let mut answers = Vec::new();
                for identity in [Owner::Other, Owner::Nobody] {
                    arrange(&pool, kind, caller, identity, channel, channel_id).await;
                    answers.push(
                        kind.assign(&app, caller, HANDLE, &channel_id.to_string())
                            .await
                            .unwrap_err(),
                    );
                    cases += 1;
                }
                assert!(
                    same_answer(&answers[0], &answers[1]),
                    "{caller} {kind:?} channel {channel:?}"
                );
            }
            // Unassign: identity owner, with the channel linked where it lives.
            let mut answers = Vec::new();
            for identity in owners {
                arrange(&pool, kind, caller, identity, identity, channel_id).await;
                if let Some(org) = org_of(identity, caller) {
                    kind.assign(&app, org, HANDLE, &channel_id.to_string())
                        .await
                        .expect("linked by its owner");
                }
                let before = snapshot(&pool).await;
                let result = kind.unassign(&app, caller, HANDLE).await;
                cases += 1;
                if identity == Owner::Caller {
                    result.expect("own identity");
                    assert_eq!(kind.linked_to(&pool, caller, HANDLE).await, None);
                } else {
                    assert_error(result.clone(), Code::NotFound, "IDENTITY_NOT_FOUND");
                    assert_eq!(
                        snapshot(&pool).await,
                        before,
                        "the owner's link is untouched"
                    );
                    answers.push(result.unwrap_err());
                }
            }
            assert!(
                same_answer(&answers[0], &answers[1]),
                "{caller} {kind:?} unassign"
            );
        }
    }
    println!("isolation matrix: {cases} cases, cross-organization reads or writes: 0");
}

// The reads and the inventory: the same matrix for GetIdentity,
// LookupIdentity (every key), ListIdentities, the upserts and the channel
// lists. Records of both organizations share ids, handles, addresses and
// numbers, so that only the organization tells them apart; each stores its
// owner's name in a free-text field, so that an answer shows whose record
// it came from.

const ADDRESS: &str = "Shared@Agents.example";
const NUMBER: &str = "+14155550100";
/// An organization that owns nothing, to compare "elsewhere" with "nowhere".
const EMPTY_ORG: &str = "org_empty";

async fn clear(pool: &PgPool) {
    sqlx::raw_sql("DELETE FROM identities; DELETE FROM mailboxes; DELETE FROM phone_numbers")
        .execute(pool)
        .await
        .unwrap();
}

/// An identity whose display name is its organization's id.
async fn insert_marked_identity(pool: &PgPool, org: &str, handle: &str) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO identities (organization_id, agent_handle, display_name)
         VALUES ($1, $2, $1) RETURNING id",
    )
    .bind(org)
    .bind(handle)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A channel of `org` with `key` (address or number) and `org` as its
/// display name or incoming call action, in `status`.
async fn insert_marked_channel(pool: &PgPool, kind: Kind, org: &str, id: Uuid, status: &str) {
    let sql = match kind {
        Kind::Mailbox => {
            "INSERT INTO mailboxes (organization_id, id, email_address, display_name, status)
             VALUES ($1, $2, $3, $1, $4)"
        }
        Kind::PhoneNumber => {
            "INSERT INTO phone_numbers (organization_id, id, number, incoming_call_action, status)
             VALUES ($1, $2, $3, $1, $4)"
        }
    };
    sqlx::query(sql)
        .bind(org)
        .bind(id)
        .bind(key_of(kind))
        .bind(status)
        .execute(pool)
        .await
        .unwrap();
}

fn key_of(kind: Kind) -> &'static str {
    match kind {
        Kind::Mailbox => ADDRESS,
        Kind::PhoneNumber => NUMBER,
    }
}

/// Links with SQL, as a fixture would.
async fn link(pool: &PgPool, kind: Kind, org: &str, handle: &str, id: Uuid) {
    let sql = match kind {
        Kind::Mailbox => {
            "UPDATE identities SET mailbox_id = $3 WHERE organization_id = $1 AND agent_handle = $2"
        }
        Kind::PhoneNumber => {
            "UPDATE identities SET phone_number_id = $3 WHERE organization_id = $1 AND agent_handle = $2"
        }
    };
    let done = sqlx::query(sql)
        .bind(org)
        .bind(handle)
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1);
}

/// Every row of one organization, to show that another's request left it
/// as it was.
async fn rows_of(pool: &PgPool, org: &str) -> String {
    sqlx::query_scalar(
        "SELECT json_build_object(
            'identities', (SELECT coalesce(json_agg(t ORDER BY t.id), '[]') FROM identities t WHERE t.organization_id = $1),
            'mailboxes', (SELECT coalesce(json_agg(t ORDER BY t.id), '[]') FROM mailboxes t WHERE t.organization_id = $1),
            'phone_numbers', (SELECT coalesce(json_agg(t ORDER BY t.id), '[]') FROM phone_numbers t WHERE t.organization_id = $1)
        )::text",
    )
    .bind(org)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn other_than(caller: &'static str) -> &'static str {
    if caller == ORG { OTHER_ORG } else { ORG }
}

/// Asserts that every refusal in `answers` is the same answer as the first.
fn all_the_same(answers: &[(String, Status)], context: &str) {
    let (first_case, first) = &answers[0];
    for (case, answer) in &answers[1..] {
        assert!(
            same_answer(first, answer),
            "{context}: {first_case} {first:?} vs {case} {answer:?}"
        );
    }
}

#[sqlx::test]
async fn get_identity_reaches_only_the_callers_identity_and_learns_nothing_of_others(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let channel_id = Uuid::new_v4();
    let mut cases = 0;
    for caller in [ORG, OTHER_ORG] {
        let mut refusals = Vec::new();
        for identity in [Owner::Caller, Owner::Other, Owner::Nobody] {
            clear(&pool).await;
            if let Some(org) = org_of(identity, caller) {
                insert_marked_identity(&pool, org, HANDLE).await;
                for kind in [Kind::Mailbox, Kind::PhoneNumber] {
                    insert_marked_channel(&pool, kind, org, channel_id, "active").await;
                    link(&pool, kind, org, HANDLE, channel_id).await;
                }
            }
            let before = snapshot(&pool).await;
            let result = app.get_identity(caller, HANDLE).await;
            cases += 1;
            if identity == Owner::Caller {
                let found = result.expect("own identity");
                assert_eq!(found.organization_id, caller);
                assert_eq!(found.display_name, caller);
                assert_eq!(found.mailbox.unwrap().display_name, caller);
            } else {
                let status = assert_error(result, Code::NotFound, "IDENTITY_NOT_FOUND");
                refusals.push((format!("{identity:?}"), status));
            }
            assert_eq!(snapshot(&pool).await, before);
        }
        // Deleted in the caller's organization: the same answer again.
        clear(&pool).await;
        insert_marked_identity(&pool, caller, HANDLE).await;
        set_identity_status(&pool, caller, HANDLE, "deleted").await;
        refusals.push((
            "deleted".to_owned(),
            app.get_identity(caller, HANDLE).await.unwrap_err(),
        ));
        cases += 1;
        all_the_same(&refusals, caller);

        // The handle in both organizations, with the same channel ids: the
        // caller's record, with the caller's channels.
        clear(&pool).await;
        for org in [ORG, OTHER_ORG] {
            insert_marked_identity(&pool, org, HANDLE).await;
            for kind in [Kind::Mailbox, Kind::PhoneNumber] {
                insert_marked_channel(&pool, kind, org, channel_id, "active").await;
                link(&pool, kind, org, HANDLE, channel_id).await;
            }
        }
        let found = app.get_identity(caller, HANDLE).await.unwrap();
        cases += 1;
        assert_eq!(
            (
                found.organization_id.as_str(),
                found.display_name.as_str(),
                found.mailbox.unwrap().display_name.as_str(),
                found.phone_number.unwrap().incoming_call_action.as_str(),
            ),
            (caller, caller, caller, caller)
        );
    }
    println!("GetIdentity isolation: {cases} cases");
}

/// The lookup keys of `kind`: by id, and by address or number.
fn lookup_keys(kind: Kind, id: Uuid) -> [(&'static str, Channel); 2] {
    match kind {
        Kind::Mailbox => [
            ("mailbox_id", Channel::MailboxId(id.to_string())),
            (
                "email_address",
                Channel::EmailAddress(ADDRESS.to_lowercase()),
            ),
        ],
        Kind::PhoneNumber => [
            ("phone_number_id", Channel::PhoneNumberId(id.to_string())),
            ("phone_number", Channel::PhoneNumber(NUMBER.to_owned())),
        ],
    }
}

fn not_assigned_reason(kind: Kind) -> &'static str {
    match kind {
        Kind::Mailbox => "MAILBOX_NOT_ASSIGNED",
        Kind::PhoneNumber => "PHONE_NUMBER_NOT_ASSIGNED",
    }
}

#[sqlx::test]
async fn lookups_find_only_the_callers_channels_and_learn_nothing_of_others(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let channel_id = Uuid::new_v4();
    let mut cases = 0;
    for caller in [ORG, OTHER_ORG] {
        let other = other_than(caller);
        for kind in [Kind::Mailbox, Kind::PhoneNumber] {
            for (key_name, key) in lookup_keys(kind, channel_id) {
                let context = format!("{caller} {kind:?} by {key_name}");
                // Where the channel lives, and whether its owner linked it.
                let mut refusals = Vec::new();
                for (channel, linked) in [
                    (Owner::Caller, true),
                    (Owner::Caller, false),
                    (Owner::Other, true),
                    (Owner::Other, false),
                    (Owner::Nobody, false),
                ] {
                    clear(&pool).await;
                    if let Some(org) = org_of(channel, caller) {
                        insert_marked_identity(&pool, org, HANDLE).await;
                        insert_marked_channel(&pool, kind, org, channel_id, "active").await;
                        if linked {
                            link(&pool, kind, org, HANDLE, channel_id).await;
                        }
                    }
                    let before = snapshot(&pool).await;
                    let result = app.lookup(caller, key.clone()).await;
                    cases += 1;
                    match (channel, linked) {
                        (Owner::Caller, true) => {
                            let found = result.expect("own linked channel");
                            assert_eq!(found.organization_id, caller, "{context}");
                            assert_eq!(found.display_name, caller, "{context}");
                        }
                        (Owner::Caller, false) => {
                            assert_error(result, Code::NotFound, not_assigned_reason(kind));
                        }
                        _ => {
                            let status =
                                assert_error(result, Code::NotFound, kind.not_found_reason());
                            refusals.push((format!("{channel:?} linked={linked}"), status));
                        }
                    }
                    assert_eq!(snapshot(&pool).await, before, "{context}");
                }
                // Removed in the caller's organization: the same answer again.
                clear(&pool).await;
                insert_marked_channel(&pool, kind, caller, channel_id, kind.gone_status()).await;
                refusals.push((
                    kind.gone_status().to_owned(),
                    app.lookup(caller, key.clone()).await.unwrap_err(),
                ));
                cases += 1;
                all_the_same(&refusals, &context);

                // The same id and key in both organizations: the caller's
                // link decides, never the other's.
                for (caller_links, other_links) in
                    [(false, true), (true, false), (true, true), (false, false)]
                {
                    clear(&pool).await;
                    for (org, links) in [(caller, caller_links), (other, other_links)] {
                        insert_marked_identity(&pool, org, HANDLE).await;
                        insert_marked_channel(&pool, kind, org, channel_id, "active").await;
                        if links {
                            link(&pool, kind, org, HANDLE, channel_id).await;
                        }
                    }
                    let result = app.lookup(caller, key.clone()).await;
                    cases += 1;
                    if caller_links {
                        let found = result.expect("own linked channel");
                        assert_eq!(
                            (found.organization_id.as_str(), found.display_name.as_str()),
                            (caller, caller),
                            "{context}"
                        );
                    } else {
                        assert_error(result, Code::NotFound, not_assigned_reason(kind));
                    }
                }
            }
        }
    }
    println!("LookupIdentity isolation: {cases} cases");
}

/// Every page of `org`'s identities, as (organization, handle, display name).
async fn all_identities(app: &TestApp, org: &str, page_size: i32) -> Vec<(String, String, String)> {
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = app.list_identities(org, page_size, &token).await.unwrap();
        listed.extend(
            page.identities
                .into_iter()
                .map(|i| (i.organization_id, i.agent_handle, i.display_name)),
        );
        if page.next_page_token.is_empty() {
            return listed;
        }
        token = page.next_page_token;
    }
}

#[sqlx::test]
async fn identity_lists_hold_only_the_callers_identities(pool: PgPool) {
    let app = spawn_app(&pool).await;
    // Nothing anywhere: the empty organization's answer to compare with.
    let nowhere = app.list_identities(EMPTY_ORG, 0, "").await.unwrap();
    assert_eq!(nowhere, Default::default());

    let handles = [
        (ORG, ["a-mine", "shared", "zz-mine", "deleted-elsewhere"]),
        (
            OTHER_ORG,
            ["b-theirs", "shared", "y-theirs", "deleted-here"],
        ),
    ];
    for (org, org_handles) in handles {
        for handle in org_handles {
            insert_marked_identity(&pool, org, handle).await;
        }
    }
    // Deleted in one organization, live in the other.
    insert_marked_identity(&pool, ORG, "deleted-here").await;
    set_identity_status(&pool, ORG, "deleted-here", "deleted").await;
    insert_marked_identity(&pool, OTHER_ORG, "deleted-elsewhere").await;
    set_identity_status(&pool, OTHER_ORG, "deleted-elsewhere", "deleted").await;

    let mut cases = 0;
    for (caller, org_handles) in handles {
        let mut expected: Vec<(String, String, String)> = org_handles
            .iter()
            .map(|h| (caller.to_owned(), (*h).to_owned(), caller.to_owned()))
            .collect();
        expected.sort_by(|a, b| a.1.as_bytes().cmp(b.1.as_bytes()));
        for page_size in [1, 2, 3, 0] {
            assert_eq!(
                all_identities(&app, caller, page_size).await,
                expected,
                "{caller}, page size {page_size}"
            );
            cases += 1;
        }
        // A token of the caller's list does not page another's.
        let token = app
            .list_identities(caller, 1, "")
            .await
            .unwrap()
            .next_page_token;
        let status = assert_error(
            app.list_identities(other_than(caller), 1, &token).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(field_violations(&status), ["page_token"]);
        cases += 1;
    }
    // Others' identities everywhere: an organization with none still sees
    // exactly what it saw when nobody had any.
    assert_eq!(
        app.list_identities(EMPTY_ORG, 0, "").await.unwrap(),
        nowhere
    );
    println!("ListIdentities isolation: {cases} cases");
}

/// An upsert's answer without what differs between two creations (the
/// timestamps, an identity's generated id), as (kind, id, key, marker,
/// status).
type Upserted = (String, String, String, String, i32);

async fn upsert_channel(
    app: &TestApp,
    kind: Kind,
    org: &str,
    id: Uuid,
    marker: &str,
    gone: bool,
) -> Result<Upserted, Status> {
    match kind {
        Kind::Mailbox => app
            .upsert_mailbox(
                org,
                proto::UpsertMailboxRequest {
                    mailbox_id: id.to_string(),
                    email_address: ADDRESS.to_owned(),
                    display_name: marker.to_owned(),
                    status: if gone {
                        proto::MailboxStatus::Deleted.into()
                    } else {
                        0
                    },
                },
            )
            .await
            .map(|m| {
                let status = m.status;
                (
                    "mailbox".into(),
                    m.id,
                    m.email_address,
                    m.display_name,
                    status,
                )
            }),
        Kind::PhoneNumber => app
            .upsert_phone_number(
                org,
                proto::UpsertPhoneNumberRequest {
                    phone_number_id: id.to_string(),
                    number: NUMBER.to_owned(),
                    incoming_call_action: marker.to_owned(),
                    status: if gone {
                        proto::PhoneNumberStatus::Released.into()
                    } else {
                        0
                    },
                    ..Default::default()
                },
            )
            .await
            .map(|p| {
                let status = p.status;
                (
                    "phone".into(),
                    p.id,
                    p.number,
                    p.incoming_call_action,
                    status,
                )
            }),
    }
}

async fn upsert_marked_identity(
    app: &TestApp,
    org: &str,
    marker: &str,
    deleted: bool,
) -> Result<Upserted, Status> {
    app.upsert_identity(
        org,
        proto::UpsertIdentityRequest {
            agent_handle: HANDLE.to_owned(),
            display_name: marker.to_owned(),
            status: if deleted {
                proto::IdentityStatus::Deleted.into()
            } else {
                0
            },
        },
    )
    .await
    .map(|i| {
        assert!(i.mailbox.is_none() && i.phone_number.is_none(), "{i:?}");
        let status = i.status;
        (
            "identity".into(),
            i.organization_id,
            i.agent_handle,
            i.display_name,
            status,
        )
    })
}

/// The other organization's copy: the same handle, and the same channel ids,
/// addresses and numbers, all linked, so that a write leaking across would
/// change them or collide with them.
async fn arrange_others_copy(pool: &PgPool, other: &str, channel_id: Uuid) {
    insert_marked_identity(pool, other, HANDLE).await;
    for kind in [Kind::Mailbox, Kind::PhoneNumber] {
        insert_marked_channel(pool, kind, other, channel_id, "active").await;
        link(pool, kind, other, HANDLE, channel_id).await;
    }
}

#[sqlx::test]
async fn upserts_create_and_change_only_the_callers_records(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let channel_id = Uuid::new_v4();
    let mut cases = 0;
    for caller in [ORG, OTHER_ORG] {
        let other = other_than(caller);
        // What the caller is answered when the other organization holds the
        // same handle / id / address / number, and when nobody does: for a
        // creation, an update, a deletion and a restoration, in turn.
        let mut answers: Vec<Vec<Result<Upserted, Status>>> = Vec::new();
        for others_copy in [true, false] {
            clear(&pool).await;
            if others_copy {
                arrange_others_copy(&pool, other, channel_id).await;
            }
            let theirs = rows_of(&pool, other).await;
            let mut steps = Vec::new();
            for (step, marker, gone) in [
                ("create", caller, false),
                ("update", "renamed", false),
                ("remove", "renamed", true),
                ("restore", caller, false),
            ] {
                steps.push(upsert_marked_identity(&app, caller, marker, gone).await);
                for kind in [Kind::Mailbox, Kind::PhoneNumber] {
                    steps.push(upsert_channel(&app, kind, caller, channel_id, marker, gone).await);
                }
                cases += 3;
                assert_eq!(
                    rows_of(&pool, other).await,
                    theirs,
                    "{caller} {step}: the other organization's rows are untouched"
                );
            }
            for step in &steps {
                step.as_ref().expect("the caller's own records");
            }
            // One record of each in the caller's organization.
            let counts: (i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM identities WHERE organization_id = $1),
                        (SELECT count(*) FROM mailboxes WHERE organization_id = $1),
                        (SELECT count(*) FROM phone_numbers WHERE organization_id = $1)",
            )
            .bind(caller)
            .fetch_one(&pool)
            .await
            .unwrap();
            assert_eq!(counts, (1, 1, 1));
            answers.push(steps);
        }
        assert_eq!(
            format!("{:?}", answers[0]),
            format!("{:?}", answers[1]),
            "{caller}: the other organization's copy changes no answer"
        );

        // A refusal for the caller's own reason (its own live record holds
        // the address or number) is the same whether the id exists
        // elsewhere or nowhere.
        for kind in [Kind::Mailbox, Kind::PhoneNumber] {
            let mut refusals = Vec::new();
            for others_copy in [true, false] {
                clear(&pool).await;
                if others_copy {
                    arrange_others_copy(&pool, other, channel_id).await;
                }
                insert_marked_channel(&pool, kind, caller, Uuid::new_v4(), "active").await;
                let before = snapshot(&pool).await;
                let result = upsert_channel(&app, kind, caller, channel_id, caller, false).await;
                cases += 1;
                let reason = match kind {
                    Kind::Mailbox => "EMAIL_ADDRESS_ALREADY_EXISTS",
                    Kind::PhoneNumber => "PHONE_NUMBER_ALREADY_EXISTS",
                };
                let status = assert_error(result, Code::AlreadyExists, reason);
                assert_eq!(snapshot(&pool).await, before);
                refusals.push((format!("others_copy={others_copy}"), status));
            }
            all_the_same(&refusals, &format!("{caller} {kind:?} taken"));
        }
    }
    println!("upsert isolation: {cases} cases");
}

/// Every page of `org`'s channels of `kind`, as (id, key, marker).
async fn all_channels(
    app: &TestApp,
    kind: Kind,
    org: &str,
    unassigned_only: bool,
    page_size: i32,
) -> Vec<(String, String, String)> {
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = list_channels(app, kind, org, unassigned_only, page_size, &token)
            .await
            .unwrap();
        listed.extend(items);
        if next.is_empty() {
            return listed;
        }
        token = next;
    }
}

async fn list_channels(
    app: &TestApp,
    kind: Kind,
    org: &str,
    unassigned_only: bool,
    page_size: i32,
    page_token: &str,
) -> Result<(Vec<(String, String, String)>, String), Status> {
    let mut inventory = app.inventory();
    match kind {
        Kind::Mailbox => inventory
            .list_mailboxes(inventory_authorized(
                proto::ListMailboxesRequest {
                    page_size,
                    page_token: page_token.to_owned(),
                    unassigned_only,
                },
                org,
            ))
            .await
            .map(|response| {
                let response = response.into_inner();
                let items = response
                    .mailboxes
                    .into_iter()
                    .map(|m| (m.id, m.email_address, m.display_name))
                    .collect();
                (items, response.next_page_token)
            }),
        Kind::PhoneNumber => inventory
            .list_phone_numbers(inventory_authorized(
                proto::ListPhoneNumbersRequest {
                    page_size,
                    page_token: page_token.to_owned(),
                    unassigned_only,
                },
                org,
            ))
            .await
            .map(|response| {
                let response = response.into_inner();
                let items = response
                    .phone_numbers
                    .into_iter()
                    .map(|p| (p.id, p.number, p.incoming_call_action))
                    .collect();
                (items, response.next_page_token)
            }),
    }
}

#[sqlx::test]
async fn channel_lists_hold_only_the_callers_channels(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let mut cases = 0;
    for kind in [Kind::Mailbox, Kind::PhoneNumber] {
        clear(&pool).await;
        // Nothing anywhere: the empty organization's answers to compare with.
        let mut nowhere = Vec::new();
        for unassigned_only in [false, true] {
            nowhere.push(
                list_channels(&app, kind, EMPTY_ORG, unassigned_only, 0, "")
                    .await
                    .unwrap(),
            );
        }

        // Ids shared by both organizations, each linked in one of them
        // only; one of each organization's own; one removed in one
        // organization and live in the other. Keys are per organization,
        // so the same one is used in both.
        let [
            linked_in_alpha,
            linked_in_beta,
            removed_in_alpha,
            alpha_own,
            beta_own,
        ] = std::array::from_fn(|_| Uuid::new_v4());
        let sql = match kind {
            Kind::Mailbox => {
                "INSERT INTO mailboxes (organization_id, id, email_address, display_name, status)
                 VALUES ($1, $2, $3, $1, $4)"
            }
            Kind::PhoneNumber => {
                "INSERT INTO phone_numbers (organization_id, id, number, incoming_call_action, status)
                 VALUES ($1, $2, $3, $1, $4)"
            }
        };
        let placed = [
            (ORG, linked_in_alpha, "active"),
            (OTHER_ORG, linked_in_alpha, "active"),
            (ORG, linked_in_beta, "active"),
            (OTHER_ORG, linked_in_beta, "paused"),
            (ORG, removed_in_alpha, kind.gone_status()),
            (OTHER_ORG, removed_in_alpha, "active"),
            (ORG, alpha_own, "active"),
            (OTHER_ORG, beta_own, "active"),
        ];
        for (n, (org, id, status)) in placed.iter().enumerate() {
            let key = match kind {
                Kind::Mailbox => format!("box-{n}@agents.example"),
                Kind::PhoneNumber => format!("+1415555010{n}"),
            };
            sqlx::query(sql)
                .bind(org)
                .bind(id)
                .bind(key)
                .bind(status)
                .execute(&pool)
                .await
                .unwrap();
        }
        for org in [ORG, OTHER_ORG] {
            insert_marked_identity(&pool, org, HANDLE).await;
        }
        link(&pool, kind, ORG, HANDLE, linked_in_alpha).await;
        link(&pool, kind, OTHER_ORG, HANDLE, linked_in_beta).await;

        let sorted = |ids: &[Uuid]| {
            let mut ids = ids.to_vec();
            ids.sort();
            ids.into_iter().map(|id| id.to_string()).collect::<Vec<_>>()
        };
        let expected = [
            (
                ORG,
                false,
                sorted(&[linked_in_alpha, linked_in_beta, alpha_own]),
            ),
            (ORG, true, sorted(&[linked_in_beta, alpha_own])),
            (
                OTHER_ORG,
                false,
                sorted(&[linked_in_alpha, linked_in_beta, removed_in_alpha, beta_own]),
            ),
            (
                OTHER_ORG,
                true,
                sorted(&[linked_in_alpha, removed_in_alpha, beta_own]),
            ),
        ];
        for (caller, unassigned_only, ids) in &expected {
            for page_size in [1, 2, 0] {
                let listed = all_channels(&app, kind, caller, *unassigned_only, page_size).await;
                cases += 1;
                let listed_ids: Vec<String> = listed.iter().map(|c| c.0.clone()).collect();
                assert_eq!(
                    &listed_ids, ids,
                    "{kind:?} of {caller}, unassigned_only {unassigned_only}, page size {page_size}"
                );
                assert!(
                    listed.iter().all(|(_, _, marker)| marker == caller),
                    "{kind:?} of {caller}: another organization's record in {listed:?}"
                );
            }
            // The caller's token does not page the other organization's list.
            let (_, token) = list_channels(&app, kind, caller, *unassigned_only, 1, "")
                .await
                .unwrap();
            assert!(!token.is_empty());
            let status = assert_error(
                list_channels(&app, kind, other_than(caller), *unassigned_only, 1, &token).await,
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
            );
            assert_eq!(field_violations(&status), ["page_token"]);
            cases += 1;
        }
        // An organization with none sees exactly what it saw when nobody
        // had any.
        for (unassigned_only, before) in [false, true].into_iter().zip(&nowhere) {
            let now = list_channels(&app, kind, EMPTY_ORG, unassigned_only, 0, "")
                .await
                .unwrap();
            assert_eq!(&now, before);
            assert!(now.0.is_empty() && now.1.is_empty());
            cases += 1;
        }
    }
    println!("channel list isolation: {cases} cases");
}
