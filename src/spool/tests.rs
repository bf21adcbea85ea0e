//! The spool's invariants, over fake held events whose heap counts the
//! ones alive (a leak shows), in `VecDeque`s.
//!
//! - FIFO per queue; at most one event in flight; each lease settled once.
//! - Every event that entered is delivered or counted dropped, exactly
//!   once: `spooled == replayed + dropped + held` at every step, and every
//!   block is freed once.
//! - Room is made by dropping the oldest events not in flight.
//! - The budget is never exceeded, and is exactly what is held.
//! - The replay loop never retries faster than the windows and the floor
//!   allow while every subscriber is down.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;
use crate::policy::{Health, State, eligible_at};
use crate::spool::episode;
use crate::spool::queue::View;
use crate::spool::wake::{due_at, next_wake};

// ---- test doubles ----------------------------------------------------------

/// The module's held event, faked: a counted reference to a block with an
/// id; the heap counts the blocks alive, so a leak shows.
#[derive(Clone, Debug)]
struct Ev(Arc<Block>);

#[derive(Debug)]
struct Block {
    id: u64,
    meta: Meta,
    live: Arc<AtomicU64>,
}

impl Drop for Block {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Relaxed);
    }
}

impl Held for Ev {
    type Event = Ev;
    fn meta(&self) -> Meta {
        self.0.meta
    }
    fn event(&self) -> Ev {
        self.clone()
    }
}

impl PartialEq for Ev {
    fn eq(&self, o: &Ev) -> bool {
        self.id() == o.id()
    }
}
impl Eq for Ev {}

impl Ev {
    fn id(&self) -> u64 {
        self.0.id
    }
}

/// The queue's storage, as the module's `ShmList` behaves.
impl<T: Held> Fifo for VecDeque<T> {
    type Item = T;
    fn push_back(&mut self, item: T) {
        VecDeque::push_back(self, item)
    }
    fn get(&self, at: usize) -> Option<&T> {
        VecDeque::get(self, at)
    }
    fn remove(&mut self, at: usize) -> Option<T> {
        VecDeque::remove(self, at)
    }
    fn len(&self) -> usize {
        VecDeque::len(self)
    }
}

type Handle = u64;
type Q = Queue<VecDeque<Ev>>;

/// Makes held events, and counts those alive.
#[derive(Default)]
struct Heap {
    live: Arc<AtomicU64>,
    last: AtomicU64,
}

impl Heap {
    fn alloc(&self, bytes: u64, born_ms: u64) -> Ev {
        let id = self.last.fetch_add(1, Relaxed) + 1;
        self.live.fetch_add(1, Relaxed);
        Ev(Arc::new(Block {
            id,
            meta: Meta { bytes, born_ms },
            live: self.live.clone(),
        }))
    }
    fn live(&self) -> usize {
        self.live.load(Relaxed) as usize
    }
}

fn ids_of(f: &VecDeque<Ev>) -> Vec<Handle> {
    f.iter().map(Ev::id).collect()
}

fn limits(capacity: u32, max_age_ms: u64) -> Limits {
    Limits {
        capacity,
        max_age_ms,
        retry_ms: 1000,
    }
}

struct World {
    heap: Heap,
    budget: Budget,
    q: Q,
}

impl World {
    fn new(l: Limits, budget: u64) -> World {
        World {
            heap: Heap::default(),
            budget: Budget::new(budget),
            q: Queue::new(l),
        }
    }

    /// Push an event of `bytes`; its id and its entry.
    fn push(&self, bytes: u64, enter: Enter, now: u64) -> (Handle, Entry) {
        let h = self.heap.alloc(bytes, now);
        let id = h.id();
        let p = self.q.push(h, enter, &self.budget, now);
        assert_eq!(p.back.is_some(), !matches!(p.entry, Entry::Queued { .. }));
        (id, p.entry)
    }

    fn begin(&self, now: u64) -> Option<Lease<Ev>> {
        self.q.begin(&self.budget, now).lease
    }

    fn finish(&self, token: u64, ok: bool, now: u64) -> Finish<Ev> {
        self.q.finish(token, ok, &self.budget, now)
    }

    /// Finish a live lease, whatever became of it.
    fn settle(&self, token: u64, ok: bool, now: u64) {
        assert_ne!(self.finish(token, ok, now), Finish::Stale);
    }

    /// Replay everything that is held, in order; the ids delivered.
    fn drain_all(&self, now: u64) -> Vec<Handle> {
        let mut out = vec![];
        while let Some(l) = self.begin(now) {
            out.push(l.event.id());
            assert!(matches!(
                self.finish(l.token, true, now),
                Finish::Delivered { .. }
            ));
        }
        out
    }

    fn view(&self) -> View {
        self.q.view(0)
    }

    fn conserved(&self) {
        let v = self.view();
        assert_eq!(
            v.spooled,
            v.replayed + v.dropped_total() + u64::from(v.held),
            "{v:?}"
        );
    }
}

// ---- the queue, case by case ---------------------------------------------

#[test]
fn replays_in_order_and_says_when_drained() {
    let w = World::new(limits(10, 0), 1 << 20);
    let pushed: Vec<Handle> = (0..5)
        .map(|i| {
            let (h, e) = w.push(10, Enter::Failed, i);
            assert_eq!(e, Entry::Queued { first: i == 0 });
            h
        })
        .collect();
    assert_eq!(w.q.held(), 5);
    let mut got = vec![];
    loop {
        let l = w.begin(100).unwrap();
        got.push(l.event.id());
        match w.finish(l.token, true, 100) {
            Finish::Delivered { drained: true, .. } => break,
            Finish::Delivered { drained: false, .. } => {}
            f => panic!("{f:?}"),
        }
    }
    assert_eq!(got, pushed);
    assert_eq!((w.q.held(), w.budget.used(), w.budget.held()), (0, 0, 0));
    assert_eq!(w.heap.live(), 0);
    w.conserved();
}

