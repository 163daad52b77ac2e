//! Change events: one per real link change, recorded with the change,
//! numbered per organization in commit order, listed after a sequence.

use std::collections::HashMap;

use channel_assignment::proto::{
    self, AssignmentAction, AssignmentCause, AssignmentEvent, ChannelKind, IdentityStatus,
    MailboxStatus,
};
use futures_util::future::join_all;
use sqlx::PgPool;
use tonic::Code;

use crate::helpers::*;

async fn list_events(
    app: &TestApp,
    org: &str,
    after_sequence: i64,
    page_size: i32,
) -> Result<proto::ListAssignmentEventsResponse, tonic::Status> {
    app.client
        .clone()
        .list_assignment_events(authorized(
            proto::ListAssignmentEventsRequest {
                after_sequence,
                page_size,
            },
            org,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// Every event of `org` after `after`, following `next_after_sequence`.
async fn all_events(app: &TestApp, org: &str, mut after: i64) -> Vec<AssignmentEvent> {
    let mut events = Vec::new();
    loop {
        let page = list_events(app, org, after, 7).await.unwrap();
        if page.events.is_empty() {
            assert_eq!(page.next_after_sequence, after);
            return events;
        }
        after = page.next_after_sequence;
        assert_eq!(after, page.events.last().unwrap().sequence);
        events.extend(page.events);
    }
}

fn summary(
    event: &AssignmentEvent,
) -> (
    String,
    ChannelKind,
    AssignmentAction,
    String,
    String,
    AssignmentCause,
) {
    (
        event.agent_handle.clone(),
        event.kind(),
        event.action(),
        event.channel_id.clone(),
        event.previous_channel_id.clone(),
        event.cause(),
    )
}

#[sqlx::test]
async fn every_real_change_is_one_event_and_no_op_none(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let first = insert_mailbox(&pool, ORG).await.to_string();
    let second = insert_mailbox(&pool, ORG).await.to_string();
    let number = insert_phone_number(&pool, ORG).await.to_string();
    let token = sign_hs256(
        &serde_json::json!({ "org_id": ORG, "exp": now() + 3600, "sub": "user-42" }),
        SECRET,
    );
    let assign = |mailbox: &str| {
        let mut client = app.client.clone();
        let request = with_bearer(
            proto::AssignMailboxRequest {
                agent_handle: "sales-agent".into(),
                mailbox_id: mailbox.to_owned(),
            },
            &token,
        );
        async move { client.assign_mailbox(request).await }
    };

    assign(&first).await.unwrap();
    assign(&first).await.unwrap(); // idempotent: nothing
    assign(&second).await.unwrap(); // replaces: one event
    app.assign_phone_number(ORG, "sales-agent", &number)
        .await
        .unwrap();
    app.unassign_mailbox(ORG, "sales-agent").await.unwrap();
    app.unassign_mailbox(ORG, "sales-agent").await.unwrap(); // nothing linked: nothing

    let events = all_events(&app, ORG, 0).await;
    let handle = "sales-agent".to_owned();
    assert_eq!(
        events.iter().map(summary).collect::<Vec<_>>(),
        vec![
            (
                handle.clone(),
                ChannelKind::Mailbox,
                AssignmentAction::Assigned,
                first.clone(),
                String::new(),
                AssignmentCause::Requested
            ),
            (
                handle.clone(),
                ChannelKind::Mailbox,
                AssignmentAction::Assigned,
                second.clone(),
                first.clone(),
                AssignmentCause::Requested
            ),
            (
                handle.clone(),
                ChannelKind::PhoneNumber,
                AssignmentAction::Assigned,
                number.clone(),
                String::new(),
                AssignmentCause::Requested
            ),
            (
                handle.clone(),
                ChannelKind::Mailbox,
                AssignmentAction::Unassigned,
                String::new(),
                second.clone(),
                AssignmentCause::Requested
            ),
        ]
    );
    assert_eq!(events[0].actor, "user-42");
    assert_eq!(events[1].actor, "user-42");
    assert_eq!(events[2].actor, "", "a token without sub: no actor");
    assert!(
        events
            .iter()
            .all(|e| e.organization_id == ORG && e.occurred_at.is_some())
    );
    assert!(
        events
            .windows(2)
            .all(|pair| pair[0].sequence < pair[1].sequence)
    );
    // Resuming after any position gives exactly the rest.
    for (i, event) in events.iter().enumerate() {
        let rest = all_events(&app, ORG, event.sequence).await;
        assert_eq!(rest, events[i + 1..].to_vec());
    }
}

#[sqlx::test]
async fn removals_record_their_cause_and_a_deleted_identity_its_mailbox_first(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    insert_identity(&pool, ORG, "support-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await;
    let number = insert_phone_number(&pool, ORG).await.to_string();
    let other_mailbox = insert_mailbox(&pool, ORG).await.to_string();
    app.assign_mailbox(ORG, "sales-agent", &mailbox.to_string())
        .await
        .unwrap();
    app.assign_mailbox(ORG, "support-agent", &other_mailbox)
        .await
        .unwrap();
    app.assign_phone_number(ORG, "support-agent", &number)
        .await
        .unwrap();
    let before = all_events(&app, ORG, 0).await.last().unwrap().sequence;

    let address: String = sqlx::query_scalar("SELECT email_address FROM mailboxes WHERE id = $1")
        .bind(mailbox)
        .fetch_one(&pool)
        .await
        .unwrap();
    app.upsert_mailbox(
        ORG,
        proto::UpsertMailboxRequest {
            mailbox_id: mailbox.to_string(),
            email_address: address,
            display_name: "Inbox".into(),
            status: MailboxStatus::Deleted.into(),
        },
    )
    .await
    .unwrap();
    app.upsert_identity(
        ORG,
        proto::UpsertIdentityRequest {
            agent_handle: "support-agent".into(),
            display_name: "Test support-agent".into(),
            status: IdentityStatus::Deleted.into(),
        },
    )
    .await
    .unwrap();

    let events = all_events(&app, ORG, before).await;
    assert_eq!(
        events.iter().map(summary).collect::<Vec<_>>(),
        vec![
            (
                "sales-agent".into(),
                ChannelKind::Mailbox,
                AssignmentAction::Unassigned,
                String::new(),
                mailbox.to_string(),
                AssignmentCause::ChannelRemoved
            ),
            (
                "support-agent".into(),
                ChannelKind::Mailbox,
                AssignmentAction::Unassigned,
                String::new(),
                other_mailbox,
                AssignmentCause::IdentityDeleted
            ),
            (
                "support-agent".into(),
                ChannelKind::PhoneNumber,
                AssignmentAction::Unassigned,
                String::new(),
                number,
                AssignmentCause::IdentityDeleted
            ),
        ]
    );
}

/// Concurrent writers on overlapping identities while a reader polls from
/// its last position: the reader gets exactly the table's events, once each,
/// in sequence order, and replaying them gives the links in the database.
#[sqlx::test]
async fn a_polling_reader_sees_every_event_once_in_order_under_concurrent_writers(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let handles: Vec<String> = (0..4).map(|i| format!("agent-{i}")).collect();
    for handle in &handles {
        insert_identity(&pool, ORG, handle).await;
    }
    let mut mailboxes = Vec::new();
    for _ in 0..6 {
        mailboxes.push(insert_mailbox(&pool, ORG).await.to_string());
    }
    insert_identity(&pool, OTHER_ORG, "theirs").await;
    let theirs = insert_mailbox(&pool, OTHER_ORG).await.to_string();

    let writers = join_all((0..8).map(|writer| {
        let app = &app;
        let handles = &handles;
        let mailboxes = &mailboxes;
        let theirs = &theirs;
        async move {
            for round in 0..30 {
                let handle = &handles[(writer + round) % handles.len()];
                let result = match (writer * 7 + round * 3) % 4 {
                    0 => app.unassign_mailbox(ORG, handle).await.map(drop),
                    _ => app
                        .assign_mailbox(
                            ORG,
                            handle,
                            &mailboxes[(writer * 5 + round) % mailboxes.len()],
                        )
                        .await
                        .map(drop),
                };
                if let Err(status) = result {
                    assert!(matches!(status.code(), Code::AlreadyExists), "{status:?}");
                }
                if round % 5 == 0 {
                    let _ = app.assign_mailbox(OTHER_ORG, "theirs", theirs).await;
                    let _ = app.unassign_mailbox(OTHER_ORG, "theirs").await;
                }
            }
        }
    }));
    let reader = async {
        let mut seen = Vec::new();
        let mut after = 0;
        for _ in 0..400 {
            let page = list_events(&app, ORG, after, 5).await.unwrap();
            after = page.next_after_sequence;
            seen.extend(page.events);
            tokio::task::yield_now().await;
        }
        (seen, after)
    };
    let (_, (mut seen, after)) = tokio::join!(writers, reader);
    seen.extend(all_events(&app, ORG, after).await);

    let table: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM assignment_events WHERE organization_id = $1 ORDER BY sequence",
    )
    .bind(ORG)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(seen.iter().map(|e| e.sequence).collect::<Vec<_>>(), table);
    assert!(seen.iter().all(|e| e.organization_id == ORG));

    // Replaying each identity's events ends where the database is.
    let mut replayed: HashMap<String, String> = HashMap::new();
    for event in &seen {
        let previous = replayed
            .get(&event.agent_handle)
            .cloned()
            .unwrap_or_default();
        assert_eq!(event.previous_channel_id, previous, "{event:?}");
        replayed.insert(event.agent_handle.clone(), event.channel_id.clone());
    }
    for handle in &handles {
        let linked = Kind::Mailbox
            .linked_to(&pool, ORG, handle)
            .await
            .map(|id| id.to_string())
            .unwrap_or_default();
        assert_eq!(
            replayed.get(handle).cloned().unwrap_or_default(),
            linked,
            "{handle}"
        );
    }
    println!("{} events, read while being written", seen.len());
}

#[sqlx::test]
async fn resuming_before_removed_events_is_events_expired(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    for _ in 0..5 {
        let mailbox = insert_mailbox(&pool, ORG).await.to_string();
        app.assign_mailbox(ORG, "sales-agent", &mailbox)
            .await
            .unwrap();
    }
    let events = all_events(&app, ORG, 0).await;
    let third = events[2].sequence;
    // As retention does: a prefix removed, and the mark moved with it.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN;
         DELETE FROM assignment_events WHERE organization_id = '{ORG}' AND sequence <= {third};
         INSERT INTO event_sequences (organization_id, removed_through) VALUES ('{ORG}', {third})
             ON CONFLICT (organization_id) DO UPDATE SET removed_through = EXCLUDED.removed_through;
         COMMIT;"
    )))
    .execute(&pool)
    .await
    .unwrap();

    for after in [events[0].sequence, events[1].sequence] {
        // assert_error checks http_status 410 too.
        assert_error(
            list_events(&app, ORG, after, 0).await,
            Code::FailedPrecondition,
            "EVENTS_EXPIRED",
        );
    }
    // Up to date, or from the oldest kept: no error.
    assert_eq!(all_events(&app, ORG, third).await, events[3..].to_vec());
    assert_eq!(all_events(&app, ORG, 0).await, events[3..].to_vec());
    let last = events.last().unwrap().sequence;
    assert!(all_events(&app, ORG, last).await.is_empty());

    let status = assert_error(
        list_events(&app, ORG, -1, 0).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(field_violations(&status), ["after_sequence"]);
}

#[sqlx::test]
async fn events_are_the_callers_organizations_only(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, OTHER_ORG, "theirs").await;
    let mailbox = insert_mailbox(&pool, OTHER_ORG).await.to_string();
    app.assign_mailbox(OTHER_ORG, "theirs", &mailbox)
        .await
        .unwrap();
    assert!(all_events(&app, ORG, 0).await.is_empty());
    assert_eq!(all_events(&app, OTHER_ORG, 0).await.len(), 1);
}

