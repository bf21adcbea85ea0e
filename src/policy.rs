//! The delivery policies: which subscribers an event is attempted on, in
//! which order, and how a subscriber's health changes.
//!
//! All state here lives in OpenSIPS shared memory and is shared by every
//! process, so it is nothing but atomics: no lock is taken and nothing is
//! allocated while an event is delivered.  The transport itself is behind
//! the [`Driver`] trait, so the tests run these rules over a fake one.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::socket::{MAX_SUBSCRIBERS, Policy};

/// A socket's ROUND-ROBIN rotation: the next ticket, and how many of its
/// subscribers' last attempt failed, kept by [`record`] at each
/// transition.  While none has, no subscriber is skipped and
/// [`rotation_start`] looks at none of them.
#[derive(Debug, Default)]
#[repr(C)]
pub struct Rotation {
    ticket: AtomicU64,
    /// Transitions of one subscriber may be counted out of order, so it
    /// can wrap below 0 for a moment: only 0 is read, as "none failed".
    failing: AtomicU32,
}

impl Rotation {
    /// Where the next event starts, as [`rotation_start`] will place it.
    pub fn next<S: AsRef<Health>>(&self, subs: &[S], window_ms: u64, now_ms: u64) -> usize {
        rotation_start(self, self.ticket.load(Relaxed), subs, window_ms, now_ms)
    }
}

/// One subscriber's health and counters, and its fixed HASH seed.
#[derive(Debug, Default)]
#[repr(C)]
pub struct Health {
    /// Its rendezvous seed, from [`seeds`]; set when the socket is built.
    seed: u64,
    /// When the last attempt failed (ms on a clock shared by all
    /// processes), or 0 when the last attempt succeeded.
    failed_at: AtomicU64,
    attempts: AtomicU64,
    failures: AtomicU64,
    /// The cluster node whose word set this state ([`Health::hear`]), or
    /// 0 when this node's own attempts did.
    peer: AtomicU32,
    /// A transition of this node's own that the cluster has not been told.
    untold: AtomicBool,
}

/// What a node tells the others of one of its subscribers (issue 18): it
/// is healthy, or it failed `age_ms` ago.  An age, not a time: each node
/// has its own clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Told {
    Healthy,
    Failing { age_ms: u64 },
}

/// A subscriber's health as an operator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Healthy,
    /// Its last attempt failed and its window is over: it gets the next
    /// event that reaches it, and recovers if it takes it.
    Failing,
    /// Inside its failover window: passed over for this long yet.
    Skipped {
        for_ms: u64,
    },
}

/// When the first of these subscribers is out of its window (`now_ms` if
/// one already is, or if there are none): when the spool may try them.
pub fn eligible_at(now_ms: u64, states: impl IntoIterator<Item = State>) -> u64 {
    let at = |s| match s {
        State::Skipped { for_ms } => now_ms.saturating_add(for_ms),
        State::Healthy | State::Failing => now_ms,
    };
    states.into_iter().map(at).min().unwrap_or(now_ms)
}

/// A change in a subscriber's health, reported once per change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Failing,
    Recovered,
}

impl Health {
    /// A healthy subscriber with the HASH seed [`seeds`] gave it.
    pub fn seeded(seed: u64) -> Health {
        Health {
            seed,
            ..Health::default()
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Inside its failover window: passed over while others are healthy.
    /// A window of 0 never skips.
    pub fn skipped(&self, now_ms: u64, window_ms: u64) -> bool {
        let at = self.failed_at.load(Relaxed);
        window_ms != 0 && at != 0 && now_ms.saturating_sub(at) < window_ms
    }

    /// Record one attempt's result; returns the transition it caused,
    /// which is the cluster's to be told.
    pub fn record(&self, ok: bool, now_ms: u64) -> Option<Transition> {
        self.attempts.fetch_add(1, Relaxed);
        // this node's own finding now, whoever's it was
        if self.peer.load(Relaxed) != 0 {
            self.peer.store(0, Relaxed);
        }
        let t = if ok {
            (self.failed_at.swap(0, Relaxed) != 0).then_some(Transition::Recovered)
        } else {
            self.failures.fetch_add(1, Relaxed);
            // 0 means healthy, so a failure is never recorded as time 0
            (self.failed_at.swap(now_ms.max(1), Relaxed) == 0).then_some(Transition::Failing)
        };
        if t.is_some() {
            self.untold.store(true, Relaxed);
        }
        t
    }

    /// What to tell the cluster of this subscriber now.
    pub fn told(&self, now_ms: u64) -> Told {
        match self.failed_at.load(Relaxed) {
            0 => Told::Healthy,
            at => Told::Failing {
                age_ms: now_ms.saturating_sub(at),
            },
        }
    }

    /// [`Health::told`], once after each transition of this node's own.
    pub fn take_untold(&self, now_ms: u64) -> Option<Told> {
        self.untold.swap(false, Relaxed).then(|| self.told(now_ms))
    }

    /// Node `node` told this of the subscriber: a failure counts from when
    /// it happened there (the later of two failures wins), a recovery
    /// clears it.  No attempt is counted, and nothing is told on: returns
    /// the transition it made here, for the rotation's count.
    pub fn hear(&self, told: Told, node: u32, now_ms: u64) -> Option<Transition> {
        self.untold.store(false, Relaxed);
        match told {
            Told::Failing { age_ms } => {
                let at = now_ms.saturating_sub(age_ms).max(1);
                let before = self.failed_at.fetch_max(at, Relaxed);
                if before < at {
                    self.peer.store(node, Relaxed);
                }
                (before == 0).then_some(Transition::Failing)
            }
            Told::Healthy => {
                self.peer.store(node, Relaxed);
                (self.failed_at.swap(0, Relaxed) != 0).then_some(Transition::Recovered)
            }
        }
    }

    /// The node whose word set this state, if not this node's own attempts.
    pub fn peer(&self) -> Option<u32> {
        Some(self.peer.load(Relaxed)).filter(|&n| n != 0)
    }

    pub fn state(&self, now_ms: u64, window_ms: u64) -> State {
        let at = self.failed_at.load(Relaxed);
        let until = at.saturating_add(window_ms);
        if at == 0 {
            State::Healthy
        } else if window_ms != 0 && now_ms < until {
            State::Skipped {
                for_ms: until - now_ms,
            }
        } else {
            State::Failing
        }
    }

    pub fn attempts(&self) -> u64 {
        self.attempts.load(Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }
}

/// What one attempt on one subscriber came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The subscriber took the event.
    Taken,
    Failed,
    /// An asynchronous transport accepted it and will report the outcome
    /// later, through [`Walk::resume`].
    Pending,
}

/// What the policies need from the world: one attempt on one subscriber,
/// and somewhere to report health changes.
pub trait Driver {
    /// Hand the event to subscriber `i`.  `walk` is where the event stands
    /// after this attempt: an attempt that goes [`Attempt::Pending`] keeps
    /// a copy of it to resume from.
    fn attempt(&mut self, i: usize, walk: &Walk) -> Attempt;
    /// Subscriber `i` changed health because of this event's attempt.
    fn transition(&mut self, i: usize, t: Transition);
}

/// The rules of delivery, fixed for a run of the server.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// `failover_timeout`, in ms; 0 never skips.
    pub window_ms: u64,
}

/// Which subscribers one event has passed over, without allocating.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Passed([u64; MAX_SUBSCRIBERS / 64]);

impl Passed {
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn has(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
}

/// Where one event stands on one virtual socket: which subscribers it
/// has been offered to and which come next.  Plain data, so an event that
/// waits for an asynchronous transport keeps it in shared memory and any
/// process resumes it.
///
/// PARALLEL offers the event to every subscriber in order.  FAILOVER (from
/// the first) and ROUND-ROBIN (from its turn in the rotation) offer it in
/// order, wrapping, until one takes it: those inside their failover window
/// are passed over at first, and attempted after all, in the same order,
/// only if no other took it.  Then every subscriber has failed recently,
/// and no event is dropped without an attempt on each.  Each subscriber is
/// attempted at most once per event.
///
/// HASH offers an event with a value exactly as FAILOVER does, but in the
/// value's rendezvous order ([`hash_order`]) instead of the listed one; an
/// event without the value, as ROUND-ROBIN does.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Walk {
    policy: Policy,
    /// Walking in rendezvous order, for the value whose [`digest`] this is.
    hashed: bool,
    digest: u64,
    /// The rank last offered, as (score, index), in this pass.
    cursor: (u64, u32),
    n: u32,
    start: u32,
    /// Offers made so far: k < n is the first pass, n <= k < 2n the second.
    step: u32,
    attempts: u32,
    taken: u32,
    pending: u32,
    passed: Passed,
}

/// Where a walk has got to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The event waits for an asynchronous transport's report.
    Pending,
    Done(Outcome),
}

