//! One queue of held events: a FIFO with at most one event in flight.
//!
//! The queue is an intrusive singly linked list: each held event's block
//! (owned by the FFI layer) carries the link to the next one, reached
//! through [`Nodes`].  So an empty queue costs a few words in the virtual
//! socket's block, and a held event costs what it holds, charged to the
//! [`Budget`]; nothing is reserved up front for `spool_size` events.
//!
//! The life of a held event:
//!
//! 1. [`Queue::push`]: the raise path made a shm copy of an event every
//!    subscriber failed ([`Enter::Failed`]), or of a live event raised
//!    while the queue held others ([`Enter::Behind`]: it goes to the tail
//!    rather than past them).  The queue links it at the tail, or refuses
//!    it; making room drops the oldest.
//! 2. [`Queue::begin`]: the replay process leases the head: it is now in
//!    flight, and no other lease is given until it is settled.  The head
//!    stays linked (and is never dropped to make room) while in flight.
//! 3. [`Queue::finish`], with the lease's token, once the attempt is over
//!    (at once for synchronous transports, in the report for asynchronous
//!    ones, in whatever process): delivered, it is unlinked and given back
//!    to be freed; failed, it stays at the head for the next try.
//!
//! Whatever the queue unlinks is handed back to the caller to free after
//! the lock is released: a [`Run`] of dropped events, or a single handle.
//! Counters keep `spooled == replayed + dropped + held` at every moment
//! the lock is free.

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use super::budget::Budget;
use super::config::Limits;
use super::episode::Episodes;
use super::lock::{Guard, RawLock, SpinLock};
use super::{Reason, wake::Due};

/// A held event, as the FFI layer names it (for example the address of its
/// shm block).  Never 0, so that 0 can mean "none" in a shared word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(NonZeroU64);

impl Handle {
    pub fn new(raw: u64) -> Option<Handle> {
        NonZeroU64::new(raw).map(Handle)
    }

    pub fn get(self) -> u64 {
        self.0.get()
    }

    fn from_word(raw: u64) -> Option<Handle> {
        Handle::new(raw)
    }

    fn word(h: Option<Handle>) -> u64 {
        h.map_or(0, Handle::get)
    }
}

/// What the queue needs to know of a held event, fixed when it is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Bytes of shared memory it holds, charged to the budget.
    pub bytes: u64,
    /// When it entered the spool, ms on the clock all processes share.
    pub born_ms: u64,
}

/// The held events' headers, which the FFI layer keeps in their shm
/// blocks.  The queue calls these only under its lock, or on events it has
/// unlinked and handed back, so the FFI layer's header needs no atomics of
/// its own beyond what makes the link visible across processes (the lock
/// orders it).
pub trait Nodes {
    fn next(&self, h: Handle) -> Option<Handle>;
    fn set_next(&self, h: Handle, next: Option<Handle>);
    fn meta(&self, h: Handle) -> Meta;
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
    /// Not held, and counted dropped: the caller frees it.
    Dropped(Reason),
    /// [`Enter::Behind`] on a queue that had emptied: not counted; the
    /// caller delivers it live and frees its copy.
    Empty,
}

/// The result of [`Queue::push`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "dropped events must be freed"]
pub struct Push {
    pub entry: Entry,
    /// Older events dropped to make room: the caller frees them.
    pub evicted: Run,
}

impl Push {
    /// Events this push counted dropped (for the `events_dropped` statistic).
    pub fn dropped(&self) -> u64 {
        u64::from(self.evicted.len()) + u64::from(matches!(self.entry, Entry::Dropped(_)))
    }
}

/// Events unlinked together, oldest first: `len` events from `first`,
/// following their links.  They are contiguous in the queue they came
/// from, and nobody links them again, so their links still lead from one
/// to the next after they are unlinked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use = "dropped events must be freed"]
pub struct Run {
    first: Option<Handle>,
    len: u32,
    bytes: u64,
}