#[test]
fn one_in_flight_and_each_lease_settles_once() {
    let w = World::new(limits(10, 0), 1 << 20);
    w.push(10, Enter::Failed, 0);
    w.push(10, Enter::Failed, 0);
    let l = w.begin(1).unwrap();
    assert_eq!(w.begin(1), None, "a second lease while one is in flight");
    assert_eq!(
        w.finish(l.token, false, 5),
        Finish::Retry { retry_at_ms: 1005 }
    );
    // the failed head is still the head, under a new token
    let l2 = w.begin(2000).unwrap();
    assert_eq!(l2.event.id(), l.event.id());
    assert_ne!(l2.token, l.token);
    assert_eq!(w.finish(l.token, true, 2000), Finish::Stale);
    assert!(matches!(
        w.finish(l2.token, true, 2000),
        Finish::Delivered { drained: false, .. }
    ));
    assert_eq!(w.finish(l2.token, true, 2000), Finish::Stale);
    assert_eq!(w.finish(0, true, 2000), Finish::Stale);
    assert_eq!(w.drain_all(3000).len(), 1);
    w.conserved();
}

#[test]
fn a_full_queue_drops_its_oldest() {
    let w = World::new(limits(3, 0), 1 << 20);
    let hs: Vec<Handle> = (0..9).map(|i| w.push(1, Enter::Failed, i).0).collect();
    assert_eq!(w.drain_all(10), hs[6..].to_vec());
    let v = w.view();
    assert_eq!(v.dropped[Reason::Overflow as usize], 6);
    assert_eq!((v.spooled, v.replayed), (9, 3));
    let r = w.q.episodes().take(20).unwrap();
    assert_eq!(r.total(), 6);
    assert_eq!(w.heap.live(), 0);
}

#[test]
fn the_event_in_flight_is_never_dropped_to_make_room() {
    let w = World::new(limits(2, 0), 1 << 20);
    let (a, _) = w.push(1, Enter::Failed, 0);
    w.push(1, Enter::Failed, 0);
    let l = w.begin(1).unwrap();
    assert_eq!(l.event.id(), a);
    // full: b goes (the oldest not in flight), a stays in flight
    let (c, e) = w.push(1, Enter::Behind, 2);
    assert_eq!(e, Entry::Queued { first: false });
    assert!(matches!(
        w.finish(l.token, true, 3),
        Finish::Delivered { drained: false, .. }
    ));
    assert_eq!(w.drain_all(4), vec![c]);
    assert_eq!(w.view().dropped[Reason::Overflow as usize], 1);
    w.conserved();

    // a queue of one with its one event in flight: the newest goes
    let w = World::new(limits(1, 0), 1 << 20);
    let (a, _) = w.push(1, Enter::Failed, 0);
    let l = w.begin(1).unwrap();
    assert_eq!(
        w.push(1, Enter::Failed, 2).1,
        Entry::Dropped(Reason::Overflow)
    );
    w.settle(l.token, true, 3);
    assert_eq!(l.event.id(), a);
    w.conserved();
    drop(l);
    assert_eq!(w.heap.live(), 0);
}

#[test]
fn old_events_are_dropped_not_replayed() {
    let w = World::new(limits(10, 100), 1 << 20);
    w.push(1, Enter::Failed, 0);
    let (young, _) = w.push(1, Enter::Failed, 50);
    let l = w.begin(120).unwrap();
    assert_eq!(l.event.id(), young);
    w.settle(l.token, false, 120);
    // the sweep drops what no attempt reached
    let run = w.q.expire(&w.budget, 150);
    assert_eq!(run.len(), 1);
    drop(run);
    assert_eq!(w.view().dropped[Reason::Age as usize], 2);
    assert_eq!(w.q.held(), 0);
    w.conserved();
}

#[test]
fn the_budget_is_shared_and_each_queue_pays_from_its_own() {
    let heap = Heap::default();
    let budget = Budget::new(100);
    let (q1, q2) = (Q::new(limits(10, 0)), Q::new(limits(10, 0)));
    let push = |q: &Q, bytes| {
        let p = q.push(heap.alloc(bytes, 0), Enter::Failed, &budget, 0);
        (p.entry, p.evicted.len())
    };
    for i in 0..3 {
        assert_eq!(push(&q1, 30).0, Entry::Queued { first: i == 0 });
    }
    assert_eq!(budget.used(), 90);
    // q2 has nothing of its own to give up: its event is dropped
    assert_eq!(push(&q2, 30).0, Entry::Dropped(Reason::Budget));
    // q1 gives up its oldest for its newest
    let p = push(&q1, 30);
    assert_eq!(p, (Entry::Queued { first: false }, 1));
    // an event larger than the budget drops nothing else
    let p = push(&q1, 101);
    assert_eq!(p, (Entry::Dropped(Reason::Budget), 0));
    assert!(budget.used() <= 100);
    let v = q1.view(0);
    assert_eq!(v.dropped[Reason::Budget as usize], 2);
    assert_eq!(v.bytes, budget.used());
    assert_eq!(budget.held(), 3);
}

#[test]
fn a_live_event_goes_behind_held_ones_or_live_when_empty() {
    let w = World::new(limits(10, 0), 1 << 20);
    assert_eq!(w.push(1, Enter::Behind, 0).1, Entry::Empty);
    assert_eq!(w.view().spooled, 0, "an event that was never held");
    let (a, _) = w.push(1, Enter::Failed, 1);
    let (b, e) = w.push(1, Enter::Behind, 2);
    assert_eq!(e, Entry::Queued { first: false });
    assert_eq!(w.drain_all(3), vec![a, b]);
    assert_eq!(w.push(1, Enter::Behind, 4).1, Entry::Empty);
    w.conserved();
}

