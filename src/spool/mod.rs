//! The spool: where the events every subscriber failed wait for a
//! subscriber to come back, in order and within bounds (issue 10).
//!
//! This is the pure core.  It decides; the module allocates, frees and
//! calls transports.  A held event is an owned value of the module's
//! ([`Held`]), kept in a [`Fifo`] of the module's, so nothing here touches
//! a pointer.  A [`Queue`] sits in the virtual socket's shared-memory
//! block: its state is plain data behind a cross-process [`lock::Mutex`]
//! (held for O(1) moves, never across a transport call, an allocation or a
//! log line), and only its `held` count is an atomic the raise path reads
//! without the lock.  One [`Budget`] and one [`Doorbell`] serve the module.
//!
//! - [`config`]: the modparams and the per-subscription `SPOOL(...)` token.
//! - [`queue`]: the FIFO, its in-flight token and its drop rules.
//! - [`budget`]: the module-wide shared-memory budget.
//! - [`wake`]: when the replay process tries a queue next, and its doorbell.
//! - [`episode`]: drops are logged once per episode, with a count.
//! - [`replay`]: one round of the replay process.
//! - [`durable`]: held events in restart-persistent memory (issue 17).
//! - [`lock`]: the spinlock that works across processes, and what a panic
//!   under it does.

#![deny(unsafe_code)]

pub mod budget;
pub mod config;
pub mod durable;
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
pub use queue::{Begin, Close, Enter, Entry, Fifo, Finish, Held, Lease, Meta, Push, Queue, View};
pub use replay::{Attempted, Replayer, Tally};
pub use wake::{Doorbell, Due};

/// Why held events were dropped.  Every drop has one, and is counted
/// under it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The queue was full (its `spool_size`): the oldest made room.
    Overflow,
    /// Older than `spool_max_age`.
    Age,
    /// The module's shared-memory budget was spent.
    Budget,
    /// The subscription was unsubscribed or expired with events held.
    Unsubscribed,
}

impl Reason {
    pub const COUNT: usize = 4;
    pub const ALL: [Reason; Reason::COUNT] = [
        Reason::Overflow,
        Reason::Age,
        Reason::Budget,
        Reason::Unsubscribed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reason::Overflow => "queue full",
            Reason::Age => "too old",
            Reason::Budget => "memory budget spent",
            Reason::Unsubscribed => "unsubscribed",
        }
    }
}