impl Run {
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Hand every event of the run to `free`, oldest first.  Each link is
    /// read before its event is freed.  Call it without the queue's lock.
    pub fn drain<N: Nodes>(self, nodes: &N, mut free: impl FnMut(Handle)) {
        let mut at = self.first;
        for _ in 0..self.len {
            let Some(h) = at else { break };
            at = nodes.next(h);
            free(h);
        }
    }

    fn add(&mut self, h: Handle, bytes: u64) {
        if self.first.is_none() {
            self.first = Some(h);
        }
        self.len += 1;
        self.bytes += bytes;
    }
}

/// The head, leased to one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Names this attempt to [`Queue::finish`]; an asynchronous chain
    /// keeps it in shared memory with its copy of the event.
    pub token: u64,
    pub handle: Handle,
    pub meta: Meta,
}

/// The result of [`Queue::begin`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a lease must be finished and expired events freed"]
pub struct Begin {
    /// None: nothing to try (empty, closed, or already in flight).
    pub lease: Option<Lease>,
    /// Events too old to replay, dropped first: the caller frees them.
    pub expired: Run,
}

/// The result of [`Queue::finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a settled event must be freed"]
pub enum Finish {
    /// Delivered: unlinked, the caller frees it.  `drained`: the queue is
    /// empty now (the outage is over: log it once).
    Delivered { free: Handle, drained: bool },
    /// Failed: still the head, tried again from `retry_at_ms` on.
    Retry { retry_at_ms: u64 },
    /// Failed, and the queue was closed meanwhile: unlinked and counted
    /// dropped; the caller frees it.
    Dropped { free: Handle, reason: Reason },
    /// Not this queue's lease in flight (settled already): nothing done.
    Stale,
}

/// The result of [`Queue::close`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "dropped events must be freed"]
pub struct Close {
    /// Every held event but the one in flight, counted dropped.
    pub evicted: Run,
    /// One event is in flight: its [`Queue::finish`] will give it back.
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

const FORCE_NONE: u32 = 0;
const FORCE_ONE: u32 = 1;
const FORCE_ALL: u32 = 2;

/// One queue, in shared memory.  Its links change only under `lock`;
/// `held` is also read without it.
#[derive(Debug)]
#[repr(C)]
pub struct Queue<L: RawLock = SpinLock> {
    lock: L,
    /// Events linked, the one in flight included.
    held: AtomicU32,
    /// 0 while open, else 1 + the [`Reason`] it was closed for.
    closed: AtomicU32,
    /// A retry asked for by the operator: none, one event, all.
    force: AtomicU32,
    head: AtomicU64,
    tail: AtomicU64,
    bytes: AtomicU64,
    /// The lease in flight, 0 when none.
    token: AtomicU64,
    /// Last token given; tokens are never reused.
    seq: AtomicU64,
    in_flight_since: AtomicU64,
    retry_at: AtomicU64,
    spooled: AtomicU64,
    replayed: AtomicU64,
    dropped: [AtomicU64; Reason::COUNT],
    episodes: Episodes,
    // fixed when the subscription is made
    capacity: u32,
    max_age_ms: u64,
    retry_ms: u64,
}

impl<L: RawLock + Default> Queue<L> {
    pub fn new(limits: Limits) -> Queue<L> {
        Queue {
            lock: L::default(),
            held: AtomicU32::new(0),
            closed: AtomicU32::new(0),
            force: AtomicU32::new(FORCE_NONE),
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            token: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            in_flight_since: AtomicU64::new(0),
            retry_at: AtomicU64::new(0),
            spooled: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            dropped: Default::default(),
            episodes: Episodes::default(),
            capacity: limits.capacity,
            max_age_ms: limits.max_age_ms,
            retry_ms: limits.retry_ms.max(1),
        }
    }
}

impl<L: RawLock> Queue<L> {
    /// Events held, without the lock: the raise path's only cost while the
    /// queue is empty.  A stale answer is harmless: [`Enter::Behind`]
    /// checks again under the lock.
    pub fn held(&self) -> u32 {
        self.held.load(Relaxed)
    }

    pub fn limits(&self) -> Limits {
        Limits {
            capacity: self.capacity,
            max_age_ms: self.max_age_ms,
            retry_ms: self.retry_ms,
        }
    }