/// What became of one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub policy: Policy,
    pub subscribers: u32,
    pub attempts: u32,
    /// Subscribers that took it (PARALLEL: or accepted it, to report later).
    pub taken: u32,
}

impl Outcome {
    /// PARALLEL: every subscriber took it; otherwise one did.
    pub fn delivered(&self) -> bool {
        match self.policy {
            Policy::Parallel => self.taken == self.subscribers,
            _ => self.taken > 0,
        }
    }
}

impl Walk {
    /// Start one event.  A ROUND-ROBIN event, and a HASH event without
    /// its `value`, takes the next ticket from the socket's shared
    /// `rotation`; a HASH event with one is placed by its digest.  Other
    /// policies ignore `value`.
    pub fn begin<S: AsRef<Health>>(
        policy: Policy,
        rotation: &Rotation,
        value: Option<&[u8]>,
        subs: &[S],
        rules: Rules,
        now_ms: u64,
    ) -> Walk {
        let hashed = policy == Policy::Hash && value.is_some();
        let rotates = policy == Policy::RoundRobin || (policy == Policy::Hash && !hashed);
        let start = if rotates && !subs.is_empty() {
            let ticket = rotation.ticket.fetch_add(1, Relaxed);
            rotation_start(rotation, ticket, subs, rules.window_ms, now_ms)
        } else {
            0
        };
        Walk {
            policy,
            hashed,
            digest: value.map_or(0, digest),
            cursor: TOP,
            // socket.rs caps n at MAX_SUBSCRIBERS
            n: subs.len() as u32,
            start: start as u32,
            step: 0,
            attempts: 0,
            taken: 0,
            pending: 0,
            passed: Passed([0; MAX_SUBSCRIBERS / 64]),
        }
    }

    /// Offer the event until it is settled or waits for a report.
    pub fn run<S: AsRef<Health>, D: Driver>(
        &mut self,
        rotation: &Rotation,
        subs: &[S],
        rules: Rules,
        now_ms: u64,
        driver: &mut D,
    ) -> Progress {
        while let Some(i) = self.next(subs, rules.window_ms, now_ms) {
            self.attempts += 1;
            match driver.attempt(i, self) {
                Attempt::Pending if self.policy == Policy::Parallel => self.pending += 1,
                Attempt::Pending => return Progress::Pending,
                result => {
                    let ok = result == Attempt::Taken;
                    record(rotation, subs, i, ok, now_ms, driver);
                    if ok {
                        self.taken += 1;
                        if self.policy != Policy::Parallel {
                            break;
                        }
                    }
                }
            }
        }
        Progress::Done(self.outcome())
    }

    /// An asynchronous transport reported on subscriber `i` of a
    /// FAILOVER or ROUND-ROBIN event: settled if it took it, otherwise
    /// offered on to the next subscribers.
    #[allow(clippy::too_many_arguments)] // the report, the socket, the clock
    pub fn resume<S: AsRef<Health>, D: Driver>(
        &mut self,
        i: usize,
        ok: bool,
        rotation: &Rotation,
        subs: &[S],
        rules: Rules,
        now_ms: u64,
        driver: &mut D,
    ) -> Progress {
        record(rotation, subs, i, ok, now_ms, driver);
        if ok {
            self.taken += 1;
            return Progress::Done(self.outcome());
        }
        self.run(rotation, subs, rules, now_ms, driver)
    }

    fn outcome(&self) -> Outcome {
        Outcome {
            policy: self.policy,
            subscribers: self.n,
            attempts: self.attempts,
            taken: self.taken + self.pending,
        }
    }

