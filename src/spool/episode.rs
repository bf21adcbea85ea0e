//! Drops are logged once per episode, with a count, never once per event.
//!
//! A queue that overflows while its subscriber is down for an hour drops
//! events at the rate they are raised; a log line for each would flood the
//! log exactly when the operator needs it.  Any process that drops adds to
//! the queue's [`Episodes`] (atomics, no lock); the replay process polls
//! them and logs one line when an episode ends: no drop for `quiet_ms`.  An
//! episode that goes on is reported every `max_ms` with its count so far,
//! so that a long outage still shows in the log while it lasts.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::Reason;

/// An episode ends after this long without a drop.
pub const QUIET_MS: u64 = 5_000;
/// A running episode is reported at least this often.
pub const MAX_MS: u64 = 60_000;

#[derive(Debug, Default)]
#[repr(C)]
pub struct Episodes {
    counts: [AtomicU64; Reason::COUNT],
    /// When the episode's first drop was recorded, 0 when none is open.
    first_ms: AtomicU64,
    last_ms: AtomicU64,
}

/// One episode's drops, to be logged as one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub counts: [u64; Reason::COUNT],
    pub first_ms: u64,
    pub last_ms: u64,
    /// False when the episode is still going on (reported after `max_ms`).
    pub ended: bool,
}

impl Report {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl fmt::Display for Report {
    /// `dropped 2000 held events (1990 queue full, 10 too old) in 12.3 s`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.total();
        let noun = if total == 1 { "event" } else { "events" };
        write!(f, "dropped {total} held {noun} (")?;
        let mut sep = "";
        for r in Reason::ALL {
            let n = self.counts[r as usize];
            if n > 0 {
                write!(f, "{sep}{n} {}", r.name())?;
                sep = ", ";
            }
        }
        let ms = self.last_ms.saturating_sub(self.first_ms);
        write!(f, ") in {}.{} s", ms / 1000, ms % 1000 / 100)?;
        if !self.ended {
            write!(f, ", still dropping")?;
        }
        Ok(())
    }
}

impl Episodes {
    /// `n` events dropped for `reason` at `now_ms`.  Any process, no lock.
    pub fn record(&self, reason: Reason, n: u64, now_ms: u64) {
        if n == 0 {
            return;
        }
        self.counts[reason as usize].fetch_add(n, Relaxed);
        // 0 means no open episode, so an episode never starts at time 0
        let now = now_ms.max(1);
        let _ = self.first_ms.compare_exchange(0, now, Relaxed, Relaxed);
        self.last_ms.fetch_max(now, Relaxed);
    }

    /// Drops recorded and not yet reported.
    pub fn is_open(&self) -> bool {
        self.first_ms.load(Relaxed) != 0 || self.last_ms.load(Relaxed) != 0
    }

    /// The replay process's poll: the episode to log now, if it ended
    /// (quiet for `quiet_ms`) or has run `max_ms` since it was last
    /// reported.
    pub fn poll(&self, now_ms: u64, quiet_ms: u64, max_ms: u64) -> Option<Report> {
        let first = self.first_ms.load(Relaxed);
        let last = self.last_ms.load(Relaxed);
        if first == 0 && last == 0 {
            return None;
        }
        let ended = now_ms.saturating_sub(last) >= quiet_ms;
        // first can be 0 if a drop raced the previous take: then the
        // episode's age is counted from its last drop
        let start = if first == 0 { last } else { first };
        if !ended && now_ms.saturating_sub(start) < max_ms {
            return None;
        }
        self.take_inner(ended, now_ms)
    }

    /// Whatever is pending, ended or not: when the queue goes away.
    pub fn take(&self, now_ms: u64) -> Option<Report> {
        self.take_inner(true, now_ms)
    }

    fn take_inner(&self, ended: bool, now_ms: u64) -> Option<Report> {
        // counts are swapped out one by one: a drop recorded meanwhile goes
        // into this report or the next one, never nowhere
        let mut counts = [0; Reason::COUNT];
        for (c, a) in counts.iter_mut().zip(&self.counts) {
            *c = a.swap(0, Relaxed);
        }
        let last = self.last_ms.load(Relaxed);
        let first = self.first_ms.swap(0, Relaxed);
        if ended {
            // a drop recorded after the swap above sets last again
            let _ = self.last_ms.compare_exchange(last, 0, Relaxed, Relaxed);
        } else {
            // still going: the next report counts from now
            self.first_ms.store(now_ms.max(1), Relaxed);
        }
        let report = Report {
            counts,
            first_ms: if first == 0 { last } else { first },
            last_ms: last,
            ended,
        };
        (report.total() > 0).then_some(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_report_per_episode_with_its_count() {
        let e = Episodes::default();
        for t in 0..1000 {
            e.record(Reason::Overflow, 1, 10_000 + t);
        }
        e.record(Reason::Age, 3, 10_999);
        assert!(e.is_open());
        // still dropping: nothing yet
        assert_eq!(e.poll(11_000, QUIET_MS, MAX_MS), None);
        assert_eq!(e.poll(15_998, QUIET_MS, MAX_MS), None);
        let r = e.poll(15_999, QUIET_MS, MAX_MS).unwrap();
        assert_eq!(r.total(), 1003);
        assert!(r.ended);
        assert_eq!(
            r.to_string(),
            "dropped 1003 held events (1000 queue full, 3 too old) in 0.9 s"
        );
        // and only once
        assert!(!e.is_open());
        assert_eq!(e.poll(20_000, QUIET_MS, MAX_MS), None);
        assert_eq!(e.take(20_000), None);
    }

    #[test]
    fn a_long_episode_is_reported_every_max_ms() {
        let e = Episodes::default();
        let mut reports = vec![];
        // a drop every 100 ms for 200 s: never quiet
        for t in (0..200_000).step_by(100) {
            e.record(Reason::Budget, 1, 1 + t);
            if let Some(r) = e.poll(1 + t, QUIET_MS, MAX_MS) {
                reports.push(r);
            }
        }
        reports.extend(e.poll(300_000, QUIET_MS, MAX_MS));
        assert_eq!(reports.len(), 4, "{reports:?}");
        assert!(reports[..3].iter().all(|r| !r.ended));
        assert!(reports[3].ended);
        // nothing lost between the reports
        assert_eq!(reports.iter().map(Report::total).sum::<u64>(), 2000);
        assert!(reports[0].to_string().ends_with("still dropping"));
    }

    #[test]
    fn take_flushes_a_running_episode() {
        let e = Episodes::default();
        e.record(Reason::Overflow, 1, 0); // time 0 still opens an episode
        let r = e.take(1).unwrap();
        assert_eq!(r.total(), 1);
        assert_eq!(
            r.to_string(),
            "dropped 1 held event (1 queue full) in 0.0 s"
        );
        assert_eq!(e.take(2), None);
    }

    #[test]
    fn concurrent_drops_are_all_reported() {
        let e = Episodes::default();
        let reported = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for t in 0..10_000 {
                        e.record(Reason::Overflow, 1, t);
                    }
                });
            }
            s.spawn(|| {
                for t in 0..10_000 {
                    if let Some(r) = e.poll(t, 0, 0) {
                        reported.fetch_add(r.total(), Relaxed);
                    }
                }
            });
        });
        let rest = e.take(u64::MAX).map_or(0, |r| r.total());
        assert_eq!(reported.load(Relaxed) + rest, 30_000);
    }
}