    /// The drops not yet logged, for the replay process to poll.
    pub fn episodes(&self) -> &Episodes {
        &self.episodes
    }

    /// Hold event `h`, at the tail.  Room is made by dropping the oldest
    /// events that are not in flight: first those older than the maximum
    /// age, then one if the queue is full, then as many as the budget
    /// needs.  If no room can be made the new event is dropped.
    pub fn push<N: Nodes>(
        &self,
        h: Handle,
        enter: Enter,
        nodes: &N,
        budget: &Budget,
        now_ms: u64,
    ) -> Push {
        let _g = Guard::new(&self.lock);
        let mut evicted = Run::default();
        let held = self.held.load(Relaxed);
        if enter == Enter::Behind && held == 0 && self.closed_for().is_none() {
            return Push {
                entry: Entry::Empty,
                evicted,
            };
        }
        self.spooled.fetch_add(1, Relaxed);
        let entry = match self.make_room(nodes, budget, nodes.meta(h), now_ms, &mut evicted) {
            Err(reason) => {
                self.count_dropped(reason, 1, now_ms);
                Entry::Dropped(reason)
            }
            Ok(()) => {
                let meta = nodes.meta(h);
                nodes.set_next(h, None);
                match self.tail() {
                    Some(t) => nodes.set_next(t, Some(h)),
                    None => self.head.store(h.get(), Relaxed),
                }
                self.tail.store(h.get(), Relaxed);
                let first = self.held.fetch_add(1, Relaxed) == 0;
                self.bytes.fetch_add(meta.bytes, Relaxed);
                budget.held_add(1);
                if first {
                    // a new outage: every subscriber has just failed this
                    // event, so its first replay waits at least retry_ms
                    self.retry_at
                        .store(now_ms.saturating_add(self.retry_ms), Relaxed);
                }
                Entry::Queued { first }
            }
        };
        Push { entry, evicted }
    }

    /// Lease the head to one attempt, unless the queue is empty, closed or
    /// has one in flight.  Events past the maximum age are dropped first:
    /// an event too old to keep is not replayed either.
    pub fn begin<N: Nodes>(&self, nodes: &N, budget: &Budget, now_ms: u64) -> Begin {
        let _g = Guard::new(&self.lock);
        let mut expired = Run::default();
        if self.closed_for().is_some() || self.in_flight() {
            return Begin {
                lease: None,
                expired,
            };
        }
        self.expire_locked(nodes, budget, now_ms, &mut expired);
        let lease = self.head().map(|handle| {
            let token = self.seq.fetch_add(1, Relaxed) + 1;
            self.token.store(token, Relaxed);
            self.in_flight_since.store(now_ms, Relaxed);
            // a retry of one event is spent once it is tried
            let _ = self
                .force
                .compare_exchange(FORCE_ONE, FORCE_NONE, Relaxed, Relaxed);
            Lease {
                token,
                handle,
                meta: nodes.meta(handle),
            }
        });
        Begin { lease, expired }
    }

    /// Settle the attempt `token` leased: once.  A second call, or one for
    /// an older lease, is [`Finish::Stale`] and changes nothing.
    pub fn finish<N: Nodes>(
        &self,
        token: u64,
        delivered: bool,
        nodes: &N,
        budget: &Budget,
        now_ms: u64,
    ) -> Finish {
        let _g = Guard::new(&self.lock);
        if token == 0 || self.token.load(Relaxed) != token {
            return Finish::Stale;
        }
        self.token.store(0, Relaxed);
        let Some(head) = self.head() else {
            debug_assert!(false, "a lease on an empty queue");
            return Finish::Stale;
        };
        if delivered {
            self.unlink_head(nodes, budget, head);
            self.replayed.fetch_add(1, Relaxed);
            let drained = self.held.load(Relaxed) == 0;
            if drained {
                self.force.store(FORCE_NONE, Relaxed);
            }
            return Finish::Delivered {
                free: head,
                drained,
            };
        }
        if let Some(reason) = self.closed_for() {
            self.unlink_head(nodes, budget, head);
            self.count_dropped(reason, 1, now_ms);
            return Finish::Dropped { free: head, reason };
        }
        // a forced retry ends at the first failure: the subscribers'
        // windows rule again
        self.force.store(FORCE_NONE, Relaxed);
        let at = now_ms.saturating_add(self.retry_ms);
        self.retry_at.store(at, Relaxed);
        Finish::Retry { retry_at_ms: at }
    }

