//! What a previous run held (issue 17): found at the start, waiting for its
//! subscription (the same event and socket text), put first in that
//! subscription's queues when it is made again, dropped after the grace.
//!
//! A group is claimed by the first of: a raise of its event on the
//! subscription (before that event is delivered or held, so the restored
//! events go first), or the replay process's sweep over the live
//! subscriptions (so that a subscription nothing is raised on replays
//! too).  The claim lock is held while a group moves into its queues, so
//! a raise that comes meanwhile waits and goes behind them; it is taken
//! only while events wait (one atomic load otherwise).

#![forbid(unsafe_code)]

use std::sync::OnceLock;
use std::sync::atomic::Ordering::Relaxed;

use super::held;
use super::persist::{self, MAX_GROUPS, Persist, Record};
use super::shared::{self, DROPPED, add, wall_ms};
use super::spool::Name;
use super::vsock::{self, SockRef};
use crate::opensips::event::{EventCopy, ParamValue};
use crate::opensips::log::log;
use crate::opensips::mi::{Full, Item};
use crate::opensips::{now_ms, rpm};
use crate::spool::durable::{self, Found, Region, Value};
use crate::spool::lock::critical;
use crate::spool::{Enter, Entry};
use crate::text::Quoted;

/// The records a previous run held for one subscription of one event,
/// oldest first.
struct Group {
    event: Vec<u8>,
    text: Vec<u8>,
    slots: Vec<u32>,
}

/// Made in mod_init, before the fork, and never changed: every process
/// has the same.  Which groups are claimed is in shared memory.
static GROUPS: OnceLock<Vec<Group>> = OnceLock::new();