#[test]
fn unsubscribing_drops_what_is_held_and_the_one_in_flight_when_it_settles() {
    for delivered in [false, true] {
        let w = World::new(limits(10, 0), 1 << 20);
        for i in 0..4 {
            w.push(8, Enter::Failed, i);
        }
        let l = w.begin(5).unwrap();
        let c = w.q.close(&w.budget, 6);
        assert_eq!((c.evicted.len(), c.in_flight), (3, true));
        drop(c.evicted);
        // a raise that began before the unsubscribe
        assert_eq!(
            w.push(8, Enter::Behind, 7).1,
            Entry::Dropped(Reason::Unsubscribed)
        );
        assert_eq!(w.begin(8), None);
        assert!(!w.q.retry_now(true));
        let f = w.finish(l.token, delivered, 9);
        if delivered {
            assert!(matches!(f, Finish::Delivered { drained: true, .. }));
        } else {
            assert_eq!(
                f,
                Finish::Dropped {
                    free: l.event.clone()
                }
            );
        }
        drop((l, f));
        let v = w.view();
        assert_eq!(
            v.dropped[Reason::Unsubscribed as usize],
            4 + u64::from(!delivered)
        );
        // unsubscribe drops are logged by the caller at once, not as an episode
        assert_eq!(w.q.episodes().take(10), None);
        assert_eq!((w.heap.live(), w.budget.used(), w.budget.held()), (0, 0, 0));
        w.conserved();
        // closing again changes nothing
        let again = w.q.close(&w.budget, 10);
        assert_eq!((again.evicted.len(), again.in_flight), (0, false));
    }
}

#[test]
fn an_operator_retry_makes_a_queue_due_once_or_until_it_fails() {
    let w = World::new(limits(10, 0), 1 << 20);
    for i in 0..3 {
        w.push(1, Enter::Failed, i);
    }
    let due = |q: &Q| due_at(q.due(), 5000);
    assert_eq!(due(&w.q), Some(5000));
    assert!(w.q.retry_now(false));
    assert_eq!(due(&w.q), Some(0));
    let l = w.begin(10).unwrap();
    w.settle(l.token, true, 10);
    assert_eq!(due(&w.q), Some(5000), "one event, then the windows rule");
    assert!(w.q.retry_now(true));
    let l = w.begin(11).unwrap();
    w.settle(l.token, true, 11);
    assert_eq!(due(&w.q), Some(0), "all: still forced");
    let l = w.begin(12).unwrap();
    w.settle(l.token, false, 12);
    assert_eq!(due(&w.q), Some(5000), "a failure ends it");
    w.conserved();
}

#[test]
fn the_view_shows_what_the_operator_needs() {
    let w = World::new(limits(2, 0), 1 << 20);
    assert_eq!(w.q.view(5), View::default());
    w.push(7, Enter::Failed, 100);
    w.push(7, Enter::Failed, 200);
    w.push(7, Enter::Failed, 300);
    let l = w.begin(400).unwrap();
    let v = w.q.view(1000);
    assert_eq!(v.held, 2);
    assert_eq!(v.bytes, 14);
    assert_eq!(v.oldest_ms, Some(800));
    assert_eq!(v.in_flight_ms, Some(600));
    assert_eq!(v.dropped_total(), 1);
    assert_eq!(v.retry_at_ms, Some(1100));
    w.settle(l.token, true, 1000);
}

// ---- the replay loop never spins while everyone is down ----------------

/// The replay process over one FAILOVER queue, in simulated time: wakes
/// when the queue is due, tries the head on every subscriber (all down),
/// records the failures as the policies would.  Attempts over `span_ms`.
fn attempts_while_all_down(subs: usize, window_ms: u64, retry_ms: u64, span_ms: u64) -> u64 {
    let health: Vec<Health> = (0..subs).map(|_| Health::default()).collect();
    let heap = Heap::default();
    let budget = Budget::new(1 << 20);
    let q = Q::new(Limits {
        capacity: 100,
        max_age_ms: 0,
        retry_ms,
    });
    // the event that every subscriber failed, at START
    const START: u64 = 1000;
    for h in &health {
        h.record(false, START);
    }
    let p = q.push(heap.alloc(1, START), Enter::Failed, &budget, START);
    assert!(p.evicted.is_empty());
    let mut now = START;
    let mut attempts = 0;
    loop {
        let states = health.iter().map(|h| h.state(now, window_ms));
        let Some(due) = next_wake([due_at(q.due(), eligible_at(now, states))]) else {
            panic!("a held event with no wake-up");
        };
        // never a wake-up at or before the attempt that just failed
        assert!(attempts == 0 || due > now, "busy loop at {now}: due {due}");
        now = due.max(now);
        if now > START + span_ms {
            return attempts;
        }
        let b = q.begin(&budget, now);
        assert!(b.expired.is_empty());
        let l = b.lease.unwrap();
        attempts += 1;
        for h in &health {
            h.record(false, now);
        }
        assert!(matches!(
            q.finish(l.token, false, &budget, now),
            Finish::Retry { .. }
        ));
    }
}

#[test]
fn never_retries_faster_than_the_window_or_the_floor() {
    // windows of 5 s: one attempt per window over a minute
    assert_eq!(attempts_while_all_down(3, 5000, 1000, 60_000), 12);
    // failover_timeout 0: the retry floor alone paces it
    assert_eq!(attempts_while_all_down(2, 0, 1000, 60_000), 60);
    // a floor longer than the window wins
    assert_eq!(attempts_while_all_down(1, 100, 2000, 10_000), 5);
}

#[test]
fn a_subscriber_back_is_drained_at_once() {
    let w = World::new(limits(1000, 0), 1 << 20);
    for i in 0..200 {
        w.push(1, Enter::Failed, i);
    }
    // healthy again: due now, and due again right after each delivery
    let now = 10_000;
    let mut n = 0;
    while let Some(due) = due_at(w.q.due(), eligible_at(now, [State::Healthy])) {
        assert!(due <= now);
        let l = w.begin(now).unwrap();
        w.settle(l.token, true, now);
        n += 1;
    }
    assert_eq!(n, 200);
}

