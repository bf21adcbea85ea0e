//! MI `event_virtual_list`: every live virtual subscription, its policy,
//! where the rotation stands, and each subscriber's health and counters;
//! and MI `event_virtual_hash`: where a HASH subscription places a value.

#![forbid(unsafe_code)]

use super::held::Queue;
use super::shared::{rules, wall_ms};
use super::vsock::{self, SockRef};
use crate::opensips::mi::{Full, Handler, Item, Params, Response};
use crate::opensips::now_ms;
use crate::policy::{self, State};
use crate::socket::{self, Policy};
use crate::spool::Reason;

/// Every subscription's event, socket and expire time, copied out while
/// its event's subscriber list was locked; the references keep the sockets
/// for the rendering, after the lock.
type Listed = Vec<(Vec<u8>, SockRef, Option<u32>)>;

fn render_state(so: &Item, state: State, wall_ms: u64) -> Result<(), Full> {
    match state {
        State::Healthy => so.string("state", b"healthy"),
        State::Failing => so.string("state", b"failing"),
        State::Skipped { for_ms } => {
            so.string("state", b"skipped")?;
            so.number("skipped_for_ms", for_ms as f64)?;
            // wall-clock time, in whole seconds, when it is tried again
            so.number("skipped_until", (wall_ms + for_ms).div_ceil(1000) as f64)
        }
    }
}

fn render(root: &Item, list: &Listed) -> Result<(), Full> {
    let (now, window, wall_ms) = (now_ms(), rules().window_ms, wall_ms());
    let subscriptions = root.array("Subscriptions")?;
    for (event, sock, expire) in list {
        let o = subscriptions.element()?;
        o.string("event", event)?;
        o.string("socket", &[&b"virtual:"[..], sock.text()].concat())?;
        o.string("policy", sock.policy.name().as_bytes())?;
        if let Some(key) = sock.key() {
            o.string("key", key)?;
        }
        if let Some(expire) = expire {
            o.number("expire", (*expire).into())?;
        }
        if sock.policy == Policy::RoundRobin {
            // the ticket the next event takes, placed as delivery will
            let next = sock.rotation.next(sock.subs(), window, now);
            o.number("next", next as f64)?;
        }
        let queues = sock.queues();
        if let Some(q) = queues.first() {
            let l = q.limits();
            o.number("spool_size", l.capacity.into())?;
            o.number("spool_max_age", (l.max_age_ms / 1000) as f64)?;
            if sock.policy != Policy::Parallel {
                spool_view(&o, q, now, sock.eligible_at(0, now, window))?;
            }
        }
        let subs = o.array("Subscribers")?;
        for (i, s) in sock.subs().iter().enumerate() {
            let so = subs.element()?;
            if sock.policy == Policy::Parallel
                && let Some(q) = queues.get(i)
            {
                spool_view(&so, q, now, sock.eligible_at(i, now, window))?;
            }
            so.string("socket", sock.token(s))?;
            render_state(&so, s.health.state(now, window), wall_ms)?;
            if let Some(node) = s.health.peer() {
                so.number("from_node", node.into())?;
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
    let v = q.view(now);
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

/// The live virtual subscriptions, of every event or of one; an error
/// response when that event does not exist.
fn collect(filter: Option<&[u8]>) -> Result<Listed, Response> {
    let mut list = Vec::new();
    let walked = vsock::walk(filter, |event, sock, expire| {
        list.push((event.to_vec(), sock, expire))
    });
    if walked.is_err() {
        let event = socket::quote(filter.unwrap_or_default());
        return Err(Response::error(404, &format!("unknown event '{event}'")));
    }
    Ok(list)
}

fn list(filter: Option<&[u8]>) -> Response {
    match collect(filter) {
        Ok(list) => Response::result(|root| {
            render(root, &list)?;
            super::restore::render(root)
        })
        .unwrap_or_else(|Full| Response::error(500, "out of memory building the list")),
        Err(resp) => resp,
    }
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

/// Which of an event's virtual subscriptions an MI caller means.
enum Pick<'a> {
    Index(usize),
    Socket(&'a [u8]),
}

fn hash(params: Params<'_>, pick: Option<Pick<'_>>) -> Response {
    let (Some(event), Some(value), Some(pick)) =
        (params.string(c"event"), params.string(c"value"), pick)
    else {
        return Response::error(
            400,
            "event and value must be strings, and index a number from 0 or socket a string",
        );
    };
    let list = match collect(Some(event)) {
        Ok(list) => list,
        Err(resp) => return resp,
    };
    let found = match pick {
        Pick::Index(i) => list.get(i),
        Pick::Socket(text) => {
            let text = text.strip_prefix(b"virtual:").unwrap_or(text);
            list.iter().find(|(_, sock, _)| sock.text() == text)
        }
    };
    let Some((event, sock, _)) = found else {
        return Response::error(404, "no such virtual subscription of this event");
    };
    let Some(key) = sock.key() else {
        let text = socket::quote(sock.text());
        return Response::error(400, &format!("'virtual:{text}' is not a HASH subscription"));
    };
    let (now, window, wall_ms) = (now_ms(), rules().window_ms, wall_ms());
    let subs = sock.subs();
    let digest = policy::digest(value);
    let seeds: Vec<u64> = subs.iter().map(|s| s.health.seed()).collect();
    let states: Vec<State> = subs.iter().map(|s| s.health.state(now, window)).collect();
    let skipped: Vec<bool> = states
        .iter()
        .map(|s| matches!(s, State::Skipped { .. }))
        .collect();
    let attempts = policy::hash_attempts(digest, &seeds, &skipped);
    let render = |o: &Item| -> Result<(), Full> {
        o.string("event", event)?;
        o.string("socket", &[&b"virtual:"[..], sock.text()].concat())?;
        o.string("key", key)?;
        o.string("value", value)?;
        o.string("digest", format!("{digest:#018x}").as_bytes())?;
        o.string("target", sock.token(&subs[attempts[0]]))?;
        o.number("target_index", attempts[0] as f64)?;
        let tries = o.array("Attempts")?;
        for &i in &attempts {
            let so = tries.element()?;
            so.number("index", i as f64)?;
            so.string("socket", sock.token(&subs[i]))?;
        }
        let ranks = o.array("Order")?;
        for i in policy::hash_order(digest, &seeds) {
            let so = ranks.element()?;
            so.number("index", i as f64)?;
            so.string("socket", sock.token(&subs[i]))?;
            let score = policy::score(seeds[i], digest);
            so.string("score", format!("{score:#018x}").as_bytes())?;
            render_state(&so, states[i], wall_ms)?;
        }
        Ok(())
    };
    Response::result(render)
        .unwrap_or_else(|Full| Response::error(500, "out of memory building the answer"))
}

/// `event_virtual_hash event=NAME index=N value=V`
pub struct HashByIndex;

impl Handler for HashByIndex {
    fn call(params: Params<'_>) -> Response {
        let index = params.int(c"index").and_then(|i| usize::try_from(i).ok());
        hash(params, index.map(Pick::Index))
    }
}

/// `event_virtual_hash event=NAME socket=S value=V`
pub struct HashBySocket;

impl Handler for HashBySocket {
    fn call(params: Params<'_>) -> Response {
        hash(params, params.string(c"socket").map(Pick::Socket))
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
        match super::replay::retry(event, all) {
            Ok(n) => Response::result(|root| root.number("queues", n as f64))
                .unwrap_or_else(|Full| Response::error(500, "out of memory")),
            Err(()) => {
                let e = socket::quote(event.unwrap_or_default());
                Response::error(404, &format!("unknown event '{e}'"))
            }
        }
    }
}