    /// Drop the events past the maximum age (the replay process's sweep,
    /// so that a queue nobody replays still ages out).
    pub fn expire<N: Nodes>(&self, nodes: &N, budget: &Budget, now_ms: u64) -> Run {
        let _g = Guard::new(&self.lock);
        let mut run = Run::default();
        self.expire_locked(nodes, budget, now_ms, &mut run);
        run
    }

    /// The subscription is going (unsubscribe, expiry: [`Reason::Unsubscribed`];
    /// shutdown: [`Reason::Shutdown`]): every event not in flight is
    /// dropped, and from now on nothing is taken or leased.  The one in
    /// flight is dropped or counted replayed by its [`Queue::finish`].
    pub fn close<N: Nodes>(
        &self,
        reason: Reason,
        nodes: &N,
        budget: &Budget,
        now_ms: u64,
    ) -> Close {
        let _g = Guard::new(&self.lock);
        let mut evicted = Run::default();
        if self.closed_for().is_none() {
            self.closed.store(reason as u32 + 1, Relaxed);
        }
        let reason = self.closed_for().unwrap_or(reason);
        while self.evict_front(nodes, budget, reason, now_ms, &mut evicted) {}
        self.force.store(FORCE_NONE, Relaxed);
        Close {
            evicted,
            in_flight: self.in_flight(),
        }
    }

    /// The operator's retry (MI): the next event (`all` false) or every
    /// event until one fails, now, whatever the subscribers' windows.
    /// False when there is nothing to retry.
    pub fn retry_now(&self, all: bool) -> bool {
        let _g = Guard::new(&self.lock);
        if self.held.load(Relaxed) == 0 || self.closed_for().is_some() {
            return false;
        }
        let want = if all { FORCE_ALL } else { FORCE_ONE };
        self.force.fetch_max(want, Relaxed);
        true
    }

    /// What [`super::wake::due_at`] needs, without the lock (a stale
    /// figure only moves a wake-up; [`Queue::begin`] decides under it).
    pub fn due(&self) -> Due {
        Due {
            held: self.held.load(Relaxed),
            in_flight: self.in_flight(),
            closed: self.closed_for().is_some(),
            retry_at_ms: self.retry_at.load(Relaxed),
            forced: self.force.load(Relaxed) != FORCE_NONE,
        }
    }

    /// The operator's view; under the lock, since it reads the head.
    pub fn view<N: Nodes>(&self, nodes: &N, now_ms: u64) -> View {
        let _g = Guard::new(&self.lock);
        let held = self.held.load(Relaxed);
        let head = self.head();
        View {
            held,
            bytes: self.bytes.load(Relaxed),
            oldest_ms: head.map(|h| now_ms.saturating_sub(nodes.meta(h).born_ms)),
            in_flight_ms: self
                .in_flight()
                .then(|| now_ms.saturating_sub(self.in_flight_since.load(Relaxed))),
            retry_at_ms: (held > 0).then(|| self.retry_at.load(Relaxed)),
            spooled: self.spooled.load(Relaxed),
            replayed: self.replayed.load(Relaxed),
            dropped: std::array::from_fn(|i| self.dropped[i].load(Relaxed)),
        }
    }

    // ---- under the lock --------------------------------------------------

    fn head(&self) -> Option<Handle> {
        Handle::from_word(self.head.load(Relaxed))
    }

    fn tail(&self) -> Option<Handle> {
        Handle::from_word(self.tail.load(Relaxed))
    }

    fn in_flight(&self) -> bool {
        self.token.load(Relaxed) != 0
    }

    fn closed_for(&self) -> Option<Reason> {
        match self.closed.load(Relaxed) {
            0 => None,
            r => Reason::ALL.get(r as usize - 1).copied(),
        }
    }