async fn watch(
    app: &TestApp,
    org: &str,
    after_sequence: i64,
) -> Result<tonic::Streaming<AssignmentEvent>, tonic::Status> {
    app.client
        .clone()
        .watch_assignment_events(authorized(
            proto::WatchAssignmentEventsRequest { after_sequence },
            org,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn next_event(stream: &mut tonic::Streaming<AssignmentEvent>) -> AssignmentEvent {
    tokio::time::timeout(std::time::Duration::from_secs(5), stream.message())
        .await
        .expect("an event within seconds of its commit")
        .expect("the stream goes on")
        .expect("an event, not the end")
}

#[sqlx::test]
async fn a_watch_sends_the_backlog_then_each_new_event_as_it_commits(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mut mailboxes = Vec::new();
    for _ in 0..3 {
        mailboxes.push(insert_mailbox(&pool, ORG).await.to_string());
    }
    app.assign_mailbox(ORG, "sales-agent", &mailboxes[0])
        .await
        .unwrap();
    app.assign_mailbox(ORG, "sales-agent", &mailboxes[1])
        .await
        .unwrap();
    let stored = all_events(&app, ORG, 0).await;

    let mut from_start = watch(&app, ORG, 0).await.unwrap();
    let mut from_first = watch(&app, ORG, stored[0].sequence).await.unwrap();
    assert_eq!(next_event(&mut from_start).await, stored[0]);
    assert_eq!(next_event(&mut from_start).await, stored[1]);
    assert_eq!(next_event(&mut from_first).await, stored[1]);

    for mailbox in &mailboxes[2..] {
        let committed = std::time::Instant::now();
        app.assign_mailbox(ORG, "sales-agent", mailbox)
            .await
            .unwrap();
        let live = next_event(&mut from_start).await;
        println!("live event after {:?}", committed.elapsed());
        assert_eq!(live.channel_id, *mailbox);
        assert_eq!(next_event(&mut from_first).await, live);
    }
    // Another organization's changes reach neither.
    insert_identity(&pool, OTHER_ORG, "theirs").await;
    let theirs = insert_mailbox(&pool, OTHER_ORG).await.to_string();
    app.assign_mailbox(OTHER_ORG, "theirs", &theirs)
        .await
        .unwrap();
    app.unassign_mailbox(ORG, "sales-agent").await.unwrap();
    let next = next_event(&mut from_start).await;
    assert_eq!(
        (next.organization_id.as_str(), next.action()),
        (ORG, AssignmentAction::Unassigned)
    );
}

#[sqlx::test]
async fn watchers_see_exactly_the_events_in_order_under_concurrent_writers(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let handles: Vec<String> = (0..4).map(|i| format!("agent-{i}")).collect();
    for handle in &handles {
        insert_identity(&pool, ORG, handle).await;
    }
    let mut mailboxes = Vec::new();
    for _ in 0..6 {
        mailboxes.push(insert_mailbox(&pool, ORG).await.to_string());
    }
    let mut watcher = watch(&app, ORG, 0).await.unwrap();
    join_all((0..8).map(|writer| {
        let app = &app;
        let handles = &handles;
        let mailboxes = &mailboxes;
        async move {
            for round in 0..25 {
                let handle = &handles[(writer + round) % handles.len()];
                let _ = if round % 4 == 0 {
                    app.unassign_mailbox(ORG, handle).await.map(drop)
                } else {
                    app.assign_mailbox(
                        ORG,
                        handle,
                        &mailboxes[(writer * 5 + round) % mailboxes.len()],
                    )
                    .await
                    .map(drop)
                };
            }
        }
    }))
    .await;
    let table: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM assignment_events WHERE organization_id = $1 ORDER BY sequence",
    )
    .bind(ORG)
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut watched = Vec::new();
    while watched.len() < table.len() {
        watched.push(next_event(&mut watcher).await.sequence);
    }
    assert_eq!(watched, table);
    println!("{} events watched while written", watched.len());
}

#[sqlx::test]
async fn a_drain_ends_watches_with_unavailable_and_watchers_share_one_connection(pool: PgPool) {
    let mut app = spawn_app(&pool).await;
    let mut watchers = Vec::new();
    for _ in 0..50 {
        watchers.push(watch(&app, ORG, 0).await.unwrap());
    }
    // Fifty idle watchers hold no pooled connection: the service's sessions
    // are the pool's (at most 10) and the one listener.
    let sessions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'channel-assignment'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(sessions <= 11, "{sessions} sessions for 50 watchers");
    let scraped = crate::metrics::scrape(app.metrics_addr).await;
    assert!(
        scraped.contains("channel_assignment_events_watchers 50"),
        "{scraped}"
    );

    app.begin_shutdown();
    for mut watcher in watchers {
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), watcher.message())
            .await
            .expect("the drain ends the watch");
        let status = ended.expect_err("ended with a status");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
}

#[sqlx::test]
async fn a_watch_from_an_invalid_or_expired_position_is_refused(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    for _ in 0..3 {
        let mailbox = insert_mailbox(&pool, ORG).await.to_string();
        app.assign_mailbox(ORG, "sales-agent", &mailbox)
            .await
            .unwrap();
    }
    let events = all_events(&app, ORG, 0).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN;
         DELETE FROM assignment_events WHERE organization_id = '{ORG}' AND sequence <= {};
         INSERT INTO event_sequences (organization_id, removed_through) VALUES ('{ORG}', {})
             ON CONFLICT (organization_id) DO UPDATE SET removed_through = EXCLUDED.removed_through;
         COMMIT;",
        events[1].sequence, events[1].sequence
    )))
    .execute(&pool)
    .await
    .unwrap();
    assert_error(
        watch(&app, ORG, events[0].sequence).await,
        Code::FailedPrecondition,
        "EVENTS_EXPIRED",
    );
    let status = assert_error(
        watch(&app, ORG, -5).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(field_violations(&status), ["after_sequence"]);
    let mut from_oldest = watch(&app, ORG, 0).await.unwrap();
    assert_eq!(next_event(&mut from_oldest).await, events[2]);
}

