//! One event offered to a virtual socket's subscribers: the driver that
//! makes each attempt through the subscriber's transport, and the
//! accounting (statistics, log lines) of a settled event.

#![forbid(unsafe_code)]

use super::chain;
use std::sync::atomic::Ordering;

use super::exports::{self, DELIVERED, EVENTS, FAILED, FAILOVERS, INCOMPLETE, UNKEYED};
use super::vsock::SockRef;
use crate::opensips::event::{Event, EventCopy, Msg, ParamValue};
use crate::opensips::log::log;
use crate::opensips::now_ms;
use crate::policy::{self, Attempt, Driver, Outcome, Progress, Transition, Walk};
use crate::socket::{self, Policy};

/// The core's raise: 0 when delivered or accepted, to report later.
pub fn raise(event: Event<'_>, sock: SockRef) -> bool {
    EVENTS.add(1);
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
        Progress::Done(out) => {
            driver.settle(out);
            out.delivered()
        }
    }
}

/// HASH: this event's value of the socket's parameter, the bytes it is
/// placed by (an integer as its decimal text, written into `buf`).  None
/// for the other policies, and for an event without the parameter: such
/// events are counted, and said once per subscription.
fn hash_value<'a>(sock: &SockRef, event: &Event<'a>, buf: &'a mut [u8; 11]) -> Option<&'a [u8]> {
    let key = sock.key()?;
    match event.param(key) {
        Some(ParamValue::Str(s)) => return Some(s),
        Some(ParamValue::Int(n)) => return Some(policy::int_text(n, buf)),
        None => {}
    }
    UNKEYED.add(1);
    if !sock.unkeyed_said.swap(true, Ordering::Relaxed) {
        log!(
            WARN,
            "event '{}' has no parameter '{}': 'virtual:{}' spreads such events round-robin (said once)",
            socket::quote(event.name()),
            socket::quote(key),
            socket::quote(sock.text())
        );
    }
    None
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

    pub fn describe(&self, i: usize) -> String {
        format!(
            "subscriber '{}' of 'virtual:{}'",
            socket::quote(self.sock.token(&self.sock.subs()[i])),
            socket::quote(self.sock.text())
        )
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

    /// A settled event: count it, and say so if it was lost.
    pub fn settle(&mut self, out: Outcome) {
        count(out);
        if !out.delivered() {
            // a PARALLEL subscriber that fails is reported once, as it
            // starts failing; an event no subscriber took is lost, and said
            // every time
            match out.policy {
                Policy::Parallel => log!(DBG, "{}", self.lost()),
                _ => log!(ERR, "{}", self.lost()),
            }
        }
    }

    fn lost(&self) -> String {
        let name = self.event().map(|e| e.name()).unwrap_or_default();
        format!(
            "event '{}' was not delivered by 'virtual:{}'",
            socket::quote(name),
            socket::quote(self.sock.text())
        )
    }
}

impl Driver for CoreDriver<'_> {
    fn attempt(&mut self, i: usize, walk: &Walk) -> Attempt {
        let sub = &self.sock.subs()[i];
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
                    rc => self.failed(i, rc),
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
