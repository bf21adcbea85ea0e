//! MI `event_virtual_list`: every live virtual subscription, its policy,
//! where the rotation stands, and each subscriber's health and counters.

#![forbid(unsafe_code)]

use super::exports::{self, TRANSPORT};
use super::vsock::SockRef;
use crate::opensips::mi::{Full, Handler, Item, Params, Response};
use crate::opensips::now_ms;
use crate::opensips::spool::HeldNodes;
use crate::policy::{self, State};
use crate::socket::{self, Policy};
use crate::spool::{Queue, Reason, wake};
use std::sync::atomic::Ordering;

/// Every subscription's event, socket and expire time, copied out while
/// its event's subscriber list was locked; the references keep the sockets
/// for the rendering, after the lock.
type Listed = Vec<(Vec<u8>, SockRef, Option<u32>)>;

fn render(root: &Item, list: &Listed) -> Result<(), Full> {
    let (now, window) = (now_ms(), exports::rules().window_ms);
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let subscriptions = root.array("Subscriptions")?;
    for (event, sock, expire) in list {
        let o = subscriptions.element()?;
        o.string("event", event)?;
        o.string("socket", &[&b"virtual:"[..], sock.text()].concat())?;
        o.string("policy", sock.policy.name().as_bytes())?;
        if let Some(expire) = expire {
            o.number("expire", (*expire).into())?;
        }
        if sock.policy == Policy::RoundRobin {
            // the ticket the next event takes, placed as delivery will
            let ticket = sock.rotation.load(Ordering::Relaxed);
            let next = policy::rotation_start(ticket, sock.subs(), window, now);
            o.number("next", next as f64)?;
        }
        let queues = sock.queues();
        if let Some(q) = queues.first() {
            let l = q.limits();
            o.number("spool_size", l.capacity.into())?;
            o.number("spool_max_age", (l.max_age_ms / 1000) as f64)?;
            if sock.policy != Policy::Parallel {
                let states = sock.subs().iter().map(|s| s.health.state(now, window));
                spool_view(&o, q, now, wake::eligible_at(now, states))?;
            }
        }
        let subs = o.array("Subscribers")?;
        for (i, s) in sock.subs().iter().enumerate() {
            let so = subs.element()?;
            if sock.policy == Policy::Parallel
                && let Some(q) = queues.get(i)
            {
                let eligible = wake::eligible_at(now, [s.health.state(now, window)]);
                spool_view(&so, q, now, eligible)?;
            }
            so.string("socket", sock.token(s))?;
            match s.health.state(now, window) {
                State::Healthy => so.string("state", b"healthy")?,
                State::Failing => so.string("state", b"failing")?,
                State::Skipped { for_ms } => {
                    so.string("state", b"skipped")?;
                    so.number("skipped_for_ms", for_ms as f64)?;
                    // wall-clock time, in whole seconds, when it is tried again
                    so.number("skipped_until", (wall_ms + for_ms).div_ceil(1000) as f64)?;
                }
            }
            so.number("attempts", s.health.attempts() as f64)?;
            so.number("failures", s.health.failures() as f64)?;
        }
    }
    Ok(())
}

/// One queue's `Spool` object.
/// `eligible_at`: when a subscriber that could take the head is out of its
/// failover window.
fn spool_view(o: &Item, q: &Queue, now: u64, eligible_at: u64) -> Result<(), Full> {
    let v = q.view(&HeldNodes, now);
    let s = o.object("Spool")?;
    s.number("held", v.held.into())?;
    s.number("bytes", v.bytes as f64)?;
    if let Some(age) = v.oldest_ms {
        s.number("oldest_age_ms", age as f64)?;
    }
    if let Some(ms) = v.in_flight_ms {
        s.number("in_flight_ms", ms as f64)?;
    }
    if let Some(at) = v.retry_at_ms.filter(|_| v.in_flight_ms.is_none()) {
        let at = at.max(eligible_at);
        s.number("retry_in_ms", at.saturating_sub(now) as f64)?;
    }
    s.number("spooled", v.spooled as f64)?;
    s.number("replayed", v.replayed as f64)?;
    s.number("dropped", v.dropped_total() as f64)?;
    for (key, r) in [
        ("dropped_overflow", Reason::Overflow),
        ("dropped_age", Reason::Age),
        ("dropped_budget", Reason::Budget),
        ("dropped_unsubscribed", Reason::Unsubscribed),
    ] {
        let n = v.dropped[r as usize];
        if n > 0 {
            s.number(key, n as f64)?;
        }
    }
    Ok(())
}

fn list(filter: Option<&[u8]>) -> Response {
    let mut list = Vec::new();
    let walked = TRANSPORT.walk_subscriptions(filter, |event, sock, expire| {
        if let Some(sock) = SockRef::of(sock) {
            list.push((event.to_vec(), sock, expire));
        }
    });
    if walked.is_err() {
        let event = socket::quote(filter.unwrap_or_default());
        return Response::error(404, &format!("unknown event '{event}'"));
    }
    Response::result(|root| render(root, &list))
        .unwrap_or_else(|Full| Response::error(500, "out of memory building the list"))
}

/// `event_virtual_list`
pub struct ListAll;

impl Handler for ListAll {
    fn call(_: Params<'_>) -> Response {
        list(None)
    }
}

/// `event_virtual_list event=NAME`
pub struct ListEvent;

impl Handler for ListEvent {
    fn call(params: Params<'_>) -> Response {
        match params.string(c"event") {
            Some(event) => list(Some(event)),
            None => Response::error(400, "the 'event' parameter must be a string"),
        }
    }
}

/// `event_virtual_retry [event=NAME] [mode=all|one]`
pub struct Retry;

impl Handler for Retry {
    fn call(params: Params<'_>) -> Response {
        let event = params.string(c"event");
        let all = match params.string(c"mode") {
            None | Some(b"all") => true,
            Some(b"one") => false,
            Some(m) => {
                let m = socket::quote(m);
                return Response::error(400, &format!("bad mode '{m}' (expected all or one)"));
            }
        };
        match super::spool::retry(event, all) {
            Ok(n) => Response::result(|root| root.number("queues", n as f64))
                .unwrap_or_else(|Full| Response::error(500, "out of memory")),
            Err(()) => {
                let e = socket::quote(event.unwrap_or_default());
                Response::error(404, &format!("unknown event '{e}'"))
            }
        }
    }
}