    fn count_dropped(&self, reason: Reason, n: u64, now_ms: u64) {
        self.dropped[reason.index()].fetch_add(n, Relaxed);
        if reason.episodic() {
            self.episodes.record(reason, n, now_ms);
        }
    }

    /// The oldest event that may be dropped: the head, or the one after it
    /// while the head is in flight.
    fn droppable(&self, nodes: &impl Nodes) -> Option<Handle> {
        let head = self.head()?;
        if self.in_flight() {
            nodes.next(head)
        } else {
            Some(head)
        }
    }

    /// Room for an event of `meta.bytes`, or why there is none.
    fn make_room<N: Nodes>(
        &self,
        nodes: &N,
        budget: &Budget,
        meta: Meta,
        now_ms: u64,
        run: &mut Run,
    ) -> Result<(), Reason> {
        if let Some(reason) = self.closed_for() {
            return Err(reason);
        }
        if self.capacity == 0 {
            return Err(Reason::Overflow);
        }
        self.expire_locked(nodes, budget, now_ms, run);
        if self.held.load(Relaxed) >= self.capacity
            && !self.evict_front(nodes, budget, Reason::Overflow, now_ms, run)
        {
            // full of one event in flight: the newest is the one to go
            return Err(Reason::Overflow);
        }
        // drop nothing for an event that cannot fit even if this queue
        // gave up everything it may
        let in_flight_bytes = match (self.in_flight(), self.head()) {
            (true, Some(h)) => nodes.meta(h).bytes,
            _ => 0,
        };
        let freeable = self.bytes.load(Relaxed) - in_flight_bytes;
        let others = budget.used().saturating_sub(freeable);
        if others.saturating_add(meta.bytes) > budget.limit() {
            return Err(Reason::Budget);
        }
        while !budget.try_charge(meta.bytes) {
            if !self.evict_front(nodes, budget, Reason::Budget, now_ms, run) {
                return Err(Reason::Budget);
            }
        }
        Ok(())
    }

    fn expire_locked<N: Nodes>(&self, nodes: &N, budget: &Budget, now_ms: u64, run: &mut Run) {
        if self.max_age_ms == 0 {
            return;
        }
        while let Some(h) = self.droppable(nodes) {
            if now_ms.saturating_sub(nodes.meta(h).born_ms) < self.max_age_ms {
                break;
            }
            self.evict_front(nodes, budget, Reason::Age, now_ms, run);
        }
    }

    /// Drop the oldest droppable event into `run`; false when there is none.
    fn evict_front<N: Nodes>(
        &self,
        nodes: &N,
        budget: &Budget,
        reason: Reason,
        now_ms: u64,
        run: &mut Run,
    ) -> bool {
        let Some(victim) = self.droppable(nodes) else {
            return false;
        };
        let after = nodes.next(victim);
        // while the head is in flight the victim is the one after it, and
        // the head is its predecessor
        let before = if self.in_flight() { self.head() } else { None };
        match before {
            Some(b) => nodes.set_next(b, after),
            None => self.head.store(Handle::word(after), Relaxed),
        }
        if self.tail() == Some(victim) {
            self.tail.store(Handle::word(before), Relaxed);
        }
        let bytes = self.forget(budget, victim, nodes);
        run.add(victim, bytes);
        self.count_dropped(reason, 1, now_ms);
        true
    }

    fn unlink_head<N: Nodes>(&self, nodes: &N, budget: &Budget, head: Handle) {
        let after = nodes.next(head);
        self.head.store(Handle::word(after), Relaxed);
        if after.is_none() {
            self.tail.store(0, Relaxed);
        }
        self.forget(budget, head, nodes);
    }

    /// Take an unlinked event out of the counts and the budget.
    fn forget<N: Nodes>(&self, budget: &Budget, h: Handle, nodes: &N) -> u64 {
        let bytes = nodes.meta(h).bytes;
        self.held.fetch_sub(1, Relaxed);
        self.bytes.fetch_sub(bytes, Relaxed);
        budget.release(bytes);
        budget.held_sub(1);
        bytes
    }
}