// ---- properties ------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Push { q: usize, bytes: u64, behind: bool },
    Begin { q: usize },
    Finish { q: usize, ok: bool, stale: bool },
    Advance { ms: u64 },
    Expire { q: usize },
    Retry { q: usize, all: bool },
    Close { q: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let q = 0..3usize;
    prop_oneof![
        6 => (q.clone(), 1..40u64, any::<bool>())
            .prop_map(|(q, bytes, behind)| Op::Push { q, bytes, behind }),
        3 => q.clone().prop_map(|q| Op::Begin { q }),
        3 => (q.clone(), any::<bool>(), prop::bool::weighted(0.1))
            .prop_map(|(q, ok, stale)| Op::Finish { q, ok, stale }),
        1 => (0..400u64).prop_map(|ms| Op::Advance { ms }),
        1 => q.clone().prop_map(|q| Op::Expire { q }),
        1 => (q.clone(), any::<bool>()).prop_map(|(q, all)| Op::Retry { q, all }),
        1 => q.prop_map(|q| Op::Close { q }),
    ]
}

/// What a queue should hold, as the model sees it.
#[derive(Default)]
struct Model {
    held: VecDeque<Handle>,
    lease: Option<Lease<Ev>>,
    stale: Vec<u64>,
    delivered: Vec<Handle>,
    closed: bool,
}

impl Model {
    /// The oldest events that may be dropped, in order.
    fn droppable(&self) -> Vec<Handle> {
        let skip = usize::from(self.lease.is_some());
        self.held.iter().skip(skip).copied().collect()
    }