    fn next<S: AsRef<Health>>(&mut self, subs: &[S], window_ms: u64, now_ms: u64) -> Option<usize> {
        let n = self.n;
        let passes = 2 - u32::from(self.policy == Policy::Parallel);
        while self.step < passes * n {
            let k = self.step;
            self.step += 1;
            let i = if self.hashed {
                if k.is_multiple_of(n) {
                    self.cursor = TOP;
                }
                let i = next_rank(self.digest, subs, self.cursor);
                self.cursor = (score(subs[i].as_ref().seed, self.digest), i as u32);
                i
            } else {
                ((self.start + k % n) % n) as usize
            };
            if self.policy == Policy::Parallel {
                return Some(i);
            }
            if k >= n {
                if self.passed.has(i) {
                    return Some(i);
                }
            } else if subs[i].as_ref().skipped(now_ms, window_ms) {
                self.passed.set(i);
            } else {
                return Some(i);
            }
        }
        None
    }
}

/// Record subscriber `i`'s result, count the change it makes in the
/// socket's `rotation`, and report it.  Asynchronous reports come here too,
/// through [`Walk::resume`]; a PARALLEL subscriber's report, which
/// continues nothing, through this.
pub fn record<S: AsRef<Health>, D: Driver>(
    rotation: &Rotation,
    subs: &[S],
    i: usize,
    ok: bool,
    now_ms: u64,
    driver: &mut D,
) {
    if let Some(t) = subs[i].as_ref().record(ok, now_ms) {
        match t {
            Transition::Failing => rotation.failing.fetch_add(1, Relaxed),
            Transition::Recovered => rotation.failing.fetch_sub(1, Relaxed),
        };
        driver.transition(i, t);
    }
}

/// What node `node` told of subscriber `i` ([`Health::hear`]), counted in
/// the socket's `rotation` as [`record`] counts a transition; the
/// transition it made, if any.
pub fn hear<S: AsRef<Health>>(
    rotation: &Rotation,
    subs: &[S],
    i: usize,
    told: Told,
    node: u32,
    now_ms: u64,
) -> Option<Transition> {
    let t = subs[i].as_ref().hear(told, node, now_ms)?;
    match t {
        Transition::Failing => rotation.failing.fetch_add(1, Relaxed),
        Transition::Recovered => rotation.failing.fetch_sub(1, Relaxed),
    };
    Some(t)
}

/// One event, offered synchronously: [`Walk::begin`] then [`Walk::run`].
pub fn deliver<S: AsRef<Health>, D: Driver>(
    policy: Policy,
    rotation: &Rotation,
    value: Option<&[u8]>,
    subs: &[S],
    rules: Rules,
    now_ms: u64,
    driver: &mut D,
) -> Progress {
    Walk::begin(policy, rotation, value, subs, rules, now_ms)
        .run(rotation, subs, rules, now_ms, driver)
}

// ---- HASH: rendezvous placement ------------------------------------------
//
// Every subscriber i has a seed, fixed when the socket is built:
//
//     seed_i  = fmix64(fnv1a64(token_i ++ [0x00] ++ le32(occurrence_i)))
//
// where token_i is its token as printed and occurrence_i counts the earlier
// subscribers with the same token (0 for the first).  An event's value v
// (an integer parameter as its decimal text) has
//
//     digest  = fnv1a64(v)
//     score_i = fmix64(seed_i ^ digest)
//
// and the event is offered from the highest score down; equal scores go
// by list position.  fnv1a64 is FNV-1a (offset basis 0xcbf29ce484222325,
// prime 0x100000001b3) and fmix64 MurmurHash3's 64-bit finaliser.  The
// value is hashed once per event; each score is one fmix64.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// No rank offered yet in this pass: above every (score, index).
const TOP: (u64, u32) = (u64::MAX, u32::MAX);

fn fnv1a64(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// MurmurHash3's 64-bit finaliser.
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// The digest of an event's value.
pub fn digest(value: &[u8]) -> u64 {
    fnv1a64(FNV_OFFSET, value)
}

/// The seed of a subscriber listed as `token`, the `occurrence`-th time
/// (from 0) that token is listed.
pub fn seed(token: &[u8], occurrence: u32) -> u64 {
    let h = fnv1a64(FNV_OFFSET, token);
    let h = fnv1a64(h, &[0]);
    fmix64(fnv1a64(h, &occurrence.to_le_bytes()))
}

/// The seeds of a socket's subscribers, in list order: a token listed
/// twice gets two seeds, and so weighs double.  Computed (and allocated)
/// once, when the socket is built; a raise only reads them.
pub fn seeds(tokens: &[&[u8]]) -> Vec<u64> {
    let mut seen: std::collections::HashMap<&[u8], u32> = std::collections::HashMap::new();
    tokens
        .iter()
        .map(|t| {
            let occ = seen.entry(t).or_insert(0);
            let s = seed(t, *occ);
            *occ += 1;
            s
        })
        .collect()
}

/// Subscriber `seed`'s score for a value of this digest.
pub fn score(seed: u64, digest: u64) -> u64 {
    fmix64(seed ^ digest)
}

/// The best-ranked subscriber below `cursor`: highest score first, equal
/// scores by position.  `subs` is not empty and `cursor` is above at least
/// one rank.
fn next_rank<S: AsRef<Health>>(digest: u64, subs: &[S], cursor: (u64, u32)) -> usize {
    let below = |s: u64, i: u32| s < cursor.0 || (s == cursor.0 && i > cursor.1);
    let mut best: Option<(u64, u32)> = None;
    for (i, sub) in subs.iter().enumerate() {
        let (s, i) = (score(sub.as_ref().seed, digest), i as u32);
        if below(s, i) && best.is_none_or(|(bs, _)| s > bs) {
            best = Some((s, i));
        }
    }
    best.map_or(0, |(_, i)| i as usize)
}

/// The rendezvous order of a value over subscribers with these seeds:
/// indexes, best first.  (For the operator's view and the tests: it
/// allocates.  The walk itself finds each next rank in place.)  A HASH event with this digest is offered to the
/// healthy ones in this order, then to the skipped ones in this order.
pub fn hash_order(digest: u64, seeds: &[u64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..seeds.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(score(seeds[i], digest)), i));
    order
}

/// The order a HASH event with this digest is offered in now, given which
/// subscribers are inside their failover window (`skipped`): the others in
/// rendezvous order, then those, in rendezvous order.
pub fn hash_attempts(digest: u64, seeds: &[u64], skipped: &[bool]) -> Vec<usize> {
    let order = hash_order(digest, seeds);
    let (mut first, later): (Vec<usize>, Vec<usize>) =
        order.into_iter().partition(|&i| !skipped[i]);
    first.extend(later);
    first
}

