//! E_EVENT_VIRTUAL_STATUS: a subscriber, a spool queue or a HASH key
//! changed state.  Where the change is seen (a worker's raise, a report,
//! the replay process: next to the line that logs it) it is only recorded,
//! in order, into a fixed ring in shared memory, and the replay process is
//! woken; that process raises the events one by one, from no delivery and
//! holding no lock.  Raised where it is seen, a status event would be
//! delivered from inside the delivery that failed, the status event's own
//! for a virtual subscription to it; and changes seen in two processes
//! could be raised out of order.  A change of a subscription of the status
//! event itself is not raised, so that it cannot feed itself.

#![forbid(unsafe_code)]

use std::sync::OnceLock;

use super::shared;
use super::vsock::{self, SockRef};
use crate::opensips::event::{ParamValue, Published};
use crate::opensips::log::log;
use crate::opensips::shm::{self, Tail};
use crate::policy::Transition;
use crate::socket::Policy;
use crate::spool::Report;
use crate::spool::lock::{Mutex, critical};

pub const NAME: &str = "E_EVENT_VIRTUAL_STATUS";
static STATUS: Published = Published::new();

/// Changes that may wait for the replay process; more are not raised.
const SIZE: usize = 64;

#[derive(Clone, Copy)]
pub enum Change {
    Health(Transition),
    Holding,
    Drained,
    Dropped(Report),
    Unkeyed,
}

struct Recorded {
    sock: SockRef,
    sub: Option<usize>,
    change: Change,
    held: u32,
}

/// Filled from the first slot on and emptied whole: in order.
struct Changes(Mutex<[Option<Recorded>; SIZE]>);
const EMPTY: [Option<Recorded>; SIZE] = [const { None }; SIZE];
impl Tail for Changes {}

static CHANGES: OnceLock<&'static Changes> = OnceLock::new();

/// mod_init: the ring, and the event published.
pub fn init() -> Result<(), &'static str> {
    let changes = shm::leak(Changes(Mutex::new(EMPTY)));
    let _ = CHANGES.set(changes.ok_or("out of shared memory for E_EVENT_VIRTUAL_STATUS")?);
    let published = STATUS.publish(NAME.as_bytes()).then_some(());
    published.ok_or("cannot publish E_EVENT_VIRTUAL_STATUS")
}

/// Record a change of `sock`'s subscriber `at` (Health), or of its queue
/// `at`, and wake the replay process.  No allocation, no wait.
pub fn record(sock: &SockRef, at: usize, change: Change) {
    let Some(changes) = CHANGES.get() else { return };
    let parallel = sock.policy == Policy::Parallel;
    let queue = sock.queues().get(if parallel { at } else { 0 });
    let r = Recorded {
        sock: sock.clone(),
        // a PARALLEL socket's queue is its subscriber's
        sub: (parallel || matches!(change, Change::Health(_))).then_some(at),
        change,
        held: queue.map_or(0, |q| q.held()),
    };
    // full: r is dropped, not its socket's last reference (the caller's)
    let full = critical(&changes.0, |ring| {
        let free = ring.iter_mut().find(|s| s.is_none());
        free.map(|s| s.insert(r)).is_none()
    });
    if full {
        log!(WARN, "a change raised no {NAME}: {SIZE} were waiting");
    }
    shared::ring();
}

/// The replay process, each time it wakes: raise what was recorded.
pub fn raise_recorded() {
    let Some(changes) = CHANGES.get() else { return };
    // nothing recorded (most wakes): nothing copied, no walk
    let taken = critical(&changes.0, |r| {
        r[0].is_some().then(|| std::mem::replace(r, EMPTY))
    });
    let Some(ring) = taken else { return };
    let mut live = Vec::new();
    let _ = vsock::walk(None, |event, s, _| live.push((event.to_vec(), s)));
    for r in ring.into_iter().flatten() {
        // a subscription gone meanwhile is not raised, nor one of the
        // status event itself: it could feed itself
        let found = live
            .iter()
            .find(|(e, s)| std::ptr::eq(&**s, &*r.sock) && e != NAME.as_bytes());
        let Some((event, _)) = found else { continue };
        let queue = if r.held > 0 { "holding" } else { "empty" };
        let (old, new, reason) = match r.change {
            Change::Health(Transition::Failing) => ("healthy", "failing", "failure".into()),
            Change::Health(Transition::Recovered) => ("failing", "healthy", "recovery".into()),
            Change::Holding => ("empty", "holding", "holding".into()),
            Change::Drained => ("holding", "empty", "drained".into()),
            Change::Dropped(report) => (queue, queue, report.to_string()),
            Change::Unkeyed => ("keyed", "unkeyed", "unkeyed".into()),
        };
        let socket = [b"virtual:", r.sock.text()].concat();
        let token = r.sub.map_or(&[][..], |i| r.sock.token(&r.sock.subs()[i]));
        let (index, held) = (r.sub.map_or(-1, |i| i as i32), r.held.min(i32::MAX as u32));
        let _ = STATUS.raise(&[
            (b"event", ParamValue::Str(event)),
            (b"socket", ParamValue::Str(&socket)),
            (b"subscriber", ParamValue::Int(index)),
            (b"subscriber_socket", ParamValue::Str(token)),
            (b"old_state", ParamValue::Str(old.as_bytes())),
            (b"new_state", ParamValue::Str(new.as_bytes())),
            (b"reason", ParamValue::Str(reason.as_bytes())),
            (b"held", ParamValue::Int(held as i32)),
        ]);
    }
}
