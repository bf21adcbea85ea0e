//! One event offered to a virtual socket's subscribers: the raise, the
//! driver that makes each attempt through the subscriber's transport, the
//! chains that wait for an asynchronous transport's report (in shared
//! memory: the report may come in another process), and the accounting
//! (statistics, log lines) of a settled event.

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::atomic::Ordering;

use super::shared::{self, DELIVERED, EVENTS, FAILED, FAILOVERS, INCOMPLETE, UNKEYED};
use super::spool::{self, Pushed};
use super::status::{self, Change};
use super::vsock::SockRef;
use crate::opensips::event::{DummyMsg, Event, EventCopy, Msg, ParamValue};
use crate::opensips::log::log;
use crate::opensips::now_ms;
use crate::opensips::shm::{ShmRc, Tail};
use crate::opensips::transport::Report;
use crate::policy::{self, Attempt, Driver, Outcome, Progress, Transition, Walk};
use crate::socket::Policy;
use crate::spool::{Attempted, Enter};
use crate::text::Quoted;

/// The core's raise: true when delivered or accepted, to report later.
pub fn raise(event: Event<'_>, sock: SockRef) -> bool {
    EVENTS.add(1);
    // what a previous run held for this subscription goes first
    if super::restore::waiting() {
        super::restore::claim(event.name(), &sock);
    }
    // a spool that holds events: this one goes behind them (one load when
    // it is empty, or when there is no spool)
    if sock.policy != Policy::Parallel && sock.queues().first().is_some_and(|q| q.held() > 0) {
        match spool::push(&sock, 0, &event, None, Enter::Behind) {
            Pushed::Held => return true,
            Pushed::Lost => return false,
            Pushed::Empty => {}
        }
    }
    let mut int_text = [0u8; 11];
    let value = hash_value(&sock, &event, &mut int_text);
    let mut driver = CoreDriver::new(&sock, Some(event), None, event.msg());
    match driver.deliver(value) {
        // accepted: the chain reports on its own
        Progress::Pending => true,
        Progress::Done(out) => driver.settle(out),
    }
}

/// HASH: this event's value of the socket's parameter, the bytes it is
/// placed by (an integer as its decimal text, written into `buf`).  None
/// for the other policies, and for an event without the parameter.
fn placement_value<'a>(
    sock: &SockRef,
    event: &Event<'a>,
    buf: &'a mut [u8; 11],
) -> Option<&'a [u8]> {
    match event.param(sock.key()?)? {
        ParamValue::Str(s) => Some(s),
        ParamValue::Int(n) => Some(policy::int_text(n, buf)),
    }
}

/// [`placement_value`] for a raise: an event without the parameter is
/// counted, and said once per subscription.
fn hash_value<'a>(sock: &SockRef, event: &Event<'a>, buf: &'a mut [u8; 11]) -> Option<&'a [u8]> {
    let key = sock.key()?;
    let value = placement_value(sock, event, buf);
    if value.is_none() {
        UNKEYED.add(1);
        if !sock.unkeyed_said.swap(true, Ordering::Relaxed) {
            status::record(sock, 0, Change::Unkeyed);
            log!(
                WARN,
                "event '{}' has no parameter '{}': 'virtual:{}' spreads such events round-robin (said once)",
                Quoted(event.name()),
                Quoted(key),
                Quoted(sock.text())
            );
        }
    }
    value
}

/// Hands one event to one subscriber at a time, on a virtual socket that
/// the raise or the chain holds a reference on.
struct CoreDriver<'a> {
    sock: &'a SockRef,
    /// The event as the core raised it, during the core's raise.
    core: Option<Event<'a>>,
    /// Its copy in shared memory: made at the first asynchronous attempt
    /// (or hold) of the event, or the chain's, or the held event's.
    copy: Option<EventCopy>,
    msg: Msg,
    /// A replay of a held event: its queue and the lease's token, which
    /// the end of the walk settles instead of holding the event again.
    lease: Option<(usize, u64)>,
}

impl<'a> CoreDriver<'a> {
    fn new(sock: &'a SockRef, core: Option<Event<'a>>, copy: Option<EventCopy>, msg: Msg) -> Self {
        CoreDriver {
            sock,
            core,
            copy,
            msg,
            lease: None,
        }
    }

    /// The walk of one event from its start; HASH places it by `value`.
    fn deliver(&mut self, value: Option<&[u8]>) -> Progress {
        let sock = self.sock;
        let subs = sock.subs();
        let (rules, now) = (shared::rules(), now_ms());
        policy::deliver(sock.policy, &sock.rotation, value, subs, rules, now, self)
    }