/// The decimal text of an integer parameter, which is what HASH hashes
/// (so 42 and "42" land together); written into `buf`, no allocation.
pub fn int_text(n: i32, buf: &mut [u8; 11]) -> &[u8] {
    let mut v = n.unsigned_abs();
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

/// Where a ROUND-ROBIN event with this ticket starts.  Tickets are dealt
/// over the healthy subscribers only, so that a passed-over subscriber's
/// share is spread over all healthy ones rather than handed to its
/// neighbour; with every subscriber healthy (or none) this is plain
/// `ticket % n`, found without looking at them while none has failed.
///
/// Delivery asks it with the ticket it takes, and MI `event_virtual_list`
/// ([`Rotation::next`]) with the ticket the next event will take: one
/// answer for both, so the subscriber the list names as next is the one
/// the event goes to.
pub fn rotation_start<S: AsRef<Health>>(
    rotation: &Rotation,
    ticket: u64,
    subs: &[S],
    window_ms: u64,
    now_ms: u64,
) -> usize {
    let n = subs.len() as u64;
    let up = |s: &&S| !s.as_ref().skipped(now_ms, window_ms);
    // none failed: none is skipped, and none is looked at
    let healthy = match rotation.failing.load(Relaxed) {
        0 => n,
        _ => subs.iter().filter(up).count() as u64,
    };
    if healthy == 0 || healthy == n {
        return (ticket % n) as usize;
    }
    subs.iter()
        .enumerate()
        .filter(|(_, s)| up(s))
        .nth((ticket % healthy) as usize)
        // health may change under us between the count and the walk
        .map_or((ticket % n) as usize, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sub(Health);
    impl AsRef<Health> for Sub {
        fn as_ref(&self) -> &Health {
            &self.0
        }
    }

    fn subs(n: usize) -> Vec<Sub> {
        (0..n).map(|_| Sub(Health::default())).collect()
    }

    /// A transport whose subscribers are up or down, or asynchronous,
    /// recording every attempt and transition, and the walk of each
    /// attempt that went pending.
    struct Fake {
        up: Vec<bool>,
        asynchronous: Vec<bool>,
        tried: Vec<usize>,
        transitions: Vec<(usize, Transition)>,
        parked: Vec<(usize, Walk)>,
    }

    impl Fake {
        fn new(up: &[bool]) -> Fake {
            Fake {
                up: up.to_vec(),
                asynchronous: vec![false; up.len()],
                tried: vec![],
                transitions: vec![],
                parked: vec![],
            }
        }
    }

    impl Driver for Fake {
        fn attempt(&mut self, i: usize, walk: &Walk) -> Attempt {
            self.tried.push(i);
            if self.asynchronous[i] {
                self.parked.push((i, *walk));
                Attempt::Pending
            } else if self.up[i] {
                Attempt::Taken
            } else {
                Attempt::Failed
            }
        }
        fn transition(&mut self, i: usize, t: Transition) {
            self.transitions.push((i, t));
        }
    }

    fn done(p: Progress) -> Outcome {
        match p {
            Progress::Done(o) => o,
            Progress::Pending => panic!("still pending"),
        }
    }

    const RULES: Rules = Rules { window_ms: 1000 };

    struct Socket {
        policy: Policy,
        rotation: Rotation,
        subs: Vec<Sub>,
    }

    impl Socket {
        fn new(policy: Policy, n: usize) -> Socket {
            Socket {
                policy,
                rotation: Rotation::default(),
                subs: subs(n),
            }
        }
        fn event(&self, fake: &mut Fake, now: u64) -> Outcome {
            done(self.start(fake, now))
        }
        fn start(&self, fake: &mut Fake, now: u64) -> Progress {
            deliver(
                self.policy,
                &self.rotation,
                None,
                &self.subs,
                RULES,
                now,
                fake,
            )
        }
    }

    #[test]
    fn parallel_attempts_everyone_whatever_fails() {
        let s = Socket::new(Policy::Parallel, 3);
        let mut f = Fake::new(&[false, true, true]);
        let o = s.event(&mut f, 10);
        assert_eq!(f.tried, vec![0, 1, 2]);
        assert_eq!((o.attempts, o.taken, o.delivered()), (3, 2, false));
        // a failed subscriber is still attempted next time
        f.tried.clear();
        f.up[0] = true;
        assert!(s.event(&mut f, 20).delivered());
        assert_eq!(f.tried, vec![0, 1, 2]);
        assert_eq!(
            f.transitions,
            vec![(0, Transition::Failing), (0, Transition::Recovered)]
        );
    }

    #[test]
    fn failover_takes_the_first_that_succeeds() {
        let s = Socket::new(Policy::Failover, 3);
        let mut f = Fake::new(&[true, true, true]);
        for _ in 0..3 {
            assert!(s.event(&mut f, 10).delivered());
        }
        assert_eq!(f.tried, vec![0, 0, 0]);
    }

    #[test]
    fn failover_skips_a_failed_one_inside_the_window_only() {
        let s = Socket::new(Policy::Failover, 3);
        let mut f = Fake::new(&[false, true, true]);
        assert_eq!(s.event(&mut f, 1000).attempts, 2);
        assert_eq!(f.tried, vec![0, 1]);
        f.tried.clear();
        f.up[0] = true; // back, but still inside its window
        s.event(&mut f, 1999);
        assert_eq!(f.tried, vec![1]);
        f.tried.clear();
        s.event(&mut f, 2000); // window over: tried again first
        assert_eq!(f.tried, vec![0]);
    }

    #[test]
    fn failover_tries_everyone_when_all_failed_recently() {
        let s = Socket::new(Policy::Failover, 3);
        let mut f = Fake::new(&[false, false, false]);
        let o = s.event(&mut f, 100);
        assert!(!o.delivered());
        assert_eq!(f.tried, vec![0, 1, 2]);
        f.tried.clear();
        f.up[2] = true;
        assert!(s.event(&mut f, 200).delivered());
        assert_eq!(f.tried, vec![0, 1, 2]);
    }

    #[test]
    fn failover_falls_back_on_passed_over_ones_when_the_rest_fail() {
        let s = Socket::new(Policy::Failover, 3);
        let mut f = Fake::new(&[false, true, true]);
        s.event(&mut f, 100); // 0 fails, now inside its window
        f.tried.clear();
        f.up = vec![true, false, false];
        assert!(s.event(&mut f, 200).delivered());
        // the healthy ones first, then the passed-over one, each once
        assert_eq!(f.tried, vec![1, 2, 0]);
    }

    #[test]
    fn window_zero_never_skips() {
        let s = Socket::new(Policy::Failover, 2);
        let mut f = Fake::new(&[false, true]);
        let zero = Rules { window_ms: 0 };
        for now in [5, 6] {
            done(deliver(
                s.policy,
                &s.rotation,
                None,
                &s.subs,
                zero,
                now,
                &mut f,
            ));
        }
        assert_eq!(f.tried, vec![0, 1, 0, 1]);
    }

    #[test]
    fn round_robin_goes_in_order_from_the_first() {
        let s = Socket::new(Policy::RoundRobin, 3);
        let mut f = Fake::new(&[true, true, true]);
        for _ in 0..7 {
            assert!(s.event(&mut f, 10).delivered());
        }
        assert_eq!(f.tried, vec![0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn round_robin_moves_a_failed_event_on_and_loses_nothing() {
        let s = Socket::new(Policy::RoundRobin, 3);
        let mut f = Fake::new(&[true, false, true]);
        let all: Vec<bool> = (0..30)
            .map(|t| s.event(&mut f, 10 + t).delivered())
            .collect();
        assert!(all.iter().all(|&d| d));
        // 1 failed once, then was passed over for the rest of its window
        assert_eq!(f.tried.iter().filter(|&&i| i == 1).count(), 1);
        let share = |k| f.tried.iter().filter(|&&i| i == k).count();
        assert!(share(0).abs_diff(share(2)) <= 1, "{:?}", f.tried);
        assert_eq!(share(0) + share(2), 30);
    }

    #[test]
    fn round_robin_spreads_a_passed_over_share_evenly() {
        let s = Socket::new(Policy::RoundRobin, 4);
        let mut f = Fake::new(&[true, false, true, true]);
        s.event(&mut f, 1); // ticket 0 -> subscriber 0
        s.event(&mut f, 1); // ticket 1 -> 1 fails, moves on to 2
        f.tried.clear();
        for _ in 0..300 {
            s.event(&mut f, 2);
        }
        let share = |k| f.tried.iter().filter(|&&i| i == k).count();
        assert_eq!((share(0), share(1), share(2), share(3)), (100, 0, 100, 100));
    }

    #[test]
    fn round_robin_after_the_window_tries_the_failed_one_again() {
        let s = Socket::new(Policy::RoundRobin, 2);
        let mut f = Fake::new(&[false, true]);
        s.event(&mut f, 0); // 0 fails, 1 takes it
        f.up[0] = true;
        f.tried.clear();
        for _ in 0..4 {
            s.event(&mut f, 500);
        }
        assert_eq!(f.tried, vec![1, 1, 1, 1]);
        f.tried.clear();
        for _ in 0..4 {
            s.event(&mut f, 1500);
        }
        // tickets 5..8: back in the rotation, sharing evenly
        assert_eq!(f.tried, vec![1, 0, 1, 0]);
    }

    #[test]
    fn round_robin_with_everyone_failing_tries_each_once() {
        let s = Socket::new(Policy::RoundRobin, 3);
        let mut f = Fake::new(&[false, false, false]);
        s.event(&mut f, 1);
        s.event(&mut f, 2);
        assert_eq!(f.tried, vec![0, 1, 2, 1, 2, 0]);
    }

    #[test]
    fn the_announced_start_is_where_the_next_event_starts() {
        // 4 subscribers, one of them (at each place in turn) passed over:
        // tickets are dealt over 3, so `ticket % 4` would be wrong
        for dead in 0..4 {
            let s = Socket::new(Policy::RoundRobin, 4);
            let mut up = [true; 4];
            up[dead] = false;
            let mut f = Fake::new(&up);
            record(&s.rotation, &s.subs, dead, false, 1, &mut f);
            for t in 0..24 {
                let announced = s.rotation.next(&s.subs, RULES.window_ms, 2);
                f.tried.clear();
                assert!(s.event(&mut f, 2).delivered());
                assert_eq!(f.tried[0], announced, "dead {dead}, event {t}");
                assert_ne!(announced, dead);
            }
        }
    }

    #[test]
    fn the_reported_case_starts_at_the_first_healthy_one() {
        // rotation 10 over three, the second passed over: 10 % 3 would name
        // subscriber 1, but the event goes to the (10 % 2)-th healthy one
        let s = Socket::new(Policy::RoundRobin, 3);
        let mut f = Fake::new(&[true; 3]);
        let start = |t| rotation_start(&s.rotation, t, &s.subs, RULES.window_ms, 2);
        record(&s.rotation, &s.subs, 1, false, 1, &mut f);
        assert_eq!(start(10), 0);
        assert_eq!(start(11), 2);
        // with all of them passed over (or none) it is plain ticket % n
        record(&s.rotation, &s.subs, 0, false, 1, &mut f);
        record(&s.rotation, &s.subs, 2, false, 1, &mut f);
        assert_eq!(start(10), 1);
    }

    #[test]
    fn health_transitions_are_reported_once() {
        let h = Health::default();
        assert_eq!(h.record(true, 1), None);
        assert_eq!(h.record(false, 2), Some(Transition::Failing));
        assert_eq!(h.record(false, 3), None);
        assert_eq!(h.record(true, 4), Some(Transition::Recovered));
        assert_eq!(h.record(true, 5), None);
        assert_eq!((h.attempts(), h.failures()), (5, 2));
    }

    #[test]
    fn only_this_nodes_own_transitions_are_told_once_each() {
        let h = Health::default();
        assert_eq!(h.take_untold(5), None);
        h.record(false, 100);
        h.record(false, 150); // no transition: nothing more to tell
        assert_eq!(h.take_untold(400), Some(Told::Failing { age_ms: 250 }));
        assert_eq!(h.take_untold(400), None);
        h.record(true, 500);
        assert_eq!(h.take_untold(600), Some(Told::Healthy));
        // what a peer told is never told on (no echo between nodes)
        h.hear(Told::Failing { age_ms: 0 }, 2, 700);
        assert_eq!(h.take_untold(800), None);
    }

    #[test]
    fn a_peers_failure_skips_the_subscriber_without_an_attempt() {
        let s = Socket::new(Policy::Failover, 2);
        let t = hear(
            &s.rotation,
            &s.subs,
            0,
            Told::Failing { age_ms: 300 },
            2,
            1000,
        );
        assert_eq!(t, Some(Transition::Failing));
        let h = &s.subs[0].0;
        assert_eq!(h.peer(), Some(2));
        // the window counts from the failure at the peer: 700 ms are left
        assert_eq!(h.state(1000, 1000), State::Skipped { for_ms: 700 });
        let mut f = Fake::new(&[true, true]);
        assert_eq!(s.event(&mut f, 1000).taken, 1);
        assert_eq!(f.tried, [1]);
        assert_eq!((h.attempts(), h.failures()), (0, 0));
        // and it is tried again once the window is over
        let mut f = Fake::new(&[true, true]);
        s.event(&mut f, 1700);
        assert_eq!(f.tried, [0]);
        assert_eq!(h.peer(), None, "an attempt makes the state this node's own");
    }

    #[test]
    fn a_peers_recovery_takes_its_failure_back() {
        let s = Socket::new(Policy::RoundRobin, 3);
        hear(&s.rotation, &s.subs, 1, Told::Failing { age_ms: 0 }, 2, 50);
        assert_eq!(s.rotation.failing.load(Relaxed), 1);
        let t = hear(&s.rotation, &s.subs, 1, Told::Healthy, 2, 60);
        assert_eq!(t, Some(Transition::Recovered));
        assert_eq!(s.rotation.failing.load(Relaxed), 0);
        assert_eq!(s.subs[1].0.state(60, 1000), State::Healthy);
        assert_eq!(s.subs[1].0.peer(), Some(2));
        // told twice: counted once
        assert_eq!(hear(&s.rotation, &s.subs, 1, Told::Healthy, 2, 70), None);
        assert_eq!(s.rotation.failing.load(Relaxed), 0);
    }

    #[test]
    fn of_two_failures_the_later_counts() {
        let h = Health::default();
        h.record(false, 900);
        // the peer's is older: this node's own stands
        assert_eq!(h.hear(Told::Failing { age_ms: 500 }, 2, 1000), None);
        assert_eq!(
            (h.state(1000, 1000), h.peer()),
            (State::Skipped { for_ms: 900 }, None)
        );
        // the peer's is newer: its window
        h.hear(Told::Failing { age_ms: 10 }, 3, 1000);
        assert_eq!(
            (h.state(1000, 1000), h.peer()),
            (State::Skipped { for_ms: 990 }, Some(3))
        );
        // an age longer than this node's clock is still a failure
        let h = Health::default();
        assert_eq!(
            h.hear(Told::Failing { age_ms: 99 }, 2, 5),
            Some(Transition::Failing)
        );
        assert_eq!(h.state(5, 0), State::Failing);
    }

    #[test]
    fn states_follow_the_window() {
        let h = Health::default();
        assert_eq!(h.state(5, 100), State::Healthy);
        h.record(false, 10);
        assert_eq!(h.state(10, 100), State::Skipped { for_ms: 100 });
        assert_eq!(h.state(60, 100), State::Skipped { for_ms: 50 });
        assert!(h.skipped(109, 100) && !h.skipped(110, 100));
        assert_eq!(h.state(110, 100), State::Failing);
        assert_eq!(h.state(11, 0), State::Failing);
        h.record(true, 200);
        assert_eq!(h.state(201, 100), State::Healthy);
    }

    #[test]
    fn eligible_when_the_first_window_ends() {
        let s = [
            State::Skipped { for_ms: 300 },
            State::Skipped { for_ms: 100 },
        ];
        assert_eq!(eligible_at(1000, s), 1100);
        assert_eq!(eligible_at(1000, [s[0], State::Failing]), 1000);
        assert_eq!(eligible_at(1000, [State::Healthy]), 1000);
        assert_eq!(eligible_at(1000, []), 1000);
    }

    #[test]
    fn the_failing_count_stays_exact_under_concurrent_reports() {
        let s = Socket::new(Policy::RoundRobin, 8);
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let s = &s;
                sc.spawn(move || {
                    let mut f = Fake::new(&[true; 8]);
                    let mut x = t + 1;
                    for k in 0..20_000 {
                        x = fmix64(x);
                        record(
                            &s.rotation,
                            &s.subs,
                            (x % 8) as usize,
                            x & 16 == 0,
                            k,
                            &mut f,
                        );
                    }
                });
            }
        });
        let failing = s.subs.iter().filter(|x| x.0.state(0, 0) != State::Healthy);
        assert_eq!(s.rotation.failing.load(Relaxed) as usize, failing.count());
        // every one recovers: back to 0, and to the fast path
        let mut f = Fake::new(&[true; 8]);
        for i in 0..8 {
            record(&s.rotation, &s.subs, i, true, 1, &mut f);
        }
        assert_eq!(s.rotation.failing.load(Relaxed), 0);
    }

    #[test]
    fn the_fast_path_and_the_walk_agree() {
        for n in 1..9 {
            let s = Socket::new(Policy::RoundRobin, n);
            let mut f = Fake::new(&vec![true; n]);
            let walked = Rotation::default();
            walked.failing.store(1, Relaxed); // as if one failed: the walk
            // all healthy, then one failing out of its window: tickets go
            // round the same either way
            for (sub, now) in [(None, 5), (Some(n - 1), 5000)] {
                if let Some(i) = sub {
                    record(&s.rotation, &s.subs, i, false, 1, &mut f);
                }
                for t in 0..3 * n as u64 {
                    let fast = rotation_start(&s.rotation, t, &s.subs, RULES.window_ms, now);
                    let walk = rotation_start(&walked, t, &s.subs, RULES.window_ms, now);
                    assert_eq!((fast, walk), ((t % n as u64) as usize, fast), "{n} {t}");
                }
            }
        }
    }

    #[test]
    fn a_failure_at_time_zero_still_counts() {
        let h = Health::default();
        h.record(false, 0);
        assert!(h.skipped(0, 10));
    }

    #[test]
    fn handles_the_largest_socket() {
        let s = Socket::new(Policy::RoundRobin, MAX_SUBSCRIBERS);
        let mut up = vec![false; MAX_SUBSCRIBERS];
        up[MAX_SUBSCRIBERS - 1] = true;
        let mut f = Fake::new(&up);
        assert!(s.event(&mut f, 1).delivered());
        assert_eq!(f.tried.len(), MAX_SUBSCRIBERS);
    }

    #[test]
    fn rotation_is_shared_between_threads() {
        let s = Socket::new(Policy::RoundRobin, 3);
        let counts: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        struct Counting<'a>(&'a [AtomicU64]);
        impl Driver for Counting<'_> {
            fn attempt(&mut self, i: usize, _: &Walk) -> Attempt {
                self.0[i].fetch_add(1, Relaxed);
                Attempt::Taken
            }
            fn transition(&mut self, _: usize, _: Transition) {}
        }
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    let mut d = Counting(&counts);
                    for _ in 0..3000 {
                        deliver(s.policy, &s.rotation, None, &s.subs, RULES, 1, &mut d);
                    }
                });
            }
        });
        for c in &counts {
            assert_eq!(c.load(Relaxed), 4000);
        }
    }

    #[test]
    fn failover_waits_for_an_asynchronous_report_and_moves_on_after_a_failure() {
        let s = Socket::new(Policy::Failover, 3);
        let mut f = Fake::new(&[true, true, true]);
        f.asynchronous[0] = true;
        assert_eq!(s.start(&mut f, 10), Progress::Pending);
        assert_eq!(f.tried, vec![0]);
        let (i, mut walk) = f.parked.pop().unwrap();
        // the report comes later (in another process, in the module)
        let o = done(walk.resume(i, false, &s.rotation, &s.subs, RULES, 20, &mut f));
        assert_eq!(f.tried, vec![0, 1]);
        assert_eq!((o.attempts, o.taken), (2, 1));
        assert_eq!(f.transitions, vec![(0, Transition::Failing)]);
        // and the failed asynchronous subscriber is now skipped
        f.tried.clear();
        s.event(&mut f, 30);
        assert_eq!(f.tried, vec![1]);
    }

    #[test]
    fn an_asynchronous_success_settles_the_event() {
        let s = Socket::new(Policy::RoundRobin, 2);
        let mut f = Fake::new(&[true, true]);
        f.asynchronous = vec![true, true];
        assert_eq!(s.start(&mut f, 10), Progress::Pending);
        let (i, mut walk) = f.parked.pop().unwrap();
        let o = done(walk.resume(i, true, &s.rotation, &s.subs, RULES, 11, &mut f));
        assert!(o.delivered());
        assert_eq!(f.tried, vec![0]);
    }

    #[test]
    fn a_chain_of_asynchronous_failures_ends_after_each_was_tried_once() {
        let s = Socket::new(Policy::RoundRobin, 3);
        let mut f = Fake::new(&[false, false, false]);
        f.asynchronous = vec![true, true, true];
        let mut progress = s.start(&mut f, 1);
        let mut reports = 0;
        while progress == Progress::Pending {
            let (i, mut walk) = f.parked.pop().unwrap();
            progress = walk.resume(i, false, &s.rotation, &s.subs, RULES, 2, &mut f);
            reports += 1;
        }
        assert_eq!(reports, 3);
        assert!(!done(progress).delivered());
        assert_eq!(f.tried, vec![0, 1, 2]);
    }

    #[test]
    fn parallel_counts_asynchronous_acceptance_and_goes_on() {
        let s = Socket::new(Policy::Parallel, 3);
        let mut f = Fake::new(&[true, true, false]);
        f.asynchronous[0] = true;
        let o = s.event(&mut f, 1);
        assert_eq!(f.tried, vec![0, 1, 2]);
        assert_eq!((o.attempts, o.taken, o.delivered()), (3, 2, false));
        // the later report only updates health
        record(&s.rotation, &s.subs, 0, false, 2, &mut f);
        assert_eq!(
            f.transitions,
            vec![(2, Transition::Failing), (0, Transition::Failing)]
        );
    }

    // ---- HASH --------------------------------------------------------------

    fn hashed(tokens: &[&str]) -> Vec<Sub> {
        let toks: Vec<&[u8]> = tokens.iter().map(|t| t.as_bytes()).collect();
        seeds(&toks)
            .into_iter()
            .map(|s| Sub(Health::seeded(s)))
            .collect()
    }

    const THREE: [&str; 3] = [
        "udp:127.0.0.1:9001",
        "udp:127.0.0.1:9002",
        "udp:127.0.0.1:9003",
    ];

    fn hash_event(subs: &[Sub], value: &[u8], f: &mut Fake, now: u64) -> Outcome {
        let rotation = Rotation::default();
        done(deliver(
            Policy::Hash,
            &rotation,
            Some(value),
            subs,
            RULES,
            now,
            f,
        ))
    }

    #[test]
    fn the_documented_hash_gives_these_numbers() {
        // the worked example of doc/architecture.md, "Appendix: the mathematics of HASH"
        assert_eq!(digest(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(digest(b"a"), 0xaf63_dc4c_8601_ec8c);
        let toks: Vec<&[u8]> = THREE.iter().map(|t| t.as_bytes()).collect();
        let s = seeds(&toks);
        let d = digest(b"call-1@example.com");
        let scores: Vec<u64> = s.iter().map(|&x| score(x, d)).collect();
        assert_eq!(d, 0xebd2_9311_b8bb_dd66);
        assert_eq!(
            s,
            vec![
                0x7792_0e03_3fb0_d8d5,
                0x0d7b_1f2c_cbcb_4419,
                0xcde3_07a2_2bb7_1b93
            ]
        );
        assert_eq!(
            scores,
            vec![
                0x0a24_b826_3a86_9bb1,
                0x9dec_b073_4306_da24,
                0x034b_b82b_3218_47dc
            ]
        );
        assert_eq!(hash_order(d, &s), vec![1, 0, 2]);
    }

    #[test]
    fn int_text_is_the_decimal_form() {
        let mut buf = [0u8; 11];
        for n in [0, 7, 42, -1, -42, 1_000_000, i32::MAX, i32::MIN] {
            assert_eq!(int_text(n, &mut buf), n.to_string().as_bytes());
        }
    }

    #[test]
    fn a_repeated_token_gets_a_seed_per_occurrence() {
        let s = seeds(&[b"udp:a:1", b"udp:b:1", b"udp:a:1"]);
        assert_eq!(s[0], seed(b"udp:a:1", 0));
        assert_eq!(s[2], seed(b"udp:a:1", 1));
        assert_ne!(s[0], s[2]);
    }

    #[test]
    fn hash_sends_a_value_to_its_best_ranked_subscriber_every_time() {
        let subs = hashed(&THREE);
        let seeds: Vec<u64> = subs.iter().map(|s| s.0.seed()).collect();
        let mut f = Fake::new(&[true, true, true]);
        let mut share = [0usize; 3];
        for v in 0..3000 {
            let value = format!("call-{v}");
            let best = hash_order(digest(value.as_bytes()), &seeds)[0];
            for _ in 0..2 {
                f.tried.clear();
                assert!(hash_event(&subs, value.as_bytes(), &mut f, 10).delivered());
                assert_eq!(f.tried, vec![best]);
            }
            share[best] += 1;
        }
        for c in share {
            assert!((850..1150).contains(&c), "{share:?}");
        }
    }

    #[test]
    fn hash_walks_the_rendezvous_order_healthy_first() {
        let tokens: Vec<String> = (0..7).map(|i| format!("udp:10.0.0.{i}:1")).collect();
        let toks: Vec<&str> = tokens.iter().map(String::as_str).collect();
        for v in 0..200 {
            let subs = hashed(&toks);
            let seeds: Vec<u64> = subs.iter().map(|s| s.0.seed()).collect();
            let value = format!("v{v}");
            let order = hash_order(digest(value.as_bytes()), &seeds);
            // some subscribers failed recently (by the value, to vary it)
            let down: Vec<bool> = (0..7).map(|i| (v + i) % 3 == 0).collect();
            for (i, &d) in down.iter().enumerate() {
                if d {
                    subs[i].0.record(false, 5);
                }
            }
            let mut f = Fake::new(&[false; 7]);
            let o = hash_event(&subs, value.as_bytes(), &mut f, 10);
            assert!(!o.delivered());
            let expected: Vec<usize> = order
                .iter()
                .copied()
                .filter(|&i| !down[i])
                .chain(order.iter().copied().filter(|&i| down[i]))
                .collect();
            assert_eq!(f.tried, expected, "value {value}");
            let d = digest(value.as_bytes());
            assert_eq!(hash_attempts(d, &seeds, &down), expected);
        }
    }

    #[test]
    fn hash_moves_only_a_failed_subscribers_values_and_brings_them_back() {
        let subs = hashed(&THREE);
        let values: Vec<String> = (0..600).map(|v| format!("tag{v}")).collect();
        let place = |f: &mut Fake, now| -> Vec<usize> {
            values
                .iter()
                .map(|v| {
                    f.tried.clear();
                    hash_event(&subs, v.as_bytes(), f, now);
                    *f.tried.last().unwrap()
                })
                .collect()
        };
        let mut f = Fake::new(&[true, true, true]);
        let before = place(&mut f, 10);
        f.up[1] = false;
        let during = place(&mut f, 20);
        let mut moved_to = [0usize; 3];
        for (b, d) in before.iter().zip(&during) {
            if *b != 1 {
                assert_eq!(b, d, "a healthy subscriber's value moved");
            } else {
                moved_to[*d] += 1;
            }
        }
        assert_eq!(moved_to[1], 0);
        // spread over both others, not handed to one neighbour
        assert!(moved_to[0] > 50 && moved_to[2] > 50, "{moved_to:?}");
        // back after its window
        f.up[1] = true;
        assert_eq!(place(&mut f, 20 + RULES.window_ms), before);
    }

    #[test]
    fn adding_a_subscriber_moves_about_a_share_of_the_values() {
        let three = hashed(&THREE);
        let mut four_tokens = THREE.to_vec();
        four_tokens.push("unix:/run/new.sock");
        let four = hashed(&four_tokens);
        let best = |subs: &[Sub], v: &str| {
            let seeds: Vec<u64> = subs.iter().map(|s| s.0.seed()).collect();
            hash_order(digest(v.as_bytes()), &seeds)[0]
        };
        let mut moved = 0;
        for v in 0..4000 {
            let v = format!("{v}");
            let (a, b) = (best(&three, &v), best(&four, &v));
            if a != b {
                assert_eq!(b, 3, "a value moved between old subscribers");
                moved += 1;
            }
        }
        assert!((800..1200).contains(&moved), "{moved} of 4000 moved");
    }

    #[test]
    fn a_repeated_subscriber_weighs_double() {
        let subs = hashed(&["udp:a:1", "udp:b:1", "udp:a:1"]);
        let seeds: Vec<u64> = subs.iter().map(|s| s.0.seed()).collect();
        let a = (0..6000)
            .filter(|v| {
                let first = hash_order(digest(format!("{v}").as_bytes()), &seeds)[0];
                first != 1
            })
            .count();
        assert!((3700..4300).contains(&a), "{a} of 6000 to udp:a:1");
    }

    #[test]
    fn hash_without_the_value_rotates_like_round_robin() {
        let subs = hashed(&THREE);
        let rotation = Rotation::default();
        let mut f = Fake::new(&[true, true, true]);
        for _ in 0..6 {
            done(deliver(
                Policy::Hash,
                &rotation,
                None,
                &subs,
                RULES,
                1,
                &mut f,
            ));
        }
        assert_eq!(f.tried, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn hash_continues_an_asynchronous_failure_in_the_value_order() {
        let subs = hashed(&THREE);
        let seeds: Vec<u64> = subs.iter().map(|s| s.0.seed()).collect();
        let order = hash_order(digest(b"k"), &seeds);
        let mut f = Fake::new(&[false, false, false]);
        f.asynchronous = vec![true, true, true];
        let rotation = Rotation::default();
        let mut progress = deliver(Policy::Hash, &rotation, Some(b"k"), &subs, RULES, 1, &mut f);
        while progress == Progress::Pending {
            let (i, mut walk) = f.parked.pop().unwrap();
            // the walk is resumed from a copy, as a chain in shm is
            progress = walk.resume(i, false, &rotation, &subs, RULES, 2, &mut f);
        }
        assert_eq!(f.tried, order);
        assert!(!done(progress).delivered());
    }
}