    /// The queue dropped `run` (oldest not in flight first): check it and
    /// forget it.
    fn dropped(&mut self, run: VecDeque<Ev>, fates: &mut HashMap<Handle, &'static str>) {
        let expect = self.droppable();
        let got = ids_of(&run);
        assert_eq!(got[..], expect[..got.len()], "not the oldest");
        self.held.retain(|h| !got.contains(h));
        for h in got {
            assert!(fates.insert(h, "dropped").is_none());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_event_is_delivered_in_order_or_counted_dropped_once(
        ops in prop::collection::vec(op(), 1..250),
        caps in prop::collection::vec(1..6u32, 3),
        max_age in prop_oneof![Just(0u64), 100..1000u64],
        limit in 40..200u64,
    ) {
        let heap = Heap::default();
        let budget = Budget::new(limit);
        let queues: Vec<Q> =
            caps.iter().map(|&c| Queue::new(limits(c, max_age))).collect();
        let mut models: Vec<Model> = (0..3).map(|_| Model::default()).collect();
        let mut fates: HashMap<Handle, &'static str> = HashMap::new();
        let mut entered = 0u64;
        let mut now = 1u64;

        for op in ops {
            match op {
                Op::Push { q, bytes, behind } => {
                    let m = &mut models[q];
                    let h = heap.alloc(bytes, now);
                    let h_id = h.id();
                    let enter = if behind { Enter::Behind } else { Enter::Failed };
                    let p = queues[q].push(h, enter, &budget, now);
                    let h = h_id;
                    prop_assert_eq!(p.back.is_some(), !matches!(p.entry, Entry::Queued { .. }));
                    drop(p.back);
                    m.dropped(p.evicted, &mut fates);
                    match p.entry {
                        Entry::Queued { first } => {
                            prop_assert!(!m.closed);
                            prop_assert_eq!(first, m.held.is_empty());
                            m.held.push_back(h);
                            entered += 1;
                        }
                        Entry::Dropped(_) => {
                            fates.insert(h, "refused");
                            entered += 1;
                        }
                        Entry::Empty => {
                            prop_assert!(behind && m.held.is_empty() && !m.closed);
                        }
                    }
                }
                Op::Begin { q } => {
                    let m = &mut models[q];
                    let b = queues[q].begin(&budget, now);
                    m.dropped(b.expired, &mut fates);
                    match b.lease {
                        Some(l) => {
                            prop_assert!(m.lease.is_none(), "two in flight");
                            prop_assert!(!m.closed);
                            prop_assert_eq!(Some(&l.event.id()), m.held.front(), "not the head");
                            m.lease = Some(l);
                        }
                        None => prop_assert!(m.lease.is_some() || m.held.is_empty() || m.closed),
                    }
                }
                Op::Finish { q, ok, stale } => {
                    let m = &mut models[q];
                    if stale {
                        for &t in &m.stale {
                            let f = queues[q].finish(t, ok, &budget, now);
                            prop_assert_eq!(f, Finish::Stale);
                        }
                        continue;
                    }
                    let Some(l) = m.lease.take() else { continue };
                    m.stale.push(l.token);
                    match queues[q].finish(l.token, ok, &budget, now) {
                        Finish::Delivered { free, drained } => {
                            let free = free.id();
                            prop_assert!(ok);
                            prop_assert_eq!(m.held.pop_front(), Some(free));
                            prop_assert_eq!(drained, m.held.is_empty());
                            m.delivered.push(free);
                            prop_assert!(fates.insert(free, "delivered").is_none());
                        }
                        Finish::Dropped { free } => {
                            let free = free.id();
                            prop_assert!(!ok && m.closed);
                            prop_assert_eq!(m.held.pop_front(), Some(free));
                            prop_assert!(fates.insert(free, "dropped").is_none());
                        }
                        Finish::Retry { retry_at_ms } => {
                            prop_assert!(!ok && !m.closed);
                            prop_assert!(retry_at_ms > now);
                        }
                        Finish::Stale => prop_assert!(false, "a live lease was stale"),
                    }
                }
                Op::Advance { ms } => now += ms,
                Op::Expire { q } => {
                    let run = queues[q].expire(&budget, now);
                    models[q].dropped(run, &mut fates);
                }
                Op::Retry { q, all } => {
                    let m = &models[q];
                    let r = queues[q].retry_now(all);
                    prop_assert_eq!(r, !m.held.is_empty() && !m.closed);
                }
                Op::Close { q } => {
                    let m = &mut models[q];
                    let c = queues[q].close(&budget, now);
                    m.dropped(c.evicted, &mut fates);
                    m.closed = true;
                    prop_assert_eq!(c.in_flight, m.lease.is_some());
                    prop_assert_eq!(m.held.len(), usize::from(m.lease.is_some()));
                }
            }

            // after every step
            prop_assert!(budget.used() <= budget.limit());
            let mut bytes = 0;
            let mut held = 0;
            for (q, m) in queues.iter().zip(&models) {
                let v = q.view(now);
                prop_assert_eq!(v.held as usize, m.held.len());
                prop_assert!(v.held <= q.limits().capacity);
                prop_assert_eq!(v.spooled, v.replayed + v.dropped_total() + u64::from(v.held));
                bytes += v.bytes;
                held += u64::from(v.held);
            }
            prop_assert_eq!(bytes, budget.used());
            prop_assert_eq!(held, budget.held());
            prop_assert_eq!(heap.live() as u64, held);
        }

        // shut down: every queue closed, every lease settled
        for (q, m) in queues.iter().zip(models.iter_mut()) {
            let c = q.close(&budget, now);
            m.dropped(c.evicted, &mut fates);
            if let Some(l) = m.lease.take() {
                match q.finish(l.token, false, &budget, now) {
                    Finish::Dropped { free } => {
                        prop_assert!(fates.insert(free.id(), "dropped").is_none());
                    }
                    f => prop_assert!(false, "{:?}", f),
                }
            }
            // FIFO: delivered in the order they entered
            prop_assert!(m.delivered.windows(2).all(|w| w[0] < w[1]));
        }
        prop_assert_eq!(heap.live(), 0);
        prop_assert_eq!((budget.used(), budget.held()), (0, 0));
        prop_assert_eq!(fates.len() as u64, entered, "an event with no fate");
        let (mut spooled, mut settled) = (0, 0);
        for q in &queues {
            let v = q.view(now);
            spooled += v.spooled;
            settled += v.replayed + v.dropped_total();
        }
        prop_assert_eq!(spooled, entered);
        prop_assert_eq!(settled, entered);
    }

    /// No wake-up at or before an attempt that failed on every subscriber.
    #[test]
    fn all_down_means_a_wake_up_strictly_later(
        failed in prop::collection::vec(0..10_000u64, 1..8),
        window in 0..10_000u64,
        retry in 1..5_000u64,
        extra in 0..10_000u64,
    ) {
        let now = failed.iter().copied().max().unwrap() + extra;
        let health: Vec<Health> = failed.iter().map(|_| Health::default()).collect();
        // everyone failed at some time, the last just now
        for (h, &at) in health.iter().zip(&failed) {
            h.record(false, at);
        }
        for h in &health {
            h.record(false, now);
        }
        let d = Due { held: 1, in_flight: false, closed: false,
                      retry_at_ms: now + retry, forced: false };
        let at = due_at(d, eligible_at(now, health.iter().map(|h| h.state(now, window))));
        prop_assert!(at.unwrap() > now);
        prop_assert_eq!(at.unwrap(), now + window.max(retry));
    }
}

// ---- concurrency -----------------------------------------------------------

/// Producers in several threads (as raises in several processes), one
/// replayer that fails one attempt in three, a shared budget and small
/// queues: conservation and per-producer order hold under the spinlock.
#[test]
fn producers_and_a_replayer_agree_under_the_spinlock() {
    let heap = Heap::default();
    let budget = Budget::new(600);
    let q = Q::new(limits(50, 0));
    let producers = 3u64;
    let per = 3000u64;
    // the producer and its sequence number, by handle
    let tags: Mutex<HashMap<u64, (u64, u64)>> = Mutex::default();
    let delivered: Mutex<Vec<(u64, u64)>> = Mutex::default();
    let dropped = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    std::thread::scope(|s| {
        for p in 0..producers {
            let (heap, budget, q, tags, dropped, done) =
                (&heap, &budget, &q, &tags, &dropped, &done);
            s.spawn(move || {
                for i in 0..per {
                    let h = heap.alloc(5, i);
                    tags.lock().unwrap().insert(h.id(), (p, i));
                    let r = q.push(h, Enter::Failed, budget, i);
                    dropped.fetch_add(r.dropped(), Relaxed);
                }
                done.fetch_add(1, Relaxed);
            });
        }
        s.spawn(|| {
            let mut n = 0u64;
            loop {
                let b = q.begin(&budget, 0);
                assert!(b.expired.is_empty());
                let Some(l) = b.lease else {
                    if done.load(Relaxed) == producers && q.held() == 0 {
                        break;
                    }
                    std::thread::yield_now();
                    continue;
                };
                n += 1;
                match q.finish(l.token, !n.is_multiple_of(3), &budget, 0) {
                    Finish::Delivered { free, .. } => {
                        let tag = tags.lock().unwrap()[&free.id()];
                        delivered.lock().unwrap().push(tag);
                    }
                    Finish::Retry { .. } => {}
                    f => panic!("{f:?}"),
                }
            }
        });
    });
    let delivered = delivered.into_inner().unwrap();
    let v = q.view(0);
    assert_eq!(v.spooled, producers * per);
    assert_eq!(v.replayed, delivered.len() as u64);
    assert_eq!(v.dropped_total(), dropped.load(Relaxed));
    assert_eq!(v.spooled, v.replayed + v.dropped_total());
    assert_eq!((heap.live(), budget.used()), (0, 0));
    for p in 0..producers {
        let mine: Vec<u64> = delivered.iter().filter(|t| t.0 == p).map(|t| t.1).collect();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "producer {p} out of order"
        );
    }
}

// ---- the replay process's rounds -------------------------------------------

use crate::policy::{self, Attempt, Driver, Progress, Rules, Transition, Walk};
use crate::socket::Policy;
use crate::spool::replay::{Attempted, Replayer, round};

/// Subscribers that are up or down; a delivery records which event reached
/// which subscriber.
struct Receivers {
    up: Vec<bool>,
    got: Vec<Vec<u64>>,
    /// Every delivery, in the order made.
    log: Vec<u64>,
    /// The event being offered.
    current: u64,
}

impl Driver for Receivers {
    fn attempt(&mut self, i: usize, _: &Walk) -> Attempt {
        if self.up[i] {
            self.got[i].push(self.current);
            self.log.push(self.current);
            Attempt::Taken
        } else {
            Attempt::Failed
        }
    }
    fn transition(&mut self, _: usize, _: Transition) {}
}

/// A subscriber's health, as the policies take it.
struct Sub(Health);

impl AsRef<Health> for Sub {
    fn as_ref(&self) -> &Health {
        &self.0
    }
}

/// The FFI layer's side of one virtual socket, faked: its subscribers'
/// health and transports, and the held events' blocks.
struct Side {
    policy: Policy,
    heap: Heap,
    health: Vec<Sub>,
    rotation: policy::Rotation,
    rx: Receivers,
    window_ms: u64,
    now: u64,
    /// The event each held block is a copy of.
    ids: HashMap<Handle, u64>,
    /// Asynchronous transports: attempts wait here for their report.
    asynchronous: bool,
    pending: Vec<(usize, Lease<Ev>, bool)>,
    drained: u32,
    episodes: Vec<Report>,
    attempts: u64,
}

/// One virtual socket with its queues, and the raise path and the replay
/// process around them, in simulated time.
struct Socket {
    queues: Vec<Q>,
    budget: Budget,
    s: Side,
    next_id: u64,
}

impl Socket {
    fn new(policy: Policy, n: usize, capacity: u32, window_ms: u64) -> Socket {
        Socket {
            queues: (0..policy.spool_queues(n))
                .map(|_| Queue::new(limits(capacity, 0)))
                .collect(),
            budget: Budget::new(1 << 30),
            next_id: 0,
            s: Side {
                policy,
                heap: Heap::default(),
                health: (0..n).map(|_| Sub(Health::default())).collect(),
                rotation: policy::Rotation::default(),
                rx: Receivers {
                    up: vec![true; n],
                    got: vec![vec![]; n],
                    log: vec![],
                    current: 0,
                },
                window_ms,
                now: 1,
                ids: HashMap::new(),
                asynchronous: false,
                pending: vec![],
                drained: 0,
                episodes: vec![],
                attempts: 0,
            },
        }
    }