/// mod_init: the region of `bytes` in restart-persistent memory, what a
/// previous run left in it kept for its subscriptions.
pub fn init(bytes: u64, grace_ms: u64) -> Result<(), String> {
    let block = rpm::block(c"event_virtual", (bytes / 8) as usize).map_err(|e| {
        // F_MALLOC takes a block of more than half the free memory only
        // from a larger bucket: the first start needs twice the size
        format!(
            "restart_persistency: {e}: its region takes spool_max_memory ({bytes} bytes), \
             and restart_persistency_size must be at least twice that (MB)"
        )
    })?;
    // the sum's key, from the OS's randomness
    let secret = || {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    let (region, found, foreign) = match Region::open(block.words) {
        Ok((region, found)) => (region, found, 0),
        Err((why, kept)) => {
            if block.found {
                log!(
                    WARN,
                    "restart persistency: the {kept} held events the previous run kept are dropped: {why}"
                );
            }
            (
                Region::format(block.words, secret()),
                Found::default(),
                kept,
            )
        }
    };
    let mut dropped = foreign + found.torn + found.in_doubt + found.corrupt;
    let mut groups: Vec<Group> = Vec::new();
    for &(slot, _) in &found.records {
        let payload = region.payload(slot);
        let Some(d) = durable::decode(&payload) else {
            region.free(slot);
            dropped += 1;
            continue;
        };
        let at = groups
            .iter()
            .position(|g| g.event == d.event && g.text == d.text);
        match at {
            Some(g) => groups[g].slots.push(slot),
            None if groups.len() < MAX_GROUPS => groups.push(Group {
                event: d.event.to_vec(),
                text: d.text.to_vec(),
                slots: vec![slot],
            }),
            None => {
                region.free(slot);
                dropped += 1;
            }
        }
    }
    let waiting = groups.iter().map(|g| g.slots.len() as u64).sum();
    log!(
        NOTICE,
        "restart persistency: found {waiting} held events of {} subscriptions{}",
        groups.len(),
        if dropped > 0 {
            format!(
                ", dropped {dropped} ({foreign} of another layout, {} torn by a crash, {} in flight at the stop, {} corrupt or over {MAX_GROUPS} subscriptions)",
                found.torn,
                found.in_doubt,
                dropped - foreign - found.torn - found.in_doubt
            )
        } else {
            String::new()
        }
    );
    persist::make(region, waiting, dropped, grace_ms)?;
    let _ = GROUPS.set(groups);
    Ok(())
}

/// Whether events wait for their subscription: one load.
pub fn waiting() -> bool {
    persist::get().is_some_and(|p| p.waiting.load(Relaxed) > 0)
}

/// Put what waits for `event` on `sock` first in its queues.
pub fn claim(event: &[u8], sock: &SockRef) {
    let (Some(p), Some(groups)) = (persist::get(), GROUPS.get()) else {
        return;
    };
    // most raises are of events nothing waits for
    if !groups.iter().any(|g| g.event == event) {
        return;
    }
    let text = sock.identity();
    let mut moved = Vec::new();
    critical(&p.claimed, |claimed| {
        for (g, group) in groups.iter().enumerate() {
            if !claimed[g] && group.event == event && group.text == text {
                claimed[g] = true;
                moved.push(restore(p, group, sock));
                p.waiting.fetch_sub(group.slots.len() as u64, Relaxed);
            }
        }
    });
    for (restored, lost) in moved {
        p.restored.fetch_add(restored, Relaxed);
        p.dropped.fetch_add(lost, Relaxed);
        log!(
            NOTICE,
            "'{}' of event '{}': restored {restored} held events{}",
            Name(sock),
            Quoted(event),
            if lost > 0 {
                format!(", dropped {lost} its queues could not take back")
            } else {
                String::new()
            }
        );
        shared::ring();
    }
}

/// A group into the queues of `sock`: (restored, lost).
fn restore(p: &Persist, group: &Group, sock: &SockRef) -> (u64, u64) {
    let Some(sp) = shared::spool() else {
        return (0, group.slots.len() as u64);
    };
    let (now, wall) = (now_ms(), wall_ms());
    let (mut restored, mut lost) = (0, 0);
    for &slot in &group.slots {
        let record = Record::adopt(slot);
        let payload = p.region.payload(slot);
        let held = durable::decode(&payload).and_then(|d| {
            let queue = sock.queues().get(d.queue as usize)?;
            let params: Vec<_> = d.params.iter().map(|&(n, v)| (n, param(v))).collect();
            let born = now.saturating_sub(wall.saturating_sub(d.born_ms));
            let copy = EventCopy::rebuild(d.event, &params, born)?;
            Some((queue, held::node(copy, Some(record))?))
        });
        let Some((queue, node)) = held else {
            lost += 1;
            continue;
        };
        let pushed = queue.push(node, Enter::Failed, &sp.budget, now);
        add(&DROPPED, pushed.dropped());
        match pushed.entry {
            Entry::Queued { .. } | Entry::Dropped(_) => restored += 1,
            Entry::Empty => lost += 1,
        }
    }
    (restored, lost)
}

fn param(v: Value<'_>) -> ParamValue<'_> {
    match v {
        Value::Int(n) => ParamValue::Int(n),
        Value::Str(s) => ParamValue::Str(s),
    }
}

/// The replay process, while events wait: claim them for the live
/// subscriptions, and drop those that waited past the grace.
pub fn sweep() {
    let (Some(p), Some(groups)) = (persist::get(), GROUPS.get()) else {
        return;
    };
    let mut live = Vec::new();
    let _ = vsock::walk(None, |event, s, _| live.push((event.to_vec(), s)));
    for (event, s) in &live {
        claim(event, s);
    }
    if now_ms() < p.deadline_ms || p.waiting.load(Relaxed) == 0 {
        return;
    }
    let mut gone = Vec::new();
    critical(&p.claimed, |claimed| {
        for (g, c) in claimed.iter_mut().enumerate().take(groups.len()) {
            if !*c {
                *c = true;
                gone.push(&groups[g]);
            }
        }
    });
    for group in gone {
        let n = group.slots.len() as u64;
        group.slots.iter().for_each(|&s| drop(Record::adopt(s)));
        p.waiting.fetch_sub(n, Relaxed);
        p.dropped.fetch_add(n, Relaxed);
        log!(
            WARN,
            "'virtual:{}' of event '{}' was not subscribed again within {} s: {n} held events dropped",
            Quoted(&group.text),
            Quoted(&group.event),
            p.grace_ms / 1000
        );
    }
}

/// MI: what still waits, and when it is dropped.
pub fn render(root: &Item) -> Result<(), Full> {
    let (Some(p), Some(groups)) = (persist::get(), GROUPS.get()) else {
        return Ok(());
    };
    let claimed = critical(&p.claimed, |c| *c);
    let o = root.object("Restart")?;
    o.number("restored", p.restored.load(Relaxed) as f64)?;
    o.number("waiting", p.waiting.load(Relaxed) as f64)?;
    o.number("dropped", p.dropped.load(Relaxed) as f64)?;
    let list = o.array("Waiting")?;
    let drop_in = p.deadline_ms.saturating_sub(now_ms()).div_ceil(1000);
    let unclaimed = groups.iter().enumerate().filter(|(g, _)| !claimed[*g]);
    for (_, group) in unclaimed {
        let e = list.element()?;
        e.string("event", &group.event)?;
        e.string("socket", &[&b"virtual:"[..], &group.text].concat())?;
        e.number("held", group.slots.len() as f64)?;
        e.number("drop_in", drop_in as f64)?;
    }
    Ok(())
}
