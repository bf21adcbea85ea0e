//! MI `event_virtual_list`: every live virtual subscription, its policy,
//! where the rotation stands, and each subscriber's health and counters.

#![forbid(unsafe_code)]

use super::exports::{self, TRANSPORT};
use super::vsock::SockRef;
use crate::opensips::mi::{Full, Handler, Item, Params, Response};
use crate::opensips::now_ms;
use crate::policy::{self, State};
use crate::socket::{self, Policy};

/// One subscriber as the list shows it.
struct SubscriberView {
    socket: Vec<u8>,
    state: State,
    attempts: u64,
    failures: u64,
}

/// One virtual subscription as the list shows it, copied out while its
/// event's subscriber list was locked.
struct SubscriptionView {
    event: Vec<u8>,
    socket: Vec<u8>,
    policy: Policy,
    /// Seconds it was subscribed for, when it expires.
    expire: Option<u32>,
    /// ROUND-ROBIN: the subscriber the next event starts at.
    next: Option<usize>,
    subscribers: Vec<SubscriberView>,
}

fn view(event: &[u8], sock: &SockRef, expire: Option<u32>) -> SubscriptionView {
    let (now, window) = (now_ms(), exports::rules().window_ms);
    SubscriptionView {
        event: event.to_vec(),
        socket: [&b"virtual:"[..], sock.text()].concat(),
        policy: sock.policy,
        expire,
        // the ticket the next event takes, placed as delivery will
        next: (sock.policy == Policy::RoundRobin).then(|| {
            let ticket = sock.rotation.load(std::sync::atomic::Ordering::Relaxed);
            policy::rotation_start(ticket, sock.subs(), window, now)
        }),
        subscribers: sock
            .subs()
            .iter()
            .map(|s| SubscriberView {
                socket: sock.token(s).to_vec(),
                state: s.health.state(now, window),
                attempts: s.health.attempts(),
                failures: s.health.failures(),
            })
            .collect(),
    }
}

fn render(root: &Item, list: &[SubscriptionView]) -> Result<(), Full> {
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let subscriptions = root.array("Subscriptions")?;
    for v in list {
        let o = subscriptions.element()?;
        o.string("event", &v.event)?;
        o.string("socket", &v.socket)?;
        o.string("policy", v.policy.name().as_bytes())?;
        if let Some(expire) = v.expire {
            o.number("expire", expire.into())?;
        }
        if let Some(next) = v.next {
            o.number("next", next as f64)?;
        }
        let subs = o.array("Subscribers")?;
        for s in &v.subscribers {
            let so = subs.element()?;
            so.string("socket", &s.socket)?;
            match s.state {
                State::Healthy => so.string("state", b"healthy")?,
                State::Failing => so.string("state", b"failing")?,
                State::Skipped { for_ms } => {
                    so.string("state", b"skipped")?;
                    so.number("skipped_for_ms", for_ms as f64)?;
                    // wall-clock time, in whole seconds, when it is tried again
                    so.number("skipped_until", (wall_ms + for_ms).div_ceil(1000) as f64)?;
                }
            }
            so.number("attempts", s.attempts as f64)?;
            so.number("failures", s.failures as f64)?;
        }
    }
    Ok(())
}

fn list(filter: Option<&[u8]>) -> Response {
    let mut list = Vec::new();
    let walked = TRANSPORT.walk_subscriptions(filter, |event, sock, expire| {
        if let Some(sock) = SockRef::of(sock) {
            list.push(view(event, &sock, expire));
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
