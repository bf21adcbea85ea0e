//! A held event as the spool keeps it: a node of a [`ShmList`] carrying a
//! reference to the event's [`EventCopy`], the same copy an asynchronous
//! attempt carries, so holding an event the chain already copied copies
//! nothing; and its record in restart-persistent memory, if it has one.

#![forbid(unsafe_code)]

use super::persist::Record;
use crate::opensips::event::EventCopy;
use crate::opensips::shm::{ShmList, ShmNode, Tail};
use crate::spool::{self, Fifo, Held, Meta, held_event_bytes};

pub struct Holding {
    event: EventCopy,
    bytes: u64,
    /// Freed with the node: the event has left its queue.
    record: Option<Record>,
}

impl Tail for Holding {}

/// A held event, made outside the queue's lock; None when out of shared
/// memory.
pub fn node(event: EventCopy, record: Option<Record>) -> Option<ShmNode<Holding>> {
    let [copy, params] = event.blocks();
    let bytes = held_event_bytes(&[ShmNode::<Holding>::SIZE, copy, params]);
    ShmNode::new(Holding {
        event,
        bytes,
        record,
    })
}

impl Held for ShmNode<Holding> {
    type Event = EventCopy;

    fn meta(&self) -> Meta {
        Meta {
            bytes: self.bytes,
            born_ms: self.event.born_ms(),
        }
    }

    fn event(&self) -> EventCopy {
        self.event.clone()
    }

    fn leased(&self, leased: bool) {
        if let Some(r) = &self.record {
            r.lease(leased)
        }
    }
}

impl Fifo for ShmList<Holding> {
    type Item = ShmNode<Holding>;

    fn push_back(&mut self, item: Self::Item) {
        if let Some(r) = &item.record {
            r.commit()
        }
        ShmList::push_back(self, item)
    }

    fn get(&self, at: usize) -> Option<&Self::Item> {
        ShmList::get(self, at)
    }

    fn remove(&mut self, at: usize) -> Option<Self::Item> {
        ShmList::remove(self, at)
    }

    fn len(&self) -> usize {
        ShmList::len(self)
    }

    fn is_empty(&self) -> bool {
        ShmList::is_empty(self)
    }
}

/// A spool queue of a virtual socket.
pub type Queue = spool::Queue<ShmList<Holding>>;