    /// Copy event `id` into queue `q`.
    fn hold(&mut self, q: usize, id: u64, enter: Enter) -> Entry {
        let s = &mut self.s;
        let h = s.heap.alloc(1, s.now);
        s.ids.insert(h.id(), id);
        self.queues[q].push(h, enter, &self.budget, s.now).entry
    }

    /// The raise path for one synchronous event, as the FFI layer will do
    /// it: a queue that holds events takes the event behind them; an
    /// empty one costs one load, and a copy only if every subscriber (the
    /// PARALLEL queue's one) failed.
    fn raise(&mut self) {
        self.next_id += 1;
        let id = self.next_id;
        self.s.rx.current = id;
        if self.s.policy == Policy::Parallel {
            for i in 0..self.s.health.len() {
                if self.queues[i].held() > 0 && self.hold(i, id, Enter::Behind) != Entry::Empty {
                    continue;
                }
                let s = &mut self.s;
                let ok = s.rx.up[i];
                if ok {
                    s.rx.got[i].push(id);
                }
                policy::record(&s.rotation, &s.health, i, ok, s.now, &mut s.rx);
                if !ok {
                    let _ = self.hold(i, id, Enter::Failed);
                }
            }
            return;
        }
        if self.queues[0].held() > 0 && self.hold(0, id, Enter::Behind) != Entry::Empty {
            return;
        }
        let s = &mut self.s;
        let rules = Rules {
            window_ms: s.window_ms,
        };
        let p = policy::deliver(
            s.policy,
            &s.rotation,
            None,
            &s.health,
            rules,
            s.now,
            &mut s.rx,
        );
        if matches!(p, Progress::Done(o) if !o.delivered()) {
            let _ = self.hold(0, id, Enter::Failed);
        }
    }

    /// Run the replay process until `until`, as its loop will: a round,
    /// then sleep until the time it asks for.  Returns how many rounds
    /// attempted something.
    fn replay(&mut self, until: u64) -> u64 {
        let mut busy = 0;
        while self.s.now < until {
            let now = self.s.now;
            // reports of asynchronous attempts come between rounds
            for (q, l, ok) in std::mem::take(&mut self.s.pending) {
                match self.queues[q].finish(l.token, ok, &self.budget, now) {
                    Finish::Delivered { drained, .. } => {
                        self.s.drained += u32::from(drained);
                    }
                    Finish::Retry { .. } => {}
                    f => panic!("{f:?}"),
                }
            }
            let refs: Vec<&Q> = self.queues.iter().collect();
            let before = self.s.attempts;
            let t = round(&refs, &self.budget, &mut self.s, now, 16);
            let attempts = self.s.attempts - before;
            busy += u64::from(attempts > 0);
            if !self.s.pending.is_empty() {
                self.s.now += 10; // a report takes 10 ms
                continue;
            }
            let next = t.next_ms.unwrap_or(now + 1000);
            assert!(
                next > now || attempts > 0,
                "an idle round asks to run again at once ({now})"
            );
            self.s.now = next.max(now + u64::from(attempts == 0));
        }
        busy
    }

