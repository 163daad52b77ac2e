//! A DEADLINE_EXCEEDED from the server is a promise that nothing changed:
//! with client deadlines from 100 µs to 5 ms (most of them shorter than a
//! commit), no request answered that way finds its write in the database.

use std::time::Duration;

use channel_assignment::proto::AssignMailboxRequest;
use futures_util::{StreamExt as _, stream};
use sqlx::PgPool;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::helpers::*;
use crate::raw::{RawConnection, encode};

const REQUESTS: usize = 300;
const CONCURRENCY: usize = 8;

/// Deadlines spread evenly on a log scale from 100 µs to 5 ms.
fn deadline(i: usize) -> Duration {
    let (shortest, longest) = (100.0_f64, 5_000.0_f64);
    let micros = shortest * (longest / shortest).powf(i as f64 / (REQUESTS - 1) as f64);
    Duration::from_micros(micros.round() as u64)
}

#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    server_deadline_exceeded: usize,
    other: Vec<(Code, String)>,
}

#[sqlx::test]
async fn no_deadline_exceeded_answer_has_its_write_in_the_database(pool: PgPool) {
    let app = spawn_app(&pool).await;
    let mut requests = Vec::new();
    for i in 0..REQUESTS {
        let handle = format!("agent-{i}");
        insert_identity(&pool, ORG, &handle).await;
        let mailbox = insert_mailbox(&pool, ORG).await;
        requests.push((handle, mailbox, deadline(i)));
    }

    // A raw HTTP/2 client with no timer of its own: every answer is the
    // server's (tonic's client would end the call itself at the deadline).
    let token = hs256_token(ORG);
    let authorization = format!("Bearer {token}");
    let answers: Vec<_> = stream::iter(requests.iter().cloned())
        .map(|(handle, mailbox, deadline)| {
            let authorization = authorization.clone();
            let address = app.address;
            async move {
                let mut connection = RawConnection::connect(address).await;
                let timeout = format!("{}u", deadline.as_micros());
                let message = encode(&AssignMailboxRequest {
                    agent_handle: handle.clone(),
                    mailbox_id: mailbox.to_string(),
                });
                let answer = connection
                    .unary(
                        "/channels.v1.ChannelAssignment/AssignMailbox",
                        &[
                            ("authorization", authorization.as_str()),
                            ("grpc-timeout", timeout.as_str()),
                        ],
                        &message,
                    )
                    .await;
                (handle, mailbox, answer)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    // Statements the server stopped waiting for end by themselves.
    wait_until_quiet(&pool).await;

    let mut tally = Tally::default();
    let mut broken_promises = Vec::new();
    for (handle, mailbox, answer) in answers {
        let linked = Kind::Mailbox.linked_to(&pool, ORG, &handle).await;
        let status = answer.status;
        match status.code() {
            Code::Ok => {
                tally.ok += 1;
                assert_eq!(linked, Some(mailbox), "an OK answer is in the database");
            }
            _ if status.code() == Code::DeadlineExceeded
                && status
                    .get_details_error_info()
                    .is_some_and(|info| info.reason == "DEADLINE_EXCEEDED") =>
            {
                tally.server_deadline_exceeded += 1;
                if linked.is_some() {
                    broken_promises.push(handle);
                }
            }
            _ => tally
                .other
                .push((status.code(), status.message().to_owned())),
        }
    }
    println!("{tally:?}");
    assert!(
        broken_promises.is_empty(),
        "answered DEADLINE_EXCEEDED, yet written: {broken_promises:?}"
    );
    // Anything else may only be a call the deadline ended without a verdict
    // (tonic's own timeout, when the statement's outcome was still unknown).
    for (code, message) in &tally.other {
        assert!(
            *code == Code::Cancelled && message == "Timeout expired",
            "unexpected answer {code:?}: {message}"
        );
    }
    // 100 µs is less than any round trip: the property was exercised.
    assert!(tally.server_deadline_exceeded > 0, "{tally:?}");
}