/// Retention removes whole prefixes of each organization's events, moves the
/// mark, and so makes resuming before them EVENTS_EXPIRED, never a gap; a
/// reader that is up to date is never refused.
#[sqlx::test]
async fn retention_removes_old_prefixes_and_resuming_before_them_is_expired(pool: PgPool) {
    let app = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    insert_identity(&pool, OTHER_ORG, "theirs").await;
    // Taking turns, so that each organization's numbers have gaps: the
    // mark retention leaves must be a removed event's number.
    for _ in 0..6 {
        for org in [ORG, OTHER_ORG] {
            let handle = if org == ORG { "sales-agent" } else { "theirs" };
            let mailbox = insert_mailbox(&pool, org).await.to_string();
            app.assign_mailbox(org, handle, &mailbox).await.unwrap();
        }
    }
    let ours = all_events(&app, ORG, 0).await;
    let theirs = all_events(&app, OTHER_ORG, 0).await;
    assert!(
        ours.windows(2)
            .all(|pair| pair[1].sequence > pair[0].sequence + 1),
        "the organizations' numbers interleave"
    );
    // Our first three events are two hours old, and so is our fifth: a
    // later-numbered event can be older (its transaction began earlier).
    for sequence in [
        ours[0].sequence,
        ours[1].sequence,
        ours[2].sequence,
        ours[4].sequence,
    ] {
        sqlx::query(
            "UPDATE assignment_events SET occurred_at = now() - interval '2 hours'
             WHERE organization_id = $1 AND sequence = $2",
        )
        .bind(ORG)
        .bind(sequence)
        .execute(&pool)
        .await
        .unwrap();
    }
    let ours = all_events(&app, ORG, 0).await;

    let store = channel_assignment::store::Store::new(
        database_for(
            &pool,
            &test_settings(channel_assignment::config::AuthSettings::hs256(SECRET)),
        ),
        channel_assignment::metrics::Metrics::new(1),
    );
    let removed = store
        .prune_events(std::time::Duration::from_secs(3600))
        .await
        .unwrap();
    // The prefix 1-3 only: the fifth stays while the fourth (recent) does.
    assert_eq!(removed, 3);
    assert_eq!(all_events(&app, ORG, 0).await, ours[3..].to_vec());
    assert_eq!(
        all_events(&app, OTHER_ORG, 0).await,
        theirs,
        "another organization's kept"
    );
    for after in [ours[0].sequence, ours[1].sequence] {
        assert_error(
            list_events(&app, ORG, after, 0).await,
            Code::FailedPrecondition,
            "EVENTS_EXPIRED",
        );
    }
    assert_eq!(
        all_events(&app, ORG, ours[2].sequence).await,
        ours[3..].to_vec()
    );
    let last = ours.last().unwrap().sequence;
    assert!(
        all_events(&app, ORG, last).await.is_empty(),
        "up to date: never expired"
    );
    assert_eq!(
        store
            .prune_events(std::time::Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
}

#[sqlx::test]
async fn a_watcher_on_one_replica_sees_another_replicas_writes_within_a_second(pool: PgPool) {
    let writer = spawn_app(&pool).await;
    let reader = spawn_app(&pool).await;
    insert_identity(&pool, ORG, "sales-agent").await;
    let mut mailboxes = Vec::new();
    for _ in 0..5 {
        mailboxes.push(insert_mailbox(&pool, ORG).await.to_string());
    }
    let mut watcher = watch(&reader, ORG, 0).await.unwrap();
    for mailbox in &mailboxes {
        let committed = std::time::Instant::now();
        writer
            .assign_mailbox(ORG, "sales-agent", mailbox)
            .await
            .unwrap();
        let event = tokio::time::timeout(std::time::Duration::from_secs(1), watcher.message())
            .await
            .expect("the other replica's event within a second of its commit")
            .unwrap()
            .unwrap();
        assert_eq!(event.channel_id, *mailbox);
        println!("another replica's event after {:?}", committed.elapsed());
    }
}

/// The stored causes are a closed set: the trigger, the events' only writer,
/// refuses a `channels.cause` outside it as a CHECK constraint would
/// (23514), and the link change that would have been recorded with it is
/// refused too; kinds and actions are literals of the trigger.
#[sqlx::test]
async fn a_change_with_a_cause_outside_the_closed_set_is_refused_and_nothing_is_stored(
    pool: PgPool,
) {
    let identity = insert_identity(&pool, ORG, "sales-agent").await;
    let mailbox = insert_mailbox(&pool, ORG).await;
    for cause in ["because", "identity_deleted", "REQUESTED"] {
        let mut transaction = pool.begin().await.unwrap();
        sqlx::query("SELECT set_config('channels.cause', $1, true)")
            .bind(cause)
            .execute(&mut *transaction)
            .await
            .unwrap();
        let refused = sqlx::query("UPDATE identities SET mailbox_id = $1 WHERE id = $2")
            .bind(mailbox)
            .bind(identity)
            .execute(&mut *transaction)
            .await
            .expect_err("a change with a cause outside the set was made");
        let code = refused
            .as_database_error()
            .and_then(|error| error.code())
            .map(|code| code.into_owned());
        assert_eq!(code.as_deref(), Some("23514"), "{cause}: {refused}");
    }
    let (events, numbered): (i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM assignment_events),
                (SELECT last_value FROM pg_sequences WHERE sequencename = 'assignment_event_numbers')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (events, numbered),
        (0, None),
        "no event stored and no number taken"
    );
    let linked: Option<uuid::Uuid> =
        sqlx::query_scalar("SELECT mailbox_id FROM identities WHERE id = $1")
            .bind(identity)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(linked, None, "the link change refused with its event");
}

/// Links one identity to one mailbox in `transaction`, waiting as long as
/// the trigger's organization lock makes it wait.
async fn link(
    mut transaction: sqlx::Transaction<'static, sqlx::Postgres>,
    identity: uuid::Uuid,
    mailbox: uuid::Uuid,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    sqlx::query("UPDATE identities SET mailbox_id = $1 WHERE id = $2")
        .bind(mailbox)
        .bind(identity)
        .execute(&mut *transaction)
        .await
        .unwrap();
    transaction
}

/// Waits until the backend `pid` waits for a lock, so that the test knows
/// the second writer is held by the first rather than merely slow.
async fn until_waiting_for_a_lock(pool: &PgPool, pid: i32) {
    for _ in 0..1000 {
        let waiting: Option<String> =
            sqlx::query_scalar("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1")
                .bind(pid)
                .fetch_one(pool)
                .await
                .unwrap();
        if waiting.as_deref() == Some("Lock") {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the second writer never waited for the first");
}

/// The trigger numbers a change under its organization's lock, held until
/// the transaction ends: a second writer of the organization waits for the
/// first to commit or roll back, and only then takes its number, so its
/// number is above the first's (commit order). A rolled-back change uses
/// its number up: the numbers need not be contiguous.
#[sqlx::test]
async fn a_writer_numbers_its_event_after_the_writer_before_it_ends(pool: PgPool) {
    let first = insert_identity(&pool, ORG, "first").await;
    let second = insert_identity(&pool, ORG, "second").await;
    let mailboxes = [
        insert_mailbox(&pool, ORG).await,
        insert_mailbox(&pool, ORG).await,
        insert_mailbox(&pool, ORG).await,
        insert_mailbox(&pool, ORG).await,
    ];
    // Another organization's writer is not held by the first: it takes a
    // number while the first's transaction is open.
    let elsewhere = insert_identity(&pool, "org_elsewhere", "elsewhere").await;
    let elsewhere_mailbox = insert_mailbox(&pool, "org_elsewhere").await;
    let mut first_numbers = Vec::new();
    let mut elsewhere_number = 0;
    // The first writer commits in the one round and rolls back in the other.
    for (round, first_commits) in [(0, true), (1, false)] {
        let mut first_writer = link(pool.begin().await.unwrap(), first, mailboxes[round * 2]).await;
        first_numbers.push(
            sqlx::query_scalar::<_, i64>("SELECT currval('assignment_event_numbers')")
                .fetch_one(&mut *first_writer)
                .await
                .unwrap(),
        );
        if round == 0 {
            let mut other = link(pool.begin().await.unwrap(), elsewhere, elsewhere_mailbox).await;
            elsewhere_number = sqlx::query_scalar("SELECT currval('assignment_event_numbers')")
                .fetch_one(&mut *other)
                .await
                .unwrap();
            other.commit().await.unwrap();
        }
        let mut second_writer = pool.begin().await.unwrap();
        let second_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *second_writer)
            .await
            .unwrap();
        let second_link = tokio::spawn(link(second_writer, second, mailboxes[round * 2 + 1]));
        until_waiting_for_a_lock(&pool, second_pid).await;
        if first_commits {
            first_writer.commit().await.unwrap();
        } else {
            first_writer.rollback().await.unwrap();
        }
        second_link.await.unwrap().commit().await.unwrap();
    }
    let numbered: Vec<(i64, uuid::Uuid, uuid::Uuid)> = sqlx::query_as(
        "SELECT sequence, identity_id, channel_id FROM assignment_events
         WHERE organization_id = $1 ORDER BY sequence",
    )
    .bind(ORG)
    .fetch_all(&pool)
    .await
    .unwrap();
    let (sequences, links): (Vec<i64>, Vec<(uuid::Uuid, uuid::Uuid)>) = numbered
        .into_iter()
        .map(|(sequence, identity, channel)| (sequence, (identity, channel)))
        .unzip();
    assert_eq!(
        links,
        vec![
            (first, mailboxes[0]),
            (second, mailboxes[1]),
            (second, mailboxes[3]),
        ],
        "the rolled-back change recorded nothing"
    );
    assert_eq!(sequences[0], first_numbers[0]);
    assert!(
        elsewhere_number > sequences[0] && elsewhere_number < sequences[1],
        "the other organization numbered while the first writer was open: {elsewhere_number} \
         between {sequences:?}"
    );
    assert!(
        sequences[1] < first_numbers[1] && first_numbers[1] < sequences[2],
        "the second writer numbered after the rolled-back first ({}): {sequences:?}",
        first_numbers[1]
    );
}

/// A replica announces what it wrote to the others in batches at most
/// every 10 ms however fast it writes: a stream of writes of one
/// organization reaches another replica's listener as a bounded number of
/// notifications (one per batch), and the last write is announced too.
#[sqlx::test]
async fn announcements_to_other_replicas_are_batched_at_most_every_10_ms(pool: PgPool) {
    use channel_assignment::events::hub::{CHANNEL, EventHub};
    let mut other_replica = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    other_replica.listen(CHANNEL).await.unwrap();
    let (hub, listener) = EventHub::start((*pool.connect_options()).clone());
    let started = std::time::Instant::now();
    let mut writes = 0;
    while started.elapsed() < std::time::Duration::from_millis(300) {
        hub.written(ORG);
        writes += 1;
        tokio::task::yield_now().await;
    }
    let writing_ms = started.elapsed().as_millis();
    // The last write, of another organization, must not wait for a next one.
    hub.written(OTHER_ORG);
    let mut announced = 0;
    let mut last_write_announced = 0;
    // The last batch is at most 10 ms behind; a second's quiet ends it.
    while let Ok(notification) =
        tokio::time::timeout(std::time::Duration::from_secs(1), other_replica.recv()).await
    {
        match notification.unwrap().payload() {
            ORG => announced += 1,
            OTHER_ORG => last_write_announced += 1,
            other => panic!("announced {other}, which nobody wrote"),
        }
    }
    listener.abort();
    println!("{writes} writes in {writing_ms} ms announced in {announced} batches");
    assert_eq!(last_write_announced, 1, "the last write announced, once");
    assert!(announced >= 1, "the writes were announced");
    // A batch at the start, one per 10 ms, and one after the last write.
    assert!(
        announced <= writing_ms / 10 + 2,
        "{announced} batches in {writing_ms} ms for {writes} writes"
    );
}

/// Events numbered by the counters of migration 20261207000003 stay as they
/// were when migration 20261207000004 moves the numbering to one sequence:
/// every later event of an organization is numbered above its last one (a
/// reader resuming after it misses nothing), and the events-written count
/// goes on from the counters' total.
#[sqlx::test(migrations = false)]
async fn events_numbered_by_the_counters_stay_and_later_ones_number_above_them(pool: PgPool) {
    use channel_assignment::MIGRATOR;
    MIGRATOR
        .run_to(20261207000003, &pool)
        .await
        .expect("the counter scheme");
    let ours = insert_identity(&pool, ORG, "sales-agent").await;
    let theirs = insert_identity(&pool, OTHER_ORG, "theirs").await;
    for (identity, org, changes) in [(ours, ORG, 3), (theirs, OTHER_ORG, 1)] {
        for _ in 0..changes {
            let mailbox = insert_mailbox(&pool, org).await;
            sqlx::query("UPDATE identities SET mailbox_id = $1 WHERE id = $2")
                .bind(mailbox)
                .bind(identity)
                .execute(&pool)
                .await
                .unwrap();
        }
    }
    let counted: Vec<(String, i64)> = sqlx::query_as(
        "SELECT organization_id, sequence FROM assignment_events ORDER BY organization_id, sequence",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        counted,
        [(ORG, 1), (ORG, 2), (ORG, 3), (OTHER_ORG, 1)].map(|(org, n)| (org.to_owned(), n)),
        "the counters numbered from 1"
    );
    MIGRATOR.run(&pool).await.expect("the sequence scheme");

    let app = spawn_app(&pool).await;
    for (org, handle) in [(ORG, "sales-agent"), (OTHER_ORG, "theirs")] {
        let mailbox = insert_mailbox(&pool, org).await.to_string();
        app.assign_mailbox(org, handle, &mailbox).await.unwrap();
    }
    let ours = all_events(&app, ORG, 0).await;
    assert_eq!(
        ours.iter()
            .map(|event| event.sequence)
            .take(3)
            .collect::<Vec<_>>(),
        [1, 2, 3],
        "the old events as they were"
    );
    assert_eq!(ours.len(), 4);
    assert!(ours[3].sequence > 3, "numbered above the counter's last");
    assert_eq!(all_events(&app, ORG, 3).await, ours[3..].to_vec());
    let theirs = all_events(&app, OTHER_ORG, 1).await;
    assert_eq!(theirs.len(), 1, "resuming after the counter's last");
    assert!(theirs[0].sequence > ours[3].sequence);

    let store = channel_assignment::store::Store::new(
        database_for(
            &pool,
            &test_settings(channel_assignment::config::AuthSettings::hs256(SECRET)),
        ),
        channel_assignment::metrics::Metrics::new(1),
    );
    assert_eq!(
        store.events_written().await.unwrap(),
        6,
        "4 counted, 2 numbered"
    );
    app.stop().await;
}
