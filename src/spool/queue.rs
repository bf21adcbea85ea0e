//! One queue of held events: a FIFO with at most one event in flight.
//!
//! The events are owned values of the module's ([`Held`]: a reference to
//! the event's copy in shared memory), kept in a [`Fifo`] the module
//! provides (an intrusive list through the copies' blocks, so an empty
//! queue costs a few words, and nothing is reserved up front for
//! `spool_size` events).  Each held event is charged to the [`Budget`].
//!
//! The life of a held event:
//!
//! 1. [`Queue::push`]: the raise path offers an event every subscriber
//!    failed ([`Enter::Failed`]), or a live event raised while the queue
//!    holds others ([`Enter::Behind`]: it goes to the tail rather than past
//!    them).  The queue puts it at the tail, or refuses it; making room
//!    drops the oldest.
//! 2. [`Queue::begin`]: the replay process leases the head: it is now in
//!    flight, and no other lease is given until it is settled.  The head
//!    stays queued (and is never dropped to make room) while in flight.
//! 3. [`Queue::finish`], with the lease's token, once the attempt is over
//!    (at once for synchronous transports, in the report for asynchronous
//!    ones, in whatever process): delivered, it leaves the queue; failed,
//!    it stays at the head for the next try.
//!
//! What leaves the queue is handed back to be dropped (freed) after the
//! lock is released.  The counters keep `spooled == replayed + dropped +
//! held` whenever the lock is free.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use super::budget::Budget;
use super::config::Limits;
use super::episode::Episodes;
use super::lock::{Mutex, critical};
use super::{Reason, wake::Due};

/// What the queue needs to know of a held event, fixed when it is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Bytes of shared memory it holds, charged to the budget.
    pub bytes: u64,
    /// When it was made, ms on the clock all processes share.
    pub born_ms: u64,
}

/// A held event, owned by the queue.
pub trait Held {
    /// What a lease carries to the attempt (one more reference to it).
    type Event: Clone;
    fn meta(&self) -> Meta;
    fn event(&self) -> Self::Event;
    /// An attempt is leased it (`true`), or failed it (`false`): a
    /// persisted event says so, under the lock.
    fn leased(&self, _leased: bool) {}
}

/// The queue's storage: first in, first out, plus taking out the second
/// (the oldest droppable while the head is in flight).
pub trait Fifo: Default {
    type Item: Held;
    fn push_back(&mut self, item: Self::Item);
    /// The item at 0 (the head) or 1.
    fn get(&self, at: usize) -> Option<&Self::Item>;
    /// Take out the item at 0 or 1.
    fn remove(&mut self, at: usize) -> Option<Self::Item>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How an event comes to the spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enter {
    /// Every subscriber failed it: hold it.
    Failed,
    /// A live event, raised while the queue held others: it goes behind
    /// them.  If the queue emptied meanwhile it is not taken
    /// ([`Entry::Empty`]) and the raise delivers it live.
    Behind,
}

/// What became of a pushed event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Held at the tail.  `first`: the queue was empty before (a new
    /// outage: ring the replay process's doorbell, log it once).
    Queued { first: bool },
    /// Not held, and counted dropped.
    Dropped(Reason),
    /// [`Enter::Behind`] on a queue that had emptied: not counted; the
    /// caller delivers it live.
    Empty,
}

/// The result of [`Queue::push`].
#[must_use = "dropped events are freed when dropped: outside the lock"]
pub struct Push<F: Fifo> {
    pub entry: Entry,
    /// Older events dropped to make room.
    pub evicted: F,
    /// The event itself, when it was not queued.
    pub back: Option<F::Item>,
}

impl<F: Fifo> Push<F> {
    /// Events this push counted dropped (for the `events_dropped` statistic).
    pub fn dropped(&self) -> u64 {
        self.evicted.len() as u64 + u64::from(matches!(self.entry, Entry::Dropped(_)))
    }
}

/// The head, leased to one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease<I> {
    /// Names this attempt to [`Queue::finish`]; an asynchronous chain
    /// keeps it in shared memory with the event.
    pub token: u64,
    pub event: I,
}