    fn held(&self) -> u32 {
        self.queues.iter().map(|q| q.held()).sum()
    }
}

impl Side {
    fn take(&mut self, q: usize, id: u64) -> bool {
        let ok = self.rx.up[q];
        if ok {
            self.rx.got[q].push(id);
        }
        ok
    }
}

impl Replayer<VecDeque<Ev>> for Side {
    fn attempt(&mut self, q: usize, lease: &Lease<Ev>) -> Attempted {
        let id = self.ids[&lease.event.id()];
        self.attempts += 1;
        self.rx.current = id;
        if self.asynchronous {
            // the transport's report comes later, with the outcome
            let ok = self.take(q, id);
            self.pending.push((q, lease.clone(), ok));
            return Attempted::Pending;
        }
        let ok = if self.policy == Policy::Parallel {
            let ok = self.take(q, id);
            policy::record(&self.rotation, &self.health, q, ok, self.now, &mut self.rx);
            ok
        } else {
            let rules = Rules {
                window_ms: self.window_ms,
            };
            let p = policy::deliver(
                self.policy,
                &self.rotation,
                None,
                &self.health,
                rules,
                self.now,
                &mut self.rx,
            );
            matches!(p, Progress::Done(o) if o.delivered())
        };
        if ok {
            Attempted::Delivered
        } else {
            Attempted::Failed
        }
    }
    fn eligible_at(&self, q: usize, now_ms: u64) -> u64 {
        let state = |i: usize| self.health[i].0.state(now_ms, self.window_ms);
        if self.policy == Policy::Parallel {
            eligible_at(now_ms, [state(q)])
        } else {
            eligible_at(now_ms, (0..self.health.len()).map(state))
        }
    }
    fn episode(&mut self, _: usize, report: Report) {
        self.episodes.push(report);
    }
    fn drained(&mut self, _: usize) {
        self.drained += 1;
    }
}

fn ids(range: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    range.collect()
}

#[test]
fn failover_both_down_200_events_then_one_back_gets_all_in_order_once() {
    let mut k = Socket::new(Policy::Failover, 2, 1000, 5000);
    k.s.rx.up = vec![false, false];
    for _ in 0..200 {
        k.raise();
        k.s.now += 10;
    }
    assert_eq!(k.held(), 200);
    // a minute of outage: one round per failover window, no more
    let busy = k.replay(62_000);
    assert!(
        busy <= 62_000 / 5000 + 1,
        "{busy} busy rounds while all down"
    );
    assert!(k.s.rx.got.iter().all(Vec::is_empty));
    // the second comes back
    k.s.rx.up[1] = true;
    k.replay(k.s.now + 6000);
    assert_eq!(k.held(), 0);
    assert_eq!(k.s.rx.got[1], ids(1..=200));
    assert_eq!(k.s.drained, 1);
    // live events after go straight through
    for _ in 0..5 {
        k.raise();
    }
    assert_eq!(k.s.rx.got[1], ids(1..=205));
    let v = k.queues[0].view(k.s.now);
    assert_eq!((v.spooled, v.replayed, v.dropped_total()), (200, 200, 0));
    assert_eq!(k.s.heap.live(), 0);
}

#[test]
fn events_raised_while_draining_go_behind() {
    let mut k = Socket::new(Policy::RoundRobin, 3, 1000, 1000);
    k.s.rx.up = vec![false; 3];
    for _ in 0..50 {
        k.raise();
    }
    k.s.rx.up = vec![true; 3];
    // live events between replay rounds: behind the held ones
    let mut until = k.s.now;
    for _ in 0..50 {
        k.raise();
        until += 100;
        k.replay(until);
    }
    k.replay(until + 5000);
    // exactly once each, and in the order raised: the live events raised
    // while the queue held some went behind them, not past them
    assert_eq!(k.s.rx.log, ids(1..=100));
    let v = k.queues[0].view(k.s.now);
    assert_eq!((v.replayed, v.dropped_total()), (v.spooled, 0));
    assert!(v.spooled > 50, "some live events went behind: {v:?}");
    // the rotation still deals them out evenly
    for got in &k.s.rx.got {
        assert!(got.len().abs_diff(100 / 3) <= 1, "{got:?}");
    }
}

#[test]
fn parallel_one_of_three_down_for_100_events_gets_every_one_it_missed() {
    let mut k = Socket::new(Policy::Parallel, 3, 1000, 2000);
    k.s.rx.up[1] = false;
    for _ in 0..100 {
        k.raise();
        k.s.now += 5;
    }
    k.replay(k.s.now + 10_000);
    assert_eq!(k.queues[1].held(), 100);
    k.s.rx.up[1] = true;
    k.replay(k.s.now + 3000);
    for _ in 0..10 {
        k.raise();
    }
    for got in &k.s.rx.got {
        assert_eq!(*got, ids(1..=110));
    }
    assert_eq!(k.s.heap.live(), 0);
}

#[test]
fn overflow_keeps_the_newest_n() {
    let n = 20;
    let mut k = Socket::new(Policy::Failover, 2, n, 1000);
    k.s.rx.up = vec![false, false];
    for _ in 0..3 * n {
        k.raise();
    }
    k.s.rx.up[0] = true;
    k.replay(k.s.now + 2000);
    assert_eq!(k.s.rx.got[0], ids(u64::from(2 * n + 1)..=u64::from(3 * n)));
    let v = k.queues[0].view(k.s.now);
    assert_eq!(v.dropped[Reason::Overflow as usize], u64::from(2 * n));
    // logged once, with the count, once the drops have stopped
    k.replay(k.s.now + episode::QUIET_MS + 2000);
    assert_eq!(k.s.episodes.len(), 1);
    let refs: Vec<&Q> = k.queues.iter().collect();
    let t = round(&refs, &k.budget, &mut k.s, 1 << 40, 16);
    assert!(!t.episodes_open && t.next_ms.is_none());
    assert_eq!(k.s.episodes[0].total(), u64::from(2 * n));
}

#[test]
fn asynchronous_replay_keeps_one_in_flight_and_the_order() {
    let mut k = Socket::new(Policy::Failover, 1, 100, 1000);
    k.s.rx.up = vec![false];
    for _ in 0..30 {
        k.raise();
    }
    k.s.asynchronous = true;
    k.replay(k.s.now + 5000);
    assert!(k.s.rx.got[0].is_empty());
    assert_eq!(k.held(), 30);
    k.s.rx.up = vec![true];
    // every round leases one, its report settles it: 30 rounds at least
    k.replay(k.s.now + 3000);
    assert_eq!(k.s.rx.got[0], ids(1..=30));
    assert_eq!(k.held(), 0);
}

#[test]
fn sizes_in_shared_memory() {
    // what a spool adds to a virtual socket's block, per queue, and to the
    // module's block; kept small since PARALLEL has one queue per subscriber
    let q = std::mem::size_of::<Q>();
    assert!(q <= 256, "a queue is {q} bytes");
    assert_eq!(std::mem::align_of::<Q>(), 8);
    assert!(std::mem::size_of::<Budget>() + std::mem::size_of::<Doorbell>() <= 64);
    println!("Queue: {q} bytes");
}

/// A barrier that a panicking party breaks (std's would leave the others
/// waiting for ever): then every wait returns.
struct Meet {
    parties: u64,
    arrived: AtomicU64,
    broken: std::sync::atomic::AtomicBool,
}

impl Meet {
    fn new(parties: usize) -> Self {
        Meet {
            parties: parties as u64,
            arrived: AtomicU64::new(0),
            broken: Default::default(),
        }
    }

