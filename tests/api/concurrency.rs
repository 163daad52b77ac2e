//! Concurrent requests: the database decides, exactly one winner, the
//! invariants hold afterwards, and nothing answers INTERNAL.

use futures_util::future::join_all;
use sqlx::PgPool;
use tonic::Code;
use uuid::Uuid;

use crate::for_each_kind;
use crate::helpers::*;

const CONTENDERS: usize = 24;

for_each_kind!(
    many_identities_claiming_one_channel_leave_exactly_one_winner,
    many_channels_assigned_to_one_identity_leave_exactly_one_linked,
    a_storm_of_assigns_and_unassigns_keeps_every_invariant,
);

async fn many_identities_claiming_one_channel_leave_exactly_one_winner(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    let channel = kind.insert(&pool, ORG).await;
    let handles: Vec<String> = (0..CONTENDERS).map(|i| format!("agent-{i}")).collect();
    for handle in &handles {
        insert_identity(&pool, ORG, handle).await;
    }

    let channel_id = channel.to_string();
    for round in 0..3 {
        let results = join_all(
            handles
                .iter()
                .map(|handle| kind.assign(&app, ORG, handle, &channel_id)),
        )
        .await;

        let winners: Vec<&String> = handles
            .iter()
            .zip(&results)
            .filter_map(|(handle, result)| result.is_ok().then_some(handle))
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one winner, got {winners:?}"
        );
        for result in results.into_iter().filter(Result::is_err) {
            assert_error(result, Code::AlreadyExists, kind.already_assigned_reason());
        }
        assert_eq!(kind.holders(&pool, channel).await, 1);
        assert_eq!(kind.linked_to(&pool, ORG, winners[0]).await, Some(channel));

        // Free it for the next round.
        kind.unassign(&app, ORG, winners[0])
            .await
            .expect("unlinked");
    }
}

async fn many_channels_assigned_to_one_identity_leave_exactly_one_linked(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "busy-agent").await;
    let mut channels = Vec::new();
    for _ in 0..CONTENDERS {
        channels.push(kind.insert(&pool, ORG).await);
    }

    let channel_ids: Vec<String> = channels.iter().map(Uuid::to_string).collect();
    let results = join_all(
        channel_ids
            .iter()
            .map(|channel| kind.assign(&app, ORG, "busy-agent", channel)),
    )
    .await;

    // Each request replaced the previous channel: all succeed.
    for result in &results {
        assert!(result.is_ok(), "{result:?}");
    }
    let linked = kind
        .linked_to(&pool, ORG, "busy-agent")
        .await
        .expect("one is linked");
    assert!(channels.contains(&linked));
    let mut total_holders = 0;
    for channel in &channels {
        total_holders += kind.holders(&pool, *channel).await;
    }
    assert_eq!(total_holders, 1, "the others are all free again");
}

async fn a_storm_of_assigns_and_unassigns_keeps_every_invariant(kind: Kind, pool: PgPool) {
    let app = spawn_app(&pool).await;
    let handles = ["a-agent", "b-agent", "c-agent", "d-agent"];
    for handle in handles {
        insert_identity(&pool, ORG, handle).await;
        insert_identity(&pool, OTHER_ORG, handle).await;
    }
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(kind.insert(&pool, ORG).await);
    }
    let foreign = kind.insert(&pool, OTHER_ORG).await;

    let app = &app;
    for _round in 0..4 {
        let requests = (0..48).map(|_| {
            // Random picks from a fresh UUID's bytes: no RNG crate needed.
            let dice = Uuid::new_v4().into_bytes();
            let handle = handles[usize::from(dice[0]) % handles.len()];
            let action = dice[1] % 8;
            let channel = match action {
                0 => foreign,
                _ => channels[usize::from(dice[2]) % channels.len()],
            };
            async move {
                if action >= 6 {
                    kind.unassign(app, ORG, handle).await.map(drop)
                } else {
                    kind.assign(app, ORG, handle, &channel.to_string())
                        .await
                        .map(drop)
                }
            }
        });
        for result in join_all(requests).await {
            if let Err(status) = result {
                assert!(
                    matches!(status.code(), Code::AlreadyExists | Code::NotFound),
                    "only refusals the contract names: {status:?}"
                );
            }
        }

        let broken: Vec<(String, String)> = sqlx::query_as(
            "SELECT 'channel on two identities', c::text FROM (
                 SELECT mailbox_id AS c FROM identities WHERE mailbox_id IS NOT NULL
                 GROUP BY mailbox_id HAVING count(*) > 1
                 UNION ALL
                 SELECT phone_number_id FROM identities WHERE phone_number_id IS NOT NULL
                 GROUP BY phone_number_id HAVING count(*) > 1) AS doubled
             UNION ALL
             SELECT 'cross-organization link', i.id::text FROM identities i
             LEFT JOIN mailboxes m ON m.id = i.mailbox_id
             LEFT JOIN phone_numbers p ON p.id = i.phone_number_id
             WHERE (i.mailbox_id IS NOT NULL AND m.organization_id IS DISTINCT FROM i.organization_id)
                OR (i.phone_number_id IS NOT NULL AND p.organization_id IS DISTINCT FROM i.organization_id)
             UNION ALL
             SELECT 'other organization touched', i.id::text FROM identities i
             WHERE i.organization_id = $1 AND (i.mailbox_id IS NOT NULL OR i.phone_number_id IS NOT NULL)",
        )
        .bind(OTHER_ORG)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(broken.is_empty(), "{broken:?}");
        assert_eq!(kind.holders(&pool, foreign).await, 0);
    }
}
