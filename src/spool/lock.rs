//! The lock that guards one queue's links.
//!
//! The queue is in OpenSIPS shared memory and is changed by whichever
//! process raises, replays or unsubscribes, so its lock must work across
//! processes: a `std::sync::Mutex` or `parking_lot` lock lives in one
//! process's view and does not.  [`SpinLock`] is an atomic word and works
//! wherever the memory is shared; the FFI layer may instead implement
//! [`RawLock`] over OpenSIPS's `gen_lock_t`.  The tests use a lock built on
//! std to check that the queue relies only on the trait.

use std::hint::spin_loop;
use std::sync::atomic::{AtomicU32, Ordering};

/// Mutual exclusion between every process that shares the memory.
///
/// `lock` must synchronise with the previous `unlock` (acquire/release),
/// so that the relaxed atomics the queue changes under it are seen whole.
pub trait RawLock {
    fn lock(&self);
    fn unlock(&self);
}

/// A test-and-test-and-set spinlock in one shared word.
///
/// The queue holds it only for a handful of loads and stores (never across
/// a transport, an allocation or a log line), so a waiter spins briefly,
/// then yields its CPU rather than burn it while the holder is descheduled.
#[derive(Debug, Default)]
#[repr(C)]
pub struct SpinLock(AtomicU32);

/// Spins before a waiter starts yielding.
const SPINS: u32 = 100;

impl RawLock for SpinLock {
    fn lock(&self) {
        let mut spins = 0;
        while self
            .0
            .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.0.load(Ordering::Relaxed) != 0 {
                if spins < SPINS {
                    spins += 1;
                    spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }

    fn unlock(&self) {
        self.0.store(0, Ordering::Release);
    }
}

/// Holds a lock until dropped, so no early return leaves it held.
pub(crate) struct Guard<'a, L: RawLock>(&'a L);

impl<'a, L: RawLock> Guard<'a, L> {
    pub(crate) fn new(lock: &'a L) -> Self {
        lock.lock();
        Guard(lock)
    }
}

impl<L: RawLock> Drop for Guard<'_, L> {
    fn drop(&mut self) {
        self.0.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn excludes_between_threads() {
        let lock = SpinLock::default();
        // a non-atomic read-modify-write done with relaxed atomics: only the
        // lock keeps the two halves together
        let n = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        let _g = Guard::new(&lock);
                        let v = n.load(Relaxed);
                        n.store(v + 1, Relaxed);
                    }
                });
            }
        });
        assert_eq!(n.load(Relaxed), 80_000);
    }
}
