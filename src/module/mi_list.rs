//! MI `event_virtual_list`: every live virtual subscription, its policy,
//! where the rotation stands, and each subscriber's health and counters.

#![forbid(unsafe_code)]

use super::exports::{self, TRANSPORT};
use super::vsock::SockRef;
use crate::opensips::mi::{Full, Handler, Item, Params, Response};
use crate::opensips::now_ms;
use crate::policy::{self, State};
use crate::socket::{self, Policy};
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
        let subs = o.array("Subscribers")?;
        for s in sock.subs() {
            let so = subs.element()?;
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