/// The result of [`Queue::begin`].
#[must_use = "a lease must be finished"]
pub struct Begin<F: Fifo> {
    /// None: nothing to try (empty, closed, or already in flight).
    pub lease: Option<Lease<<F::Item as Held>::Event>>,
    /// Events too old to replay, dropped first.
    pub expired: F,
}

/// The result of [`Queue::finish`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a settled event is freed when dropped: outside the lock"]
pub enum Finish<I> {
    /// Delivered: out of the queue.  `drained`: the queue is empty now
    /// (the outage is over: log it once).
    Delivered { free: I, drained: bool },
    /// Failed: still the head, tried again from `retry_at_ms` on.
    Retry { retry_at_ms: u64 },
    /// Failed, and the queue was closed meanwhile: out, counted dropped
    /// (unsubscribed).
    Dropped { free: I },
    /// Not this queue's lease in flight (settled already): nothing done.
    Stale,
}

/// The result of [`Queue::close`].
#[must_use = "dropped events are freed when dropped: outside the lock"]
pub struct Close<F> {
    /// Every held event but the one in flight, counted dropped.
    pub evicted: F,
    /// One event is in flight: its [`Queue::finish`] will settle it.
    pub in_flight: bool,
}

/// What the operator sees of one queue (MI).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct View {
    pub held: u32,
    pub bytes: u64,
    /// Age of the oldest held event, when one is held.
    pub oldest_ms: Option<u64>,
    /// How long the head has been in flight, when it is.
    pub in_flight_ms: Option<u64>,
    /// Retried not before this (ms on the shared clock), when events are held.
    pub retry_at_ms: Option<u64>,
    pub spooled: u64,
    pub replayed: u64,
    pub dropped: [u64; Reason::COUNT],
}

impl View {
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

/// An operator's retry (MI): none, the next event, or all until one fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
enum Force {
    #[default]
    None,
    One,
    All,
}

/// Everything but `held` and the episodes: plain data, behind the lock.
#[derive(Default)]
struct State<F> {
    fifo: F,
    closed: bool,
    force: Force,
    bytes: u64,
    /// The lease in flight, 0 when none.
    token: u64,
    /// Last token given; tokens are never reused.
    seq: u64,
    in_flight_since: u64,
    retry_at: u64,
    spooled: u64,
    replayed: u64,
    dropped: [u64; Reason::COUNT],
    /// Fixed when the subscription is made.
    limits: Limits,
}

/// One queue, in shared memory.
pub struct Queue<F> {
    /// Events queued, the one in flight included: written under the lock,
    /// read without it by the raise path.
    held: AtomicU32,
    state: Mutex<State<F>>,
    episodes: Episodes,
}

impl<F: Fifo> Queue<F> {
    pub fn new(limits: Limits) -> Queue<F> {
        let limits = Limits {
            retry_ms: limits.retry_ms.max(1),
            ..limits
        };
        Queue {
            held: AtomicU32::new(0),
            state: Mutex::new(State {
                limits,
                ..State::default()
            }),
            episodes: Episodes::default(),
        }
    }

    /// Events held, without the lock: the raise path's only cost while the
    /// queue is empty.  A stale answer is harmless: [`Enter::Behind`]
    /// checks again under the lock.
    pub fn held(&self) -> u32 {
        self.held.load(Relaxed)
    }

    pub fn limits(&self) -> Limits {
        self.with(|s| s.limits)
    }

    /// The drops not yet logged, for the replay process to poll.
    pub fn episodes(&self) -> &Episodes {
        &self.episodes
    }

    /// Under the lock; `held` follows the FIFO.
    fn with<R>(&self, f: impl FnOnce(&mut State<F>) -> R) -> R {
        critical(&self.state, |s| {
            let r = f(s);
            self.held.store(s.fifo.len() as u32, Relaxed);
            r
        })
    }

