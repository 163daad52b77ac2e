//! The isolation matrix: for every RPC, every caller organization, and every
//! owner of the identity and of the channel (the caller's organization, the
//! other one, or nobody), a caller reaches only its own resources, and "it
//! exists elsewhere" is answered exactly like "it does not exist".

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
