//! Held events in OpenSIPS's restart-persistent memory (issue 17): each
//! held event of a spool has a record there, written when it is held,
//! committed when it enters its queue, leased while an attempt may deliver
//! it, and freed when it leaves the queue.  The rules of the region are the
//! pure core's (`crate::spool::durable`); this is its one block of shared
//! state, and the records as the held events own them.

#![forbid(unsafe_code)]

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use super::shared::{UNPERSISTED, wall_ms};
use crate::opensips::event::{Event, ParamValue};
use crate::opensips::now_ms;
use crate::opensips::shm::{self, Tail};
use crate::socket;
use crate::spool::durable::{self, Key, Len, Region, Value};
use crate::spool::lock::{self, critical};

/// Subscriptions whose held events a start can keep waiting for them.
pub const MAX_GROUPS: usize = 1024;

/// The durability's block in shared memory.
pub struct Persist {
    pub region: Region<'static>,
    /// Where the next record is looked for; taken by whoever reserves.
    cursor: lock::Mutex<u32>,
    /// Which of the waiting groups (`super::restore`) were claimed or
    /// dropped; held while a group moves into its queues.
    pub claimed: lock::Mutex<[bool; MAX_GROUPS]>,
    /// Events still waiting for their subscription.
    pub waiting: AtomicU64,
    /// When the waiting ones are dropped (ms, shared clock): the start
    /// and the grace.
    pub deadline_ms: u64,
    pub grace_ms: u64,
}

impl Tail for Persist {}

static PERSIST: OnceLock<&'static Persist> = OnceLock::new();

/// mod_init: the block over `region`.
pub fn make(region: Region<'static>, waiting: u64, grace_ms: u64) -> Result<(), &'static str> {
    let block = shm::leak(Persist {
        region,
        cursor: lock::Mutex::new(0),
        claimed: lock::Mutex::new([false; MAX_GROUPS]),
        waiting: AtomicU64::new(waiting),
        deadline_ms: now_ms().saturating_add(grace_ms),
        grace_ms,
    })
    .ok_or("out of shared memory for restart persistency")?;
    let _ = PERSIST.set(block);
    Ok(())
}

pub fn get() -> Option<&'static Persist> {
    PERSIST.get().copied()
}

/// A held event's record; freed when dropped (the event left its queue).
pub struct Record(u32);

impl Record {
    /// The record at `slot`, now owned (a start's).
    pub fn adopt(slot: u32) -> Record {
        Record(slot)
    }

    /// Write `event`, held for queue `queue` of the subscription printed
    /// `text`; None when durability is off, or (counted) when the region
    /// has no room.
    pub fn write(event: &Event<'_>, text: &[u8], queue: usize, born_ms: u64) -> Option<Record> {
        let p = get()?;
        let key = Key {
            event: event.name(),
            text: socket::identity(text),
            queue: queue as u16,
        };
        let params = || event.params().map(|(n, v)| (n, value(v)));
        let born = wall_ms().saturating_sub(now_ms().saturating_sub(born_ms));
        let mut len = Len::default();
        durable::encode(&mut len, &key, born, params());
        let slot = critical(&p.cursor, |c| p.region.reserve(c, len.0));
        let Some(slot) = slot else {
            UNPERSISTED.add(1);
            return None;
        };
        p.region
            .write(slot, len.0, |w| durable::encode(w, &key, born, params()));
        Some(Record(slot))
    }

    /// The event entered its queue (under the queue's lock: the region's
    /// sequence numbers are the queue's order).
    pub fn commit(&self) {
        if let Some(p) = get() {
            p.region.commit(self.0)
        }
    }

    pub fn lease(&self, leased: bool) {
        if let Some(p) = get() {
            p.region.lease(self.0, leased)
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if let Some(p) = get() {
            p.region.free(self.0)
        }
    }
}

fn value(v: ParamValue<'_>) -> Value<'_> {
    match v {
        ParamValue::Int(n) => Value::Int(n),
        ParamValue::Str(s) => Value::Str(s),
    }
}
