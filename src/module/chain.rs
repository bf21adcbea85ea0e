//! Events waiting for an asynchronous transport's report (sub-sockets
//! flagged `EVI_ASYNC_STATUS`), in shared memory, since the report may come
//! in another process.  Each holds a reference on the virtual socket.

#![forbid(unsafe_code)]

use super::exports;
use super::raise::CoreDriver;
use super::vsock::SockRef;
use crate::opensips::event::{DummyMsg, EventCopy, Msg};
use crate::opensips::now_ms;
use crate::opensips::shm::{ShmRc, Tail};
use crate::opensips::transport::Report;
use crate::policy::{self, Attempt, Progress, Walk};

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
    let probe = Probe {
        sock: driver.sock.clone(),
        index: i,
    };
    let Some(probe) = ShmRc::single(probe) else {
        return driver.out_of_memory(i);
    };
    let Some(event) = driver.event() else {
        return Attempt::Failed;
    };
    match driver.sock.subs()[i].sock.raise_reported(&event, probe) {
        Ok(()) => Attempt::Pending,
        Err(rc) => driver.failed(i, rc),
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
        let (rules, now) = (exports::rules(), now_ms());
        match walk.resume(chain.current, ok, sock.subs(), rules, now, &mut driver) {
            Progress::Pending => {}
            Progress::Done(out) => {
                driver.settle(out);
            }
        }
    }
}

impl Report for Probe {
    fn report(probe: ShmRc<Probe>, ok: bool) {
        let mut driver = CoreDriver::new(&probe.sock, None, None, Msg::none());
        policy::record(probe.sock.subs(), probe.index, ok, now_ms(), &mut driver);
    }
}