    /// The event each attempt passes on.
    fn event(&self) -> Option<Event<'_>> {
        match (&self.core, &self.copy) {
            (Some(event), _) => Some(*event),
            (None, Some(copy)) => Some(Event::from_copy(self.msg, copy)),
            (None, None) => None,
        }
    }

    fn describe(&self, i: usize) -> Described<'_> {
        Described(self.sock.token(&self.sock.subs()[i]), self.sock.text())
    }

    /// A transport's refusal, logged at DBG.
    fn failed(&self, i: usize, rc: i32) -> Attempt {
        log!(DBG, "{} failed an event ({rc})", self.describe(i));
        Attempt::Failed
    }

    /// The event's copy in shared memory (made once); None when out of
    /// shared memory.
    fn copy(&mut self) -> Option<EventCopy> {
        if self.copy.is_none() {
            self.copy = EventCopy::new(&self.event()?);
        }
        self.copy.clone()
    }

    fn out_of_memory(&self, i: usize) -> Attempt {
        log!(
            ERR,
            "out of shared memory for an event to {}",
            self.describe(i)
        );
        Attempt::Failed
    }

    /// Hold the event in queue `qi`.
    fn hold(&mut self, qi: usize, enter: Enter) -> Pushed {
        let copy = self.copy();
        match self.event() {
            Some(event) => spool::push(self.sock, qi, &event, copy, enter),
            None => Pushed::Lost,
        }
    }

    /// A settled event: count it, and say so if it was lost; true when
    /// delivered (or held by the spool).
    fn settle(&mut self, out: Outcome) -> bool {
        if let Some((q, token)) = self.lease {
            // a replay's asynchronous chain ended: settle its lease
            spool::finish(self.sock, q, token, out.delivered());
            return true;
        }
        if !out.delivered() && out.policy != Policy::Parallel && !self.sock.queues().is_empty() {
            if self.hold(0, Enter::Failed) == Pushed::Held {
                // held, not lost: not counted failed
                FAILOVERS.add(out.attempts.saturating_sub(1));
                return true;
            }
            // dropped by the spool: counted and logged there
            count(out);
            return false;
        }
        count(out);
        // a PARALLEL event some subscribers took is not lost: the ones
        // that failed say so as they start failing
        if out.taken == 0 {
            let name = self.event().map(|e| e.name()).unwrap_or_default();
            log!(
                ERR,
                "event '{}' was not delivered by 'virtual:{}'",
                Quoted(name),
                Quoted(self.sock.text())
            );
        }
        out.delivered()
    }
}

impl Driver for CoreDriver<'_> {
    fn attempt(&mut self, i: usize, walk: &Walk) -> Attempt {
        let sock = self.sock;
        let sub = &sock.subs()[i];
        // PARALLEL with a spool: a subscriber with held events gets this
        // one behind them (not a failure: its window must not restart)
        let queue = match sock.policy {
            Policy::Parallel => sock.queues().get(i),
            _ => None,
        };
        if queue.is_some_and(|q| q.held() > 0) && self.hold(i, Enter::Behind) != Pushed::Empty {
            return Attempt::Pending;
        }
        match (sub.sock.asynchronous(), sock.policy) {
            (true, Policy::Parallel) => probe(self, i),
            (true, _) => chain(self, i, walk),
            // synchronous delivery: the transport's return value is the
            // result, as for the core's own raise
            (false, _) => {
                let Some(event) = self.event() else {
                    return Attempt::Failed;
                };
                match sub.sock.raise(&event) {
                    0 => Attempt::Taken,
                    rc => {
                        if queue.is_some() {
                            // held for this subscriber; its health records
                            // the failure all the same
                            self.hold(i, Enter::Failed);
                        }
                        self.failed(i, rc)
                    }
                }
            }
        }
    }

    fn transition(&mut self, i: usize, t: Transition) {
        super::cluster::announce();
        match t {
            Transition::Failing => log!(WARN, "{} is failing", self.describe(i)),
            Transition::Recovered => log!(NOTICE, "{} has recovered", self.describe(i)),
        }
        status::record(self.sock, i, Change::Health(t));
    }
}

/// `subscriber '<token>' of 'virtual:<text>'`, as a log line names it.
struct Described<'a>(&'a [u8], &'a [u8]);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (token, text) = (Quoted(self.0), Quoted(self.1));
        write!(f, "subscriber '{token}' of 'virtual:{text}'")
    }
}

fn count(out: Outcome) {
    let delivered = out.delivered();
    DELIVERED.add(delivered.into());
    FAILED.add((out.taken == 0).into());
    if out.policy == Policy::Parallel {
        INCOMPLETE.add((out.taken > 0 && !delivered).into());
    } else {
        FAILOVERS.add(out.attempts.saturating_sub(1));
    }
}

// ---- asynchronous attempts -------------------------------------------------

