//! One round of the replay process, over the FFI layer's [`Replayer`].
//!
//! The dedicated module process wakes (at the time the last round
//! returned, or on the [`super::Doorbell`]), gathers the virtual sockets
//! that hold events, and runs [`round`] over their queues.  A round, per
//! queue: drop what is past its maximum age; then, while the queue is due,
//! lease its head and attempt it, up to `batch` events so that one long
//! queue does not starve the others (the round then asks to be run again
//! at once).  An asynchronous attempt ends the queue's turn: its report,
//! in whatever process, finishes the lease.  Last, each queue's drop
//! episode is polled, so that drops are logged from this one process.
//!
//! The round returns when it should run next: never at or before `now`
//! unless a queue is still due (work left), so the process cannot spin
//! while every subscriber is down.

use super::budget::Budget;
use super::episode::{self, Report};
use super::queue::{Fifo, Finish, Held, Lease, Queue};
use super::wake::{due_at, next_wake};

/// Events one queue replays per round before the others get their turn.
pub const BATCH: u32 = 64;

/// How one replayed attempt went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempted {
    /// A subscriber took it.
    Delivered,
    /// Every subscriber it was offered to failed it.
    Failed,
    /// An asynchronous transport accepted it; its report will call
    /// [`Queue::finish`] with the lease's token.
    Pending,
}

/// What a round needs from the FFI layer.
pub trait Replayer<F: Fifo> {
    /// Attempt queue `q`'s leased head: the policy's walk for a FAILOVER,
    /// ROUND-ROBIN or HASH socket, the queue's own subscriber for a
    /// PARALLEL one.  No lock is held.
    fn attempt(&mut self, q: usize, lease: &Lease<<F::Item as Held>::Event>) -> Attempted;
    /// When the first subscriber that could take queue `q`'s head is out
    /// of its failover window ([`crate::policy::eligible_at`]).
    fn eligible_at(&self, q: usize, now_ms: u64) -> u64;
    /// A drop episode of queue `q` to log, once.
    fn episode(&mut self, q: usize, report: Report);
    /// Queue `q` was emptied by a delivery: the outage is over.
    fn drained(&mut self, q: usize);
}

/// What a round did, for the statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub replayed: u64,
    pub dropped: u64,
    /// When the round should run again, if any queue holds events.
    pub next_ms: Option<u64>,
    /// Some queue has drops not yet logged: keep polling (every
    /// [`super::wake::IDLE_MS`]) even when nothing is held any more.
    pub episodes_open: bool,
}

/// Run one round over `queues` at `now_ms`.
pub fn round<F: Fifo, R: Replayer<F>>(
    queues: &[&Queue<F>],
    budget: &Budget,
    r: &mut R,
    now_ms: u64,
    batch: u32,
) -> Tally {
    let mut t = Tally::default();
    let mut more = false;
    for (q, queue) in queues.iter().enumerate() {
        t.dropped += queue.expire(budget, now_ms).len() as u64;
        let mut n = 0;
        while due_at(queue.due(), r.eligible_at(q, now_ms)).is_some_and(|d| d <= now_ms) {
            if n == batch {
                more = true;
                break;
            }
            n += 1;
            let b = queue.begin(budget, now_ms);
            t.dropped += b.expired.len() as u64;
            let Some(lease) = b.lease else { break };
            let ok = match r.attempt(q, &lease) {
                Attempted::Pending => break,
                Attempted::Delivered => true,
                Attempted::Failed => false,
            };
            match queue.finish(lease.token, ok, budget, now_ms) {
                Finish::Delivered { drained, .. } => {
                    t.replayed += 1;
                    if drained {
                        r.drained(q);
                    }
                }
                Finish::Dropped { .. } => t.dropped += 1,
                Finish::Retry { .. } | Finish::Stale => break,
            }
        }
        if let Some(report) = queue
            .episodes()
            .poll(now_ms, episode::QUIET_MS, episode::MAX_MS)
        {
            r.episode(q, report);
        }
        t.episodes_open |= queue.episodes().is_open();
    }
    let next = next_wake(
        queues
            .iter()
            .enumerate()
            .map(|(q, queue)| due_at(queue.due(), r.eligible_at(q, now_ms))),
    );
    t.next_ms = if more { Some(now_ms) } else { next };
    t
}