    /// Hold `event`, at the tail.  Room is made by dropping the oldest
    /// events that are not in flight: first those older than the maximum
    /// age, then one if the queue is full, then as many as the budget
    /// needs.  If no room can be made the new event is dropped (and
    /// handed back in `evicted`).
    pub fn push(&self, event: F::Item, enter: Enter, budget: &Budget, now_ms: u64) -> Push<F> {
        let mut evicted = F::default();
        let mut back = None;
        let entry = self.with(|s| {
            if enter == Enter::Behind && s.fifo.is_empty() && !s.closed {
                back = Some(event);
                return Entry::Empty;
            }
            s.spooled += 1;
            let bytes = event.meta().bytes;
            if let Err(reason) = self.make_room(s, budget, bytes, now_ms, &mut evicted) {
                self.count_dropped(s, reason, now_ms);
                back = Some(event);
                return Entry::Dropped(reason);
            }
            let first = s.fifo.is_empty();
            s.fifo.push_back(event);
            s.bytes += bytes;
            budget.held_add(1);
            if first {
                // a new outage: every subscriber has just failed this
                // event, so its first replay waits at least retry_ms
                s.retry_at = now_ms.saturating_add(s.limits.retry_ms);
            }
            Entry::Queued { first }
        });
        Push {
            entry,
            evicted,
            back,
        }
    }

    /// Lease the head to one attempt, unless the queue is empty, closed or
    /// has one in flight.  Events past the maximum age are dropped first:
    /// an event too old to keep is not replayed either.
    pub fn begin(&self, budget: &Budget, now_ms: u64) -> Begin<F> {
        let mut expired = F::default();
        let lease = self.with(|s| {
            if s.closed || s.token != 0 {
                return None;
            }
            self.expire_locked(s, budget, now_ms, &mut expired);
            let head = s.fifo.get(0)?;
            head.leased(true);
            let event = head.event();
            s.seq += 1;
            s.token = s.seq;
            s.in_flight_since = now_ms;
            // a retry of one event is spent once it is tried
            if s.force == Force::One {
                s.force = Force::None;
            }
            Some(Lease {
                token: s.token,
                event,
            })
        });
        Begin { lease, expired }
    }

    /// Settle the attempt `token` leased: once.  A second call, or one for
    /// an older lease, is [`Finish::Stale`] and changes nothing.
    pub fn finish(
        &self,
        token: u64,
        delivered: bool,
        budget: &Budget,
        now_ms: u64,
    ) -> Finish<F::Item> {
        self.with(|s| {
            if token == 0 || s.token != token {
                return Finish::Stale;
            }
            s.token = 0;
            if delivered || s.closed {
                let Some(free) = self.take(s, budget, 0) else {
                    return Finish::Stale;
                };
                if delivered {
                    s.replayed += 1;
                    let drained = s.fifo.is_empty();
                    if drained {
                        s.force = Force::None;
                    }
                    return Finish::Delivered { free, drained };
                }
                self.count_dropped(s, Reason::Unsubscribed, now_ms);
                return Finish::Dropped { free };
            }
            // a forced retry ends at the first failure: the subscribers'
            // windows rule again
            s.force = Force::None;
            s.retry_at = now_ms.saturating_add(s.limits.retry_ms);
            if let Some(head) = s.fifo.get(0) {
                head.leased(false);
            }
            Finish::Retry {
                retry_at_ms: s.retry_at,
            }
        })
    }

    /// Drop the events past the maximum age (the replay process's sweep,
    /// so that a queue nobody replays still ages out).
    pub fn expire(&self, budget: &Budget, now_ms: u64) -> F {
        let mut run = F::default();
        self.with(|s| self.expire_locked(s, budget, now_ms, &mut run));
        run
    }

    /// The subscription is going (unsubscribe, expiry): every event not
    /// in flight is dropped, and from now on nothing is taken or leased.
    /// The one in flight is dropped or counted replayed by its
    /// [`Queue::finish`].
    pub fn close(&self, budget: &Budget, now_ms: u64) -> Close<F> {
        let mut evicted = F::default();
        let in_flight = self.with(|s| {
            s.closed = true;
            while self.evict_front(s, budget, Reason::Unsubscribed, now_ms, &mut evicted) {}
            s.force = Force::None;
            s.token != 0
        });
        Close { evicted, in_flight }
    }

    /// The operator's retry (MI): the next event (`all` false) or every
    /// event until one fails, now, whatever the subscribers' windows.
    /// False when there is nothing to retry.
    pub fn retry_now(&self, all: bool) -> bool {
        self.with(|s| {
            if s.fifo.is_empty() || s.closed {
                return false;
            }
            s.force = s.force.max(if all { Force::All } else { Force::One });
            true
        })
    }

