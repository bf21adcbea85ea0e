//! The spool: where the events every subscriber failed wait for a
//! subscriber to come back, in order and within bounds (issue 10).
//!
//! This is the pure core.  It decides; the FFI layer allocates, frees and
//! calls transports.  A held event is an opaque [`Handle`] to a block the
//! FFI layer owns in shared memory (the shm copy of the event's name and
//! parameters, with a small header that carries the queue's link and the
//! figures of [`Meta`]).  The queue only ever reads and writes that header
//! through the [`Nodes`] trait, so nothing here dereferences a pointer and
//! this module forbids `unsafe`.
//!
//! Everything the queues share between OpenSIPS processes is atomics laid
//! out `#[repr(C)]` so that it can sit in a shared-memory block: a
//! [`Queue`] per queue (in the virtual socket's block), one [`Budget`] and
//! one [`Doorbell`] for the module.  The queue's few fields are changed
//! only under its own [`RawLock`] (held for O(1) pointer moves, never
//! across a transport call, an allocation or a log line); `held` is also
//! read without the lock, which is what keeps the raise path free when the
//! queue is empty.
//!
//! - [`config`]: the modparams and the per-subscription `SPOOL(...)` token.
//! - [`queue`]: the FIFO, its in-flight token and its drop rules.
//! - [`budget`]: the module-wide shared-memory budget.
//! - [`wake`]: when the replay process tries a queue next, and its doorbell.
//! - [`episode`]: drops are logged once per episode, with a count.
//! - [`lock`]: the lock abstraction and a spinlock that works across
//!   processes.

#![forbid(unsafe_code)]

pub mod budget;
pub mod config;
pub mod episode;
pub mod lock;
pub mod queue;
pub mod replay;
pub mod wake;

#[cfg(test)]
mod tests;

pub use budget::{Budget, held_event_bytes};
pub use config::{Config, Limits, ModParams, OptionError, SpoolOption};
pub use episode::{Episodes, Report};
pub use lock::{RawLock, SpinLock};
pub use queue::{
    Begin, Close, Enter, Entry, Finish, Handle, Lease, Meta, Nodes, Push, Queue, Run, View,
};
pub use replay::{Attempted, Replayer, Tally};
pub use wake::{Doorbell, Due};

/// Why held events were dropped.  Every drop has one, and is counted
/// under it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Reason {
    /// The queue was full (its `spool_size`): the oldest made room.
    Overflow = 0,
    /// Older than `spool_max_age`.
    Age = 1,
    /// The module's shared-memory budget was spent.
    Budget = 2,
    /// The subscription was unsubscribed or expired with events held.
    Unsubscribed = 3,
    /// OpenSIPS shut down with events held.
    Shutdown = 4,
}

impl Reason {
    pub const COUNT: usize = 5;
    pub const ALL: [Reason; Reason::COUNT] = [
        Reason::Overflow,
        Reason::Age,
        Reason::Budget,
        Reason::Unsubscribed,
        Reason::Shutdown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reason::Overflow => "queue full",
            Reason::Age => "too old",
            Reason::Budget => "memory budget spent",
            Reason::Unsubscribed => "unsubscribed",
            Reason::Shutdown => "shutdown",
        }
    }

    /// Drops that come one by one while the queue lives, and so are
    /// gathered into episodes; an unsubscribe or a shutdown drops its
    /// events at once and is logged at once, with its count.
    pub fn episodic(self) -> bool {
        matches!(self, Reason::Overflow | Reason::Age | Reason::Budget)
    }

    fn index(self) -> usize {
        self as usize
    }
}
