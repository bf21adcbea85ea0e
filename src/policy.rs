//! The delivery policies: which subscribers an event is attempted on, in
//! which order, and how a subscriber's health changes.
//!
//! All state here lives in OpenSIPS shared memory and is shared by every
//! process, so it is nothing but atomics: no lock is taken and nothing is
//! allocated while an event is delivered.  The transport itself is behind
//! the [`Driver`] trait, so the tests run these rules over a fake one.

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

    pub fn attempts(&self) -> u64 {
        self.attempts.load(Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }
}

/// What the policies need from the world: one attempt on one subscriber,
/// and somewhere to report health changes.
pub trait Driver {
    /// Hand the event to subscriber `i`; true when it took it.
    fn attempt(&mut self, i: usize) -> bool;
    /// Subscriber `i` changed health because of this event's attempt.
    fn transition(&mut self, i: usize, t: Transition);
}

/// What became of one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// PARALLEL: every subscriber took it; otherwise: one of them did.
    pub delivered: bool,
    pub attempts: u32,
}

/// The rules of delivery, fixed for a run of the server.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// `failover_timeout`, in ms; 0 never skips.
    pub window_ms: u64,
}

/// One event on one virtual socket.
///
/// `rotation` is the socket's shared round-robin counter: each
/// ROUND-ROBIN event takes the next ticket.
pub fn deliver<S: AsRef<Health>, D: Driver>(
    policy: Policy,
    rotation: &AtomicU64,
    subs: &[S],
    rules: Rules,
    now_ms: u64,
    driver: &mut D,
) -> Outcome {
    let mut run = Run {
        subs,
        now_ms,
        driver,
        attempts: 0,
    };
    let n = subs.len();
    if n == 0 {
        return Outcome {
            delivered: false,
            attempts: 0,
        };
    }
    let delivered = match policy {
        Policy::Parallel => {
            // every subscriber, whatever the earlier ones did: no
            // short-circuit here (stopping at the first failure is the C
            // module's bug)
            let mut all = true;
            for i in 0..n {
                all &= run.try_one(i);
            }
            all
        }
        Policy::Failover => run.first_taker(0, rules.window_ms),
        Policy::RoundRobin => {
            let ticket = rotation.fetch_add(1, Relaxed);
            let start = rotation_start(ticket, subs, rules.window_ms, now_ms);
            run.first_taker(start, rules.window_ms)
        }
    };
    Outcome {
        delivered,
        attempts: run.attempts,
    }
}

