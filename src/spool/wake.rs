//! When the replay process tries a queue next, and how it is woken.
//!
//! The replay process must drain a queue as fast as a subscriber takes its
//! events, but never spin while every subscriber is still down.  A queue is
//! due when both hold:
//!
//! - some subscriber that could take its head is out of its failover
//!   window (the module asks `policy::eligible_at`, and passes the time
//!   in): for a PARALLEL queue its one subscriber, for the other policies
//!   any of the socket's subscribers;
//! - its own retry floor has passed (`retry_at`, set `spool_retry_interval`
//!   after the queue's last failed attempt): with `failover_timeout` 0 no
//!   window ever holds a subscriber back, and the floor alone keeps the
//!   process from retrying in a loop.
//!
//! A queue with an attempt in flight is not due (its report settles it);
//! an operator's retry makes a queue due at once, once.

use std::sync::atomic::{AtomicU32, Ordering};

/// A queue's figures for [`due_at`], from [`super::Queue::due`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Due {
    pub held: u32,
    pub in_flight: bool,
    pub closed: bool,
    pub retry_at_ms: u64,
    /// The operator asked for a retry now.
    pub forced: bool,
}

/// When the queue should be tried next; None when there is nothing to try
/// (empty, closed, or an attempt in flight).
pub fn due_at(d: Due, eligible_at_ms: u64) -> Option<u64> {
    if d.held == 0 || d.in_flight || d.closed {
        return None;
    }
    if d.forced {
        return Some(0);
    }
    Some(eligible_at_ms.max(d.retry_at_ms))
}

/// The earliest of the queues' due times.
pub fn next_wake(dues: impl IntoIterator<Item = Option<u64>>) -> Option<u64> {
    dues.into_iter().flatten().min()
}

/// The longest the replay process sleeps without looking, ms.
pub const IDLE_MS: u64 = 1000;

/// How long the replay process sleeps before it looks again: until the
/// next queue is due, but no longer than `idle_ms`, a safety net against a
/// doorbell missed (and the pace of the episode log and the age sweep).
/// 0 means: work now.
pub fn sleep_ms(now_ms: u64, next: Option<u64>, idle_ms: u64) -> u64 {
    next.map_or(idle_ms, |t| t.saturating_sub(now_ms).min(idle_ms))
}

/// Wakes the replay process early: a queue had its first event (a new
/// outage whose retry floor it must schedule), an operator asked for a
/// retry, a subscription went away.  Never rung on the raise path while
/// queues are empty.
///
/// A counter in one shared word: the FFI layer sleeps on it with a futex
/// (shared, not `FUTEX_PRIVATE`: OpenSIPS's shared memory is one mapping
/// in every process) given the value it last saw, and wakes it after
/// [`Doorbell::ring`].
#[derive(Debug, Default)]
#[repr(C)]
pub struct Doorbell(AtomicU32);

impl Doorbell {
    pub fn ring(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }

    /// The value to sleep on.
    pub fn value(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }

    /// The word itself, for the futex.
    pub fn word(&self) -> &AtomicU32 {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(held: u32, retry_at_ms: u64) -> Due {
        Due {
            held,
            in_flight: false,
            closed: false,
            retry_at_ms,
            forced: false,
        }
    }

    #[test]
    fn due_after_both_the_window_and_the_floor() {
        assert_eq!(due_at(due(3, 500), 900), Some(900));
        assert_eq!(due_at(due(3, 1500), 900), Some(1500));
        assert_eq!(due_at(due(0, 0), 0), None);
        let mut d = due(1, 5000);
        d.in_flight = true;
        assert_eq!(due_at(d, 0), None);
        d.in_flight = false;
        d.closed = true;
        assert_eq!(due_at(d, 0), None);
        d.closed = false;
        d.forced = true;
        assert_eq!(due_at(d, 9000), Some(0));
    }

    #[test]
    fn sleeps_until_the_next_due_within_the_cap() {
        assert_eq!(next_wake([None, Some(50), Some(20)]), Some(20));
        assert_eq!(next_wake([None, None]), None);
        assert_eq!(sleep_ms(10, Some(20), 1000), 10);
        assert_eq!(sleep_ms(30, Some(20), 1000), 0);
        assert_eq!(sleep_ms(0, Some(5000), 1000), 1000);
        assert_eq!(sleep_ms(0, None, 1000), 1000);
    }

    #[test]
    fn the_doorbell_counts_rings() {
        let d = Doorbell::default();
        d.ring();
        d.ring();
        assert_eq!(d.value(), 2);
        assert_eq!(d.word().load(Ordering::Relaxed), 2);
    }
}