    /// What [`super::wake::due_at`] needs.
    pub fn due(&self) -> Due {
        self.with(|s| Due {
            held: s.fifo.len() as u32,
            in_flight: s.token != 0,
            closed: s.closed,
            retry_at_ms: s.retry_at,
            forced: s.force != Force::None,
        })
    }

    /// The operator's view.
    pub fn view(&self, now_ms: u64) -> View {
        self.with(|s| View {
            held: s.fifo.len() as u32,
            bytes: s.bytes,
            oldest_ms: s
                .fifo
                .get(0)
                .map(|h| now_ms.saturating_sub(h.meta().born_ms)),
            in_flight_ms: (s.token != 0).then(|| now_ms.saturating_sub(s.in_flight_since)),
            retry_at_ms: (!s.fifo.is_empty()).then_some(s.retry_at),
            spooled: s.spooled,
            replayed: s.replayed,
            dropped: s.dropped,
        })
    }

    // ---- under the lock --------------------------------------------------

    fn count_dropped(&self, s: &mut State<F>, reason: Reason, now_ms: u64) {
        s.dropped[reason as usize] += 1;
        // an unsubscribe drops its events at once, and is logged at once
        if reason != Reason::Unsubscribed {
            self.episodes.record(reason, 1, now_ms);
        }
    }

    /// Room for an event of `bytes`, or why there is none.
    fn make_room(
        &self,
        s: &mut State<F>,
        budget: &Budget,
        bytes: u64,
        now_ms: u64,
        run: &mut F,
    ) -> Result<(), Reason> {
        if s.closed {
            return Err(Reason::Unsubscribed);
        }
        if s.limits.capacity == 0 {
            return Err(Reason::Overflow);
        }
        self.expire_locked(s, budget, now_ms, run);
        if s.fifo.len() >= s.limits.capacity as usize
            && !self.evict_front(s, budget, Reason::Overflow, now_ms, run)
        {
            // full of one event in flight: the newest is the one to go
            return Err(Reason::Overflow);
        }
        // drop nothing for an event that cannot fit even if this queue
        // gave up everything it may
        let in_flight_bytes = match (s.token != 0, s.fifo.get(0)) {
            (true, Some(h)) => h.meta().bytes,
            _ => 0,
        };
        let others = budget.used().saturating_sub(s.bytes - in_flight_bytes);
        if others.saturating_add(bytes) > budget.limit() {
            return Err(Reason::Budget);
        }
        while !budget.try_charge(bytes) {
            if !self.evict_front(s, budget, Reason::Budget, now_ms, run) {
                return Err(Reason::Budget);
            }
        }
        Ok(())
    }

    fn expire_locked(&self, s: &mut State<F>, budget: &Budget, now_ms: u64, run: &mut F) {
        let max_age = s.limits.max_age_ms;
        if max_age == 0 {
            return;
        }
        while let Some(h) = s.fifo.get(usize::from(s.token != 0)) {
            if now_ms.saturating_sub(h.meta().born_ms) < max_age {
                break;
            }
            self.evict_front(s, budget, Reason::Age, now_ms, run);
        }
    }

    /// Drop the oldest droppable event (the head, or the one after it
    /// while the head is in flight) into `run`; false when there is none.
    fn evict_front(
        &self,
        s: &mut State<F>,
        budget: &Budget,
        reason: Reason,
        now_ms: u64,
        run: &mut F,
    ) -> bool {
        let at = usize::from(s.token != 0);
        match self.take(s, budget, at) {
            Some(victim) => {
                run.push_back(victim);
                self.count_dropped(s, reason, now_ms);
                true
            }
            None => false,
        }
    }

    /// Take the event at 0 or 1 out of the FIFO, the counts and the budget.
    fn take(&self, s: &mut State<F>, budget: &Budget, at: usize) -> Option<F::Item> {
        let h = s.fifo.remove(at)?;
        let bytes = h.meta().bytes;
        s.bytes -= bytes;
        budget.release(bytes);
        budget.held_sub(1);
        Some(h)
    }
}