/// Where a ROUND-ROBIN event starts.  Tickets are dealt over the healthy
/// subscribers only, so that a passed-over subscriber's share is spread
/// over all healthy ones rather than handed to its neighbour; with every
/// subscriber healthy (or none) this is plain `ticket % n`.
fn rotation_start<S: AsRef<Health>>(ticket: u64, subs: &[S], window_ms: u64, now_ms: u64) -> usize {
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

/// Which subscribers one event has passed over, without allocating.
struct Passed([u64; MAX_SUBSCRIBERS / 64]);

impl Passed {
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn has(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
}

struct Run<'a, S, D> {
    subs: &'a [S],
    now_ms: u64,
    driver: &'a mut D,
    attempts: u32,
}

impl<S: AsRef<Health>, D: Driver> Run<'_, S, D> {
    fn try_one(&mut self, i: usize) -> bool {
        self.attempts += 1;
        let ok = self.driver.attempt(i);
        if let Some(t) = self.subs[i].as_ref().record(ok, self.now_ms) {
            self.driver.transition(i, t);
        }
        ok
    }

    /// Attempt subscribers in order from `start`, wrapping, until one takes
    /// the event.  Those inside their failover window are passed over at
    /// first; if no other took the event they are attempted after all, in
    /// the same order: then every subscriber has failed recently, and an
    /// event is never dropped without an attempt on each.  Each subscriber
    /// is attempted at most once per event.
    fn first_taker(&mut self, start: usize, window_ms: u64) -> bool {
        let n = self.subs.len();
        let order = (0..n).map(|k| (start + k) % n);
        let mut passed = Passed([0; MAX_SUBSCRIBERS / 64]);
        for i in order.clone() {
            if self.subs[i].as_ref().skipped(self.now_ms, window_ms) {
                passed.set(i);
            } else if self.try_one(i) {
                return true;
            }
        }
        order.filter(|&i| passed.has(i)).any(|i| self.try_one(i))
    }
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

    /// A transport whose subscribers are up or down, recording every
    /// attempt and transition.
    struct Fake {
        up: Vec<bool>,
        tried: Vec<usize>,
        transitions: Vec<(usize, Transition)>,
    }

    impl Fake {
        fn new(up: &[bool]) -> Fake {
            Fake {
                up: up.to_vec(),
                tried: vec![],
                transitions: vec![],
            }
        }
    }

    impl Driver for Fake {
        fn attempt(&mut self, i: usize) -> bool {
            self.tried.push(i);
            self.up[i]
        }
        fn transition(&mut self, i: usize, t: Transition) {
            self.transitions.push((i, t));
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
            deliver(self.policy, &self.rotation, &self.subs, RULES, now, fake)
        }
    }

    #[test]
    fn parallel_attempts_everyone_whatever_fails() {
        let s = Socket::new(Policy::Parallel, 3);
        let mut f = Fake::new(&[false, true, true]);
        let o = s.event(&mut f, 10);
        assert_eq!(f.tried, vec![0, 1, 2]);
        assert_eq!(
            o,
            Outcome {
                delivered: false,
                attempts: 3
            }
        );
        // a failed subscriber is still attempted next time
        f.tried.clear();
        f.up[0] = true;
        assert!(s.event(&mut f, 20).delivered);
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
            assert!(s.event(&mut f, 10).delivered);
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
        assert!(!o.delivered);
        assert_eq!(f.tried, vec![0, 1, 2]);
        f.tried.clear();
        f.up[2] = true;
        assert!(s.event(&mut f, 200).delivered);
        assert_eq!(f.tried, vec![0, 1, 2]);
    }

    #[test]
    fn failover_falls_back_on_passed_over_ones_when_the_rest_fail() {
        let s = Socket::new(Policy::Failover, 3);
        let mut f = Fake::new(&[false, true, true]);
        s.event(&mut f, 100); // 0 fails, now inside its window
        f.tried.clear();
        f.up = vec![true, false, false];
        assert!(s.event(&mut f, 200).delivered);
        // the healthy ones first, then the passed-over one, each once
        assert_eq!(f.tried, vec![1, 2, 0]);
    }

    #[test]
    fn window_zero_never_skips() {
        let s = Socket::new(Policy::Failover, 2);
        let mut f = Fake::new(&[false, true]);
        let zero = Rules { window_ms: 0 };
        deliver(s.policy, &s.rotation, &s.subs, zero, 5, &mut f);
        deliver(s.policy, &s.rotation, &s.subs, zero, 6, &mut f);
        assert_eq!(f.tried, vec![0, 1, 0, 1]);
    }

    #[test]
    fn round_robin_goes_in_order_from_the_first() {
        let s = Socket::new(Policy::RoundRobin, 3);
        let mut f = Fake::new(&[true, true, true]);
        for _ in 0..7 {
            assert!(s.event(&mut f, 10).delivered);
        }
        assert_eq!(f.tried, vec![0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn round_robin_moves_a_failed_event_on_and_loses_nothing() {
        let s = Socket::new(Policy::RoundRobin, 3);
        let mut f = Fake::new(&[true, false, true]);
        let all: Vec<bool> = (0..30).map(|t| s.event(&mut f, 10 + t).delivered).collect();
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
        assert!(s.event(&mut f, 1).delivered);
        assert_eq!(f.tried.len(), MAX_SUBSCRIBERS);
    }

    #[test]
    fn rotation_is_shared_between_threads() {
        let s = Socket::new(Policy::RoundRobin, 3);
        let counts: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        struct Counting<'a>(&'a [AtomicU64]);
        impl Driver for Counting<'_> {
            fn attempt(&mut self, i: usize) -> bool {
                self.0[i].fetch_add(1, Relaxed);
                true
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
}