    /// Wait until every party has called wait as often as this one.
    fn wait(&self) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        // (acquire-release: what a party did before it waited happens
        // before what the others do after)
        let round = self.arrived.fetch_add(1, AcqRel) / self.parties + 1;
        while self.arrived.load(Acquire) < round * self.parties && !self.broken.load(Relaxed) {
            std::thread::yield_now();
        }
    }

    /// Held by a party: breaks the barrier if the party panics.
    fn breaks_on_panic(&self) -> impl Drop + '_ {
        struct Guard<'a>(&'a Meet);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.broken.store(true, Relaxed);
                }
            }
        }
        Guard(self)
    }
}

/// Raises in three threads, a replayer whose leases are settled by a
/// fourth (asynchronous reports come in another process), and an
/// unsubscribe in the middle of it all: nothing freed twice, nothing left,
/// and every event that entered is accounted for.  Barriers, not sleeps,
/// place the close: every producer has pushed its first part when the
/// close starts, the second part races it, and the third comes after it,
/// so some pushes surely see the queue closed.
#[test]
fn unsubscribing_under_load_with_reports_in_flight() {
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;

    const PRODUCERS: u64 = 3;
    const BEFORE: u64 = 2000; // pushed before the close starts
    const RACING: u64 = 2000; // pushed while it runs
    const AFTER: u64 = 100; // pushed once it is done: all refused
    let heap = Heap::default();
    let budget = Budget::new(10_000);
    let q = Q::new(limits(100, 0));
    let closed = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    // pushes refused as unsubscribed, of them before the close began,
    // queued after it had ended, answered Empty
    let counts: [AtomicU64; 4] = Default::default();
    let [refused, early, late, unexpected] = &counts;
    // the producers and the closer meet there three times: before the
    // close, after it, and when the producers are done
    let meet = Meet::new(PRODUCERS as usize + 1);
    let (tx, rx) = mpsc::channel::<u64>();
    std::thread::scope(|s| {
        for p in 0..PRODUCERS {
            let (heap, budget, q, closed, meet) = (&heap, &budget, &q, &closed, &meet);
            s.spawn(move || {
                let _m = meet.breaks_on_panic();
                for i in 0..BEFORE + RACING + AFTER {
                    if i == BEFORE || i == BEFORE + RACING {
                        meet.wait();
                    }
                    let h = heap.alloc(1 + (i + p) % 9, i);
                    match q.push(h, Enter::Failed, budget, i).entry {
                        Entry::Queued { .. } if i >= BEFORE + RACING => {
                            late.fetch_add(1, Relaxed);
                        }
                        Entry::Queued { .. } => {}
                        Entry::Dropped(reason) => {
                            if reason == Reason::Unsubscribed {
                                refused.fetch_add(1, Relaxed);
                                if !closed.load(Relaxed) {
                                    early.fetch_add(1, Relaxed);
                                }
                            }
                        }
                        Entry::Empty => {
                            unexpected.fetch_add(1, Relaxed);
                        }
                    }
                }
                meet.wait();
            });
        }
        // the replayer leases, the reporter settles
        s.spawn(|| {
            while !stop.load(Relaxed) {
                let b = q.begin(&budget, 0);
                assert!(b.expired.is_empty());
                match b.lease {
                    Some(l) => tx.send(l.token).unwrap(),
                    None => std::thread::yield_now(),
                }
            }
            drop(tx);
        });
        s.spawn(|| {
            let mut n = 0u64;
            for token in rx {
                n += 1;
                match q.finish(token, n % 4 != 1, &budget, 0) {
                    Finish::Delivered { .. } | Finish::Dropped { .. } | Finish::Retry { .. } => {}
                    Finish::Stale => panic!("a lease settled twice"),
                }
            }
        });
        s.spawn(|| {
            let _m = meet.breaks_on_panic();
            meet.wait();
            closed.store(true, Relaxed);
            drop(q.close(&budget, 0));
            meet.wait();
            // the producers are done: stop the replayer
            meet.wait();
            stop.store(true, Relaxed);
        });
    });
    // every push after the close saw the queue closed, none before it
    let (refused, early, late) = (
        refused.load(Relaxed),
        early.load(Relaxed),
        late.load(Relaxed),
    );
    assert_eq!((late, early, unexpected.load(Relaxed)), (0, 0, 0));
    assert!(
        refused >= PRODUCERS * AFTER,
        "only {refused} pushes saw the queue closed"
    );
    // a lease still out at the close may have been settled since: close
    // again to settle whatever is left
    let c = q.close(&budget, 0);
    assert!(!c.in_flight, "the reporter settled every lease");
    let v = q.view(0);
    assert_eq!(v.held, 0);
    assert_eq!(v.spooled, PRODUCERS * (BEFORE + RACING + AFTER));
    assert_eq!(v.spooled, v.replayed + v.dropped_total());
    assert_eq!((heap.live(), budget.used(), budget.held()), (0, 0, 0));
}
