//! The delivery policies: which subscribers an event is attempted on, in
//! which order, and how a subscriber's health changes.
//!
//! All state here lives in OpenSIPS shared memory and is shared by every
//! process, so it is nothing but atomics: no lock is taken and nothing is
//! allocated while an event is delivered.  The transport itself is behind
//! the [`Driver`] trait, so the tests run these rules over a fake one.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::socket::{MAX_SUBSCRIBERS, Policy};

/// One subscriber's health and counters.
#[derive(Debug, Default)]
#[repr(C)]
pub struct Health {
    /// When the last attempt failed (ms on a clock shared by all
    /// processes), or 0 when the last attempt succeeded.
    failed_at: AtomicU64,
    attempts: AtomicU64,
    failures: AtomicU64,
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

/// A change in a subscriber's health, reported once per change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Failing,
    Recovered,
}

impl Health {
    /// Inside its failover window: passed over while others are healthy.
    /// A window of 0 never skips.
    pub fn skipped(&self, now_ms: u64, window_ms: u64) -> bool {
        let at = self.failed_at.load(Relaxed);
        window_ms != 0 && at != 0 && now_ms.saturating_sub(at) < window_ms
    }

    /// Record one attempt's result; returns the transition it caused.
    pub fn record(&self, ok: bool, now_ms: u64) -> Option<Transition> {
        self.attempts.fetch_add(1, Relaxed);
        if ok {
            (self.failed_at.swap(0, Relaxed) != 0).then_some(Transition::Recovered)
        } else {
            self.failures.fetch_add(1, Relaxed);
            // 0 means healthy, so a failure is never recorded as time 0
            (self.failed_at.swap(now_ms.max(1), Relaxed) == 0).then_some(Transition::Failing)
        }
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
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Walk {
    policy: Policy,
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
    /// Start one event.  A ROUND-ROBIN event takes the next ticket from the
    /// socket's shared `rotation` counter.
    pub fn begin<S: AsRef<Health>>(
        policy: Policy,
        rotation: &AtomicU64,
        subs: &[S],
        rules: Rules,
        now_ms: u64,
    ) -> Walk {
        let start = match policy {
            Policy::RoundRobin if !subs.is_empty() => {
                let ticket = rotation.fetch_add(1, Relaxed);
                rotation_start(ticket, subs, rules.window_ms, now_ms)
            }
            _ => 0,
        };
        Walk {
            policy,
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
                    record(subs, i, ok, now_ms, driver);
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
    pub fn resume<S: AsRef<Health>, D: Driver>(
        &mut self,
        i: usize,
        ok: bool,
        subs: &[S],
        rules: Rules,
        now_ms: u64,
        driver: &mut D,
    ) -> Progress {
        record(subs, i, ok, now_ms, driver);
        if ok {
            self.taken += 1;
            return Progress::Done(self.outcome());
        }
        self.run(subs, rules, now_ms, driver)
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
        let passes = if self.policy == Policy::Parallel {
            1
        } else {
            2
        };
        while self.step < passes * n {
            let k = self.step;
            self.step += 1;
            let i = ((self.start + k % n) % n) as usize;
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

/// Record subscriber `i`'s result and report the change it makes, if any.
/// Asynchronous reports come here too, through [`Walk::resume`]; a
/// PARALLEL subscriber's report, which continues nothing, through this.
pub fn record<S: AsRef<Health>, D: Driver>(
    subs: &[S],
    i: usize,
    ok: bool,
    now_ms: u64,
    driver: &mut D,
) {
    if let Some(t) = subs[i].as_ref().record(ok, now_ms) {
        driver.transition(i, t);
    }
}

/// One event, offered synchronously: [`Walk::begin`] then [`Walk::run`].
pub fn deliver<S: AsRef<Health>, D: Driver>(
    policy: Policy,
    rotation: &AtomicU64,
    subs: &[S],
    rules: Rules,
    now_ms: u64,
    driver: &mut D,
) -> Progress {
    Walk::begin(policy, rotation, subs, rules, now_ms).run(subs, rules, now_ms, driver)
}

/// Where a ROUND-ROBIN event with this ticket starts.  Tickets are dealt
/// over the healthy subscribers only, so that a passed-over subscriber's
/// share is spread over all healthy ones rather than handed to its
/// neighbour; with every subscriber healthy (or none) this is plain
/// `ticket % n`.
///
/// Delivery asks it with the ticket it takes, and MI `event_virtual_list`
/// with the ticket the next event will take: one answer for both, so the
/// subscriber the list names as next is the one the event goes to.
pub fn rotation_start<S: AsRef<Health>>(
    ticket: u64,
    subs: &[S],
    window_ms: u64,
    now_ms: u64,
) -> usize {
    let n = subs.len();
    let healthy = subs
        .iter()
        .filter(|s| !s.as_ref().skipped(now_ms, window_ms))
        .count();
    if healthy == 0 || healthy == n {
        return (ticket % n as u64) as usize;
    }
    let k = (ticket % healthy as u64) as usize;
    subs.iter()
        .enumerate()
        .filter(|(_, s)| !s.as_ref().skipped(now_ms, window_ms))
        .nth(k)
        // health may change under us between the count and the walk
        .map_or((ticket % n as u64) as usize, |(i, _)| i)
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
        rotation: AtomicU64,
        subs: Vec<Sub>,
    }

    impl Socket {
        fn new(policy: Policy, n: usize) -> Socket {
            Socket {
                policy,
                rotation: AtomicU64::new(0),
                subs: subs(n),
            }
        }
        fn event(&self, fake: &mut Fake, now: u64) -> Outcome {
            done(self.start(fake, now))
        }
        fn start(&self, fake: &mut Fake, now: u64) -> Progress {
            deliver(self.policy, &self.rotation, &self.subs, RULES, now, fake)
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
        done(deliver(s.policy, &s.rotation, &s.subs, zero, 5, &mut f));
        done(deliver(s.policy, &s.rotation, &s.subs, zero, 6, &mut f));
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
            s.subs[dead].0.record(false, 1);
            for t in 0..24 {
                let ticket = s.rotation.load(Relaxed);
                let announced = rotation_start(ticket, &s.subs, RULES.window_ms, 2);
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
        s.subs[1].0.record(false, 1);
        assert_eq!(rotation_start(10, &s.subs, RULES.window_ms, 2), 0);
        assert_eq!(rotation_start(11, &s.subs, RULES.window_ms, 2), 2);
        // with all of them passed over (or none) it is plain ticket % n
        s.subs[0].0.record(false, 1);
        s.subs[2].0.record(false, 1);
        assert_eq!(rotation_start(10, &s.subs, RULES.window_ms, 2), 1);
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
                        deliver(s.policy, &s.rotation, &s.subs, RULES, 1, &mut d);
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
        let o = done(walk.resume(i, false, &s.subs, RULES, 20, &mut f));
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
        let o = done(walk.resume(i, true, &s.subs, RULES, 11, &mut f));
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
            progress = walk.resume(i, false, &s.subs, RULES, 2, &mut f);
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
        record(&s.subs, 0, false, 2, &mut f);
        assert_eq!(
            f.transitions,
            vec![(2, Transition::Failing), (0, Transition::Failing)]
        );
    }
}