/// A FAILOVER, ROUND-ROBIN or HASH event: the walk to resume when
/// subscriber `current` reports, and the event's copy to offer on.
struct Chain {
    sock: SockRef,
    event: EventCopy,
    current: usize,
    walk: Walk,
    /// A replay's lease (queue, token), settled when the chain ends.
    lease: Option<(usize, u64)>,
}

/// A PARALLEL subscriber's attempt: its report only updates the
/// subscriber's health and counters.
struct Probe {
    sock: SockRef,
    index: usize,
    /// With a spool: the event, held for the subscriber if it fails it.
    held: Option<EventCopy>,
    /// A replay of the subscriber's held head: the lease's token.
    lease: Option<u64>,
}

impl Tail for Chain {}
impl Tail for Probe {}

/// An asynchronous attempt in a FAILOVER or ROUND-ROBIN walk: the chain,
/// positioned after this attempt, goes with the event; the transport's
/// report resumes it, in whatever process.
fn chain(driver: &mut CoreDriver<'_>, i: usize, walk: &Walk) -> Attempt {
    let Some(event) = driver.copy() else {
        return driver.out_of_memory(i);
    };
    let chain = Chain {
        sock: driver.sock.clone(),
        event: event.clone(),
        current: i,
        walk: *walk,
        lease: driver.lease,
    };
    let Some(chain) = ShmRc::single(chain) else {
        return driver.out_of_memory(i);
    };
    // the transport gets the copy, which lives as long as the chain
    let event = Event::from_copy(driver.msg, &event);
    match driver.sock.subs()[i].sock.raise_reported(&event, chain) {
        // the report may already be running elsewhere: hands off
        Ok(()) => Attempt::Pending,
        // refused at once: no report will come, and the chain is gone
        Err(rc) => driver.failed(i, rc),
    }
}

/// An asynchronous attempt in a PARALLEL fan-out, or of a replay on the
/// queue's own subscriber.
fn probe(driver: &mut CoreDriver<'_>, i: usize) -> Attempt {
    let lease = driver.lease.map(|(_, token)| token);
    let spooled = lease.is_none() && !driver.sock.queues().is_empty();
    let held = if spooled { driver.copy() } else { None };
    let probe = Probe {
        sock: driver.sock.clone(),
        index: i,
        held,
        lease,
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
                driver.hold(i, Enter::Failed);
            }
            driver.failed(i, rc)
        }
    }
}

impl Report for Chain {
    /// Settle the event, or offer it on.
    fn report(chain: ShmRc<Chain>, ok: bool) {
        let (sock, mut walk) = (&chain.sock, chain.walk);
        // the report is not part of any SIP message's processing:
        // transports raised from here get the core's dummy message
        let dummy = DummyMsg::new();
        let mut driver = CoreDriver::new(sock, None, Some(chain.event.clone()), dummy.msg());
        driver.lease = chain.lease;
        let (rules, now, rot) = (shared::rules(), now_ms(), &sock.rotation);
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
        let mut driver = CoreDriver::new(sock, None, probe.held.clone(), Msg::none());
        policy::record(&sock.rotation, sock.subs(), i, ok, now_ms(), &mut driver);
        if let Some(token) = probe.lease {
            spool::finish(&probe.sock, probe.index, token, ok);
        } else if !ok && probe.held.is_some() {
            // held for this subscriber (events it got live meanwhile are
            // not held back: see the guide, 11.3)
            driver.hold(probe.index, Enter::Failed);
        }
    }
}

/// The replay of queue `qi`'s leased head, `event`, with the lease's
/// `token`: through the policy's walk, or, PARALLEL, on the queue's own
/// subscriber only.
pub fn replay(sock: &SockRef, qi: usize, event: EventCopy, token: u64) -> Attempted {
    // a replay is no SIP message's processing: the core's dummy one
    let dummy = DummyMsg::new();
    let held = Event::from_copy(dummy.msg(), &event);
    let mut driver = CoreDriver::new(sock, None, Some(event.clone()), dummy.msg());
    driver.lease = Some((qi, token));
    if sock.policy == Policy::Parallel {
        let sub = &sock.subs()[qi].sock;
        let ok = if sub.asynchronous() {
            if probe(&mut driver, qi) == Attempt::Pending {
                return Attempted::Pending;
            }
            false
        } else {
            sub.raise(&held) == 0
        };
        policy::record(&sock.rotation, sock.subs(), qi, ok, now_ms(), &mut driver);
        return if ok {
            Attempted::Delivered
        } else {
            Attempted::Failed
        };
    }
    // HASH: placed by the held event's own parameter, as when raised
    let mut int_text = [0u8; 11];
    let value = placement_value(sock, &held, &mut int_text);
    match driver.deliver(value) {
        Progress::Pending => Attempted::Pending,
        Progress::Done(out) if out.delivered() => Attempted::Delivered,
        Progress::Done(_) => Attempted::Failed,
    }
}
