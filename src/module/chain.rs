//! Events waiting for an asynchronous transport's report (sub-sockets
//! flagged `EVI_ASYNC_STATUS`), in shared memory, since the report may come
//! in another process.  Each holds a reference on the virtual socket.

#![forbid(unsafe_code)]

use super::exports;
use super::raise::CoreDriver;
use super::spool;
use super::vsock::SockRef;
use crate::opensips::event::{DummyMsg, Event, EventCopy, Msg};
use crate::opensips::now_ms;
use crate::opensips::shm::{ShmRc, Tail};
use crate::opensips::transport::Report;
use crate::policy::{self, Attempt, Progress, Walk};
use crate::spool::Enter;
use crate::spool::replay::Attempted;

/// A FAILOVER or ROUND-ROBIN event: the walk to resume when subscriber
/// `current` reports, and a copy of the event to offer on.
pub struct Chain {
    sock: SockRef,
    event: EventCopy,
    current: usize,
    walk: Walk,
    /// A replay's lease (queue, token), settled when the chain ends.
    lease: Option<(usize, u64)>,
}

/// A PARALLEL subscriber's attempt: its report only updates the
/// subscriber's health and counters.
pub struct Probe {
    sock: SockRef,
    index: usize,
    /// With a spool: the event, held for the subscriber if it fails it.
    held: Option<EventCopy>,
    /// A replay of the subscriber's held head: the lease's token.
    lease: Option<u64>,
}

/// An asynchronous attempt in a FAILOVER or ROUND-ROBIN walk: the chain,
/// positioned after this attempt, goes with the event; the transport's
/// report resumes it, in whatever process.
pub fn chain(driver: &mut CoreDriver<'_>, i: usize, walk: &Walk) -> Attempt {
    let Some(event) = driver.copy() else {
        return driver.out_of_memory(i);
    };
    let chain = Chain {
        sock: driver.sock.clone(),
        event,
        current: i,
        walk: *walk,
        lease: driver.lease,
    };
    let Some(chain) = ShmRc::single(chain) else {
        return driver.out_of_memory(i);
    };
    // the transport gets the copy, which lives as long as the chain
    let Some(event) = driver.copied_event() else {
        return Attempt::Failed;
    };
    match driver.sock.subs()[i].sock.raise_reported(&event, chain) {
        // the report may already be running elsewhere: hands off
        Ok(()) => Attempt::Pending,
        // refused at once: no report will come, and the chain is gone
        Err(rc) => driver.failed(i, rc),
    }
}

/// An asynchronous attempt in a PARALLEL fan-out.
pub fn probe(driver: &mut CoreDriver<'_>, i: usize) -> Attempt {
    let spooled = !driver.sock.queues().is_empty();
    let held = if spooled { driver.copy() } else { None };
    let probe = Probe {
        sock: driver.sock.clone(),
        index: i,
        held,
        lease: None,
    };
    let Some(probe) = ShmRc::single(probe) else {
        return driver.out_of_memory(i);
    };
    let Some(event) = driver.event() else {
        return Attempt::Failed;
    };
    match driver.sock.subs()[i].sock.raise_reported(&event, probe) {
        Ok(()) => Attempt::Pending,
        Err(rc) => {
            if spooled {
                spool::push(driver.sock, i, &event, Enter::Failed);
            }
            driver.failed(i, rc)
        }
    }
}

/// The replay of PARALLEL subscriber `i`'s held head on an asynchronous
/// transport: its report settles the lease.
pub fn replay_probe(sock: &SockRef, i: usize, event: &Event<'_>, token: u64) -> Attempted {
    let probe = Probe {
        sock: sock.clone(),
        index: i,
        held: None,
        lease: Some(token),
    };
    let Some(probe) = ShmRc::single(probe) else {
        return Attempted::Failed;
    };
    match sock.subs()[i].sock.raise_reported(event, probe) {
        Ok(()) => Attempted::Pending,
        Err(_) => Attempted::Failed,
    }
}

impl Tail for Chain {}
impl Tail for Probe {}

impl Report for Chain {
    /// Settle the event, or offer it on.
    fn report(chain: ShmRc<Chain>, ok: bool) {
        let (sock, mut walk) = (&chain.sock, chain.walk);
        // the report is not part of any SIP message's processing:
        // transports raised from here get the core's dummy message
        let dummy = DummyMsg::new();
        let mut driver = CoreDriver::new(sock, None, Some(chain.event.clone()), dummy.msg());
        driver.lease = chain.lease;
        let (rules, now, rot) = (exports::rules(), now_ms(), &sock.rotation);
        match walk.resume(chain.current, ok, rot, sock.subs(), rules, now, &mut driver) {
            Progress::Pending => {}
            Progress::Done(out) => {
                driver.settle(out);
            }
        }
    }
}

impl Report for Probe {
    fn report(probe: ShmRc<Probe>, ok: bool) {
        let (sock, i) = (&probe.sock, probe.index);
        let mut driver = CoreDriver::new(sock, None, None, Msg::none());
        policy::record(&sock.rotation, sock.subs(), i, ok, now_ms(), &mut driver);
        if let Some(token) = probe.lease {
            spool::finish(&probe.sock, probe.index, token, ok);
        } else if !ok && let Some(copy) = &probe.held {
            // held for this subscriber (events it got live meanwhile are
            // not held back: see the guide, 11.3)
            let event = Event::from_copy(Msg::none(), copy);
            spool::push(&probe.sock, probe.index, &event, Enter::Failed);
        }
    }
}
