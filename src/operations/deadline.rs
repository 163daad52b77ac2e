//! A request's time budget, and the rule that keeps a deadline answer true.
//!
//! A server that answers `DEADLINE_EXCEEDED` promises that nothing changed.
//! That holds only while no statement of the request can still commit, so the
//! waiter and the database work agree, through a `StatementGate`, on one of
//! two outcomes: either the statement was never sent (the waiter may answer
//! at once), or it was (the waiter must wait for its outcome and report it).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// When to give up on a request, and until when its statement may write.
///
/// The answer goes out a margin before the deadline, so that the caller gets
/// the server's DEADLINE_EXCEEDED (with its details) rather than its own
/// timer's error; the statement stops writing a margin before that (the
/// `ensure_in_time` guard in SQL), so that in the common case it has failed,
/// and is known to have failed, by the time the answer is due.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub answer_by: Instant,
    pub write_by: Instant,
}

impl Budget {
    const MAX_MARGIN: Duration = Duration::from_millis(50);

    pub fn new(now: Instant, timeout: Duration) -> Self {
        let margin = (timeout / 10).min(Self::MAX_MARGIN);
        Self {
            answer_by: now + timeout.saturating_sub(margin),
            write_by: now + timeout.saturating_sub(margin * 2),
        }
    }

    /// The window for this request's database work, with a fresh gate.
    pub fn write_window(&self) -> WriteWindow {
        WriteWindow {
            write_by: self.write_by,
            gate: StatementGate::default(),
        }
    }
}

/// When a request reached the server, put on it by the outermost layer of the
/// service, so that its budget counts from there, as the caller's deadline
/// (and tonic's timeout) does.
#[derive(Clone, Copy, Debug)]
pub struct Arrival(pub Instant);

const NOT_SENT: u8 = 0;
const SENT: u8 = 1;
const ABANDONED: u8 = 2;

/// Decides, once, between "the statement was sent" and "the waiter gave up
/// before it was": whichever side comes first wins, and the other sees it.
#[derive(Clone, Debug, Default)]
pub struct StatementGate(Arc<AtomicU8>);

impl StatementGate {
    /// Called by the database work before it sends a statement: `false`
    /// when the waiter has already answered DEADLINE_EXCEEDED, in which case
    /// nothing may be sent.
    pub fn may_send(&self) -> bool {
        match self
            .0
            .compare_exchange(NOT_SENT, SENT, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(state) => state == SENT,
        }
    }

    /// Whether the waiter has already answered: the work need not even wait
    /// for a connection.
    pub fn is_abandoned(&self) -> bool {
        self.0.load(Ordering::Acquire) == ABANDONED
    }

    /// Called by the waiter when the answer is due: `true` when no statement
    /// was sent (and now none will be), so DEADLINE_EXCEEDED is true.
    pub fn abandon(&self) -> bool {
        match self
            .0
            .compare_exchange(NOT_SENT, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(state) => state == ABANDONED,
        }
    }
}

/// What the database work of one request gets: until when its statement may
/// write, and the gate it must pass before sending one.
#[derive(Clone, Debug)]
pub struct WriteWindow {
    pub write_by: Instant,
    pub gate: StatementGate,
}

impl WriteWindow {
    /// The time a statement has left, as its `ensure_in_time` argument.
    pub fn remaining_seconds(&self) -> f64 {
        self.write_by
            .saturating_duration_since(Instant::now())
            .as_secs_f64()
    }
}

/// Parses a `grpc-timeout` header: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("10n"), Some(Duration::from_nanos(10)));
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for raw in ["", "S", "1", "1s", "123456789S", "-1S", "1.5S", "+1S"] {
            assert_eq!(parse_grpc_timeout(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn the_answer_leaves_before_the_deadline_and_writes_stop_before_the_answer() {
        let now = Instant::now();
        let short = Budget::new(now, Duration::from_millis(300));
        assert_eq!(short.answer_by, now + Duration::from_millis(270));
        assert_eq!(short.write_by, now + Duration::from_millis(240));
        let long = Budget::new(now, Duration::from_secs(5));
        assert_eq!(long.answer_by, now + Duration::from_millis(4950));
        assert_eq!(long.write_by, now + Duration::from_millis(4900));
        let none = Budget::new(now, Duration::ZERO);
        assert_eq!((none.answer_by, none.write_by), (now, now));
    }

    #[test]
    fn a_gate_lets_exactly_one_side_win() {
        let sent_first = StatementGate::default();
        assert!(sent_first.may_send());
        assert!(sent_first.may_send(), "a retry of a sent statement may go");
        assert!(
            !sent_first.abandon(),
            "the waiter must wait for the outcome"
        );

        let abandoned_first = StatementGate::default();
        assert!(abandoned_first.abandon());
        assert!(abandoned_first.abandon());
        assert!(
            !abandoned_first.may_send(),
            "nothing is sent after the answer"
        );
    }

    #[test]
    fn racing_sides_never_both_win() {
        for _ in 0..1000 {
            let gate = StatementGate::default();
            let other = gate.clone();
            let sender = std::thread::spawn(move || other.may_send());
            let abandoned = gate.abandon();
            let sent = sender.join().unwrap();
            assert_ne!(sent, abandoned);
        }
    }
}
