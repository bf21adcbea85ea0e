//! One event offered to a virtual socket's subscribers: the driver that
//! makes each attempt through the subscriber's transport, and the
//! accounting (statistics, log lines) of a settled event.

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::atomic::Ordering;

use super::chain;
use super::exports::{self, DELIVERED, EVENTS, FAILED, FAILOVERS, INCOMPLETE, UNKEYED};
use super::spool::{self, Pushed};
use super::vsock::SockRef;
use crate::opensips::event::{Event, EventCopy, Msg, ParamValue};
use crate::opensips::log::log;
use crate::opensips::now_ms;
use crate::policy::{self, Attempt, Driver, Outcome, Progress, Transition, Walk};
use crate::socket::Policy;
use crate::spool::Enter;
use crate::text::Quoted;

/// The core's raise: 0 when delivered or accepted, to report later.
pub fn raise(event: Event<'_>, sock: SockRef) -> bool {
    EVENTS.add(1);
    // a spool that holds events: this one goes behind them (one load when
    // it is empty, or when there is no spool)
    if sock.policy != Policy::Parallel && sock.queues().first().is_some_and(|q| q.held() > 0) {
        match spool::push(&sock, 0, &event, Enter::Behind) {
            Pushed::Held => return true,
            Pushed::Lost => return false,
            Pushed::Empty => {}
        }
    }
    let mut int_text = [0u8; 11];
    let value = hash_value(&sock, &event, &mut int_text);
    let mut driver = CoreDriver::new(&sock, Some(event), None, event.msg());
    let progress = policy::deliver(
        sock.policy,
        &sock.rotation,
        value,
        sock.subs(),
        exports::rules(),
        now_ms(),
        &mut driver,
    );
    match progress {
        // accepted: the chain reports on its own
        Progress::Pending => true,
        Progress::Done(out) => driver.settle(out),
    }
}

/// HASH: this event's value of the socket's parameter, the bytes it is
/// placed by (an integer as its decimal text, written into `buf`).  None
/// for the other policies, and for an event without the parameter.
pub fn placement_value<'a>(
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
pub struct CoreDriver<'a> {
    pub sock: &'a SockRef,
    /// The event as the core raised it, during the core's raise.
    core: Option<Event<'a>>,
    /// Its copy in shared memory, made at the first asynchronous attempt
    /// of a FAILOVER or ROUND-ROBIN event (or the chain's, on a report).
    copy: Option<EventCopy>,
    msg: Msg,
    /// A replay of a held event: its queue and the lease's token, which
    /// the end of the walk settles instead of holding the event again.
    pub lease: Option<(usize, u64)>,
}

impl<'a> CoreDriver<'a> {
    pub fn new(
        sock: &'a SockRef,
        core: Option<Event<'a>>,
        copy: Option<EventCopy>,
        msg: Msg,
    ) -> Self {
        CoreDriver {
            sock,
            core,
            copy,
            msg,
            lease: None,
        }
    }

    /// The replay of a held event, leased from queue `lease.0`.
    pub fn replaying(sock: &'a SockRef, event: Event<'a>, lease: (usize, u64)) -> Self {
        CoreDriver {
            lease: Some(lease),
            ..CoreDriver::new(sock, Some(event), None, event.msg())
        }
    }

    /// The event each attempt passes on.
    pub fn event(&self) -> Option<Event<'_>> {
        match (&self.core, &self.copy) {
            (Some(event), _) => Some(*event),
            (None, Some(copy)) => Some(Event::from_copy(self.msg, copy)),
            (None, None) => None,
        }
    }

    pub fn describe(&self, i: usize) -> Described<'_> {
        Described(self.sock.token(&self.sock.subs()[i]), self.sock.text())
    }

    /// The event as a chain keeps it.
    pub fn copied_event(&self) -> Option<Event<'_>> {
        Some(Event::from_copy(self.msg, self.copy.as_ref()?))
    }

    /// A transport's refusal, logged at DBG.
    pub fn failed(&self, i: usize, rc: i32) -> Attempt {
        log!(DBG, "{} failed an event ({rc})", self.describe(i));
        Attempt::Failed
    }

    /// The copy of the event that travels with a chain; None when out of
    /// shared memory.
    pub fn copy(&mut self) -> Option<EventCopy> {
        if self.copy.is_none() {
            self.copy = EventCopy::new(&self.event()?);
        }
        self.copy.clone()
    }

    pub fn out_of_memory(&self, i: usize) -> Attempt {
        log!(
            ERR,
            "out of shared memory for an event to {}",
            self.describe(i)
        );
        Attempt::Failed
    }

    /// A settled event: count it, and say so if it was lost; true when
    /// delivered (or held by the spool).
    pub fn settle(&mut self, out: Outcome) -> bool {
        if let Some((q, token)) = self.lease {
            // a replay's asynchronous chain ended: settle its lease
            spool::finish(self.sock, q, token, out.delivered());
            return true;
        }
        if !out.delivered() && out.policy != Policy::Parallel && !self.sock.queues().is_empty() {
            let pushed = self.event().map_or(Pushed::Lost, |e| {
                spool::push(self.sock, 0, &e, Enter::Failed)
            });
            if pushed == Pushed::Held {
                // held, not lost: not counted failed
                FAILOVERS.add(out.attempts.saturating_sub(1));
                return true;
            }
            // dropped by the spool: counted and logged there
            count(out);
            return false;
        }
        count(out);
        if !out.delivered() {
            // a PARALLEL subscriber that fails is reported once, as it
            // starts failing; an event no subscriber took is lost, and said
            // every time
            let name = Quoted(self.event().map(|e| e.name()).unwrap_or_default());
            let text = Quoted(self.sock.text());
            match out.policy {
                Policy::Parallel => {
                    log!(DBG, "event '{name}' was not delivered by 'virtual:{text}'")
                }
                _ => log!(ERR, "event '{name}' was not delivered by 'virtual:{text}'"),
            }
        }
        out.delivered()
    }
}

impl Driver for CoreDriver<'_> {
    fn attempt(&mut self, i: usize, walk: &Walk) -> Attempt {
        let sub = &self.sock.subs()[i];
        // PARALLEL with a spool: a subscriber with held events gets this
        // one behind them (not a failure: its window must not restart)
        let queue = match self.sock.policy {
            Policy::Parallel => self.sock.queues().get(i),
            _ => None,
        };
        if let Some(q) = queue
            && q.held() > 0
            && let Some(event) = self.event()
        {
            match spool::push(self.sock, i, &event, Enter::Behind) {
                Pushed::Held | Pushed::Lost => return Attempt::Pending,
                Pushed::Empty => {}
            }
        }
        match (sub.sock.asynchronous(), self.sock.policy) {
            (true, Policy::Parallel) => chain::probe(self, i),
            (true, _) => chain::chain(self, i, walk),
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
                            spool::push(self.sock, i, &event, Enter::Failed);
                        }
                        self.failed(i, rc)
                    }
                }
            }
        }
    }

    fn transition(&mut self, i: usize, t: Transition) {
        match t {
            Transition::Failing => log!(WARN, "{} is failing", self.describe(i)),
            Transition::Recovered => log!(NOTICE, "{} has recovered", self.describe(i)),
        }
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

/// `subscriber '<token>' of 'virtual:<text>'`, as a log line names it.
pub struct Described<'a>(&'a [u8], &'a [u8]);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (token, text) = (Quoted(self.0), Quoted(self.1));
        write!(f, "subscriber '{token}' of 'virtual:{text}'")
    }
}
