//! Holding events in a socket's queues: an event offered to a queue,
//! a replayed lease settled, the queues of a subscription that goes, and
//! what is left at shutdown.  The decisions are the pure core's
//! (`crate::spool`); this is where they become shared-memory nodes,
//! statistics and log lines.

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;

use super::held;
use super::persist::{self, Record};
use super::shared::{self, DELIVERED, DROPPED, REPLAYED, SPOOLED, add, ring};
use super::status::{self, Change};
use super::vsock::SockRef;
use crate::opensips::event::{Event, EventCopy};
use crate::opensips::log::log;
use crate::opensips::now_ms;
use crate::socket::Policy;
use crate::spool::{Enter, Entry, Finish};
use crate::text::Quoted;

/// `virtual:<text>`, as a log line names a subscription.
pub struct Name<'a>(pub &'a SockRef);

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "virtual:{}", Quoted(self.0.text()))
    }
}

/// What became of an event offered to a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Held: the replay process delivers it.
    Held,
    /// Behind an emptied queue: deliver it live.
    Empty,
    /// Lost, and counted (dropped, or out of memory).
    Lost,
}

/// Offer `event` to queue `qi` of `sock`: its `copy` when it has one
/// already (a chain's), else a new one.
pub fn push(
    sock: &SockRef,
    qi: usize,
    event: &Event<'_>,
    copy: Option<EventCopy>,
    enter: Enter,
) -> Pushed {
    let (Some(sp), Some(queue)) = (shared::spool(), sock.queues().get(qi)) else {
        return Pushed::Lost;
    };
    let node = copy.or_else(|| EventCopy::new(event)).and_then(|c| {
        let record = Record::write(event, sock.text(), qi, c.born_ms());
        held::node(c, record)
    });
    let Some(node) = node else {
        log!(
            ERR,
            "out of shared memory holding event '{}' of '{}': lost",
            Quoted(event.name()),
            Name(sock)
        );
        return Pushed::Lost;
    };
    let p = queue.push(node, enter, &sp.budget, now_ms());
    add(&DROPPED, p.dropped());
    match p.entry {
        Entry::Queued { first } => {
            SPOOLED.add(1);
            if first {
                let (event, up_to) = (Quoted(event.name()), queue.limits().capacity);
                match sock.policy {
                    Policy::Parallel => log!(
                        WARN,
                        "subscriber '{}' of '{}' failed event '{event}': holding events (up to {up_to})",
                        Quoted(sock.token(&sock.subs()[qi])),
                        Name(sock)
                    ),
                    _ => log!(
                        WARN,
                        "every subscriber of '{}' failed event '{event}': holding events (up to {up_to})",
                        Name(sock)
                    ),
                }
                status::record(sock, qi, Change::Holding);
            }
            Pushed::Held
        }
        Entry::Dropped(_) => {
            SPOOLED.add(1);
            Pushed::Lost
        }
        Entry::Empty => Pushed::Empty,
    }
}

/// A lease the replay process gave an asynchronous chain: its report
/// settles it, in whatever process.
pub fn finish(sock: &SockRef, qi: usize, token: u64, delivered: bool) {
    let (Some(sp), Some(queue)) = (shared::spool(), sock.queues().get(qi)) else {
        return;
    };
    match queue.finish(token, delivered, &sp.budget, now_ms()) {
        Finish::Delivered { drained, .. } => {
            REPLAYED.add(1);
            DELIVERED.add(1);
            if drained {
                log_drained(sock, qi);
            }
        }
        Finish::Dropped { .. } => DROPPED.add(1),
        Finish::Retry { .. } | Finish::Stale => {}
    }
    // the next head is due now, or the retry time moved
    ring();
}

pub fn log_drained(sock: &SockRef, qi: usize) {
    log!(
        NOTICE,
        "replayed the held events of '{}'; its queue is empty",
        Name(sock)
    );
    status::record(sock, qi, Change::Drained);
}

/// The subscription goes (unsubscribe, expiry): drop what its queues hold.
pub fn close(sock: &SockRef) {
    let Some(sp) = shared::spool() else { return };
    let now = now_ms();
    let (mut dropped, mut in_flight) = (0u64, false);
    for q in sock.queues() {
        let c = q.close(&sp.budget, now);
        dropped += c.evicted.len() as u64;
        in_flight |= c.in_flight;
        if let Some(r) = q.episodes().take(now) {
            log!(WARN, "'{}': {r}", Name(sock));
        }
    }
    add(&DROPPED, dropped);
    if dropped > 0 || in_flight {
        log!(
            WARN,
            "'{}' unsubscribed with {dropped} held events: dropped{}",
            Name(sock),
            if in_flight {
                "; 1 in flight, dropped or delivered when its attempt ends"
            } else {
                ""
            }
        );
    }
}

/// destroy: what was still held is lost with the server, or kept in
/// restart-persistent memory for the next start.
pub fn shutdown() {
    let Some(sp) = shared::spool() else { return };
    let held = sp.budget.held();
    // what waits for its subscription since the start is kept too
    let kept = persist::get().map_or(0, |p| {
        p.region.kept().saturating_sub(p.waiting.load(Relaxed))
    });
    let lost = held.saturating_sub(kept);
    if kept > 0 {
        log!(
            NOTICE,
            "shutdown: {kept} held events kept for the next start"
        );
    }
    if lost > 0 {
        add(&DROPPED, lost);
        log!(WARN, "shutdown: {lost} held events dropped");
    }
}
