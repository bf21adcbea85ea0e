//! The module-wide shared-memory budget of the spool.
//!
//! OpenSIPS's shared memory is one fixed pool that the SIP server needs for
//! its transactions and dialogs; a spool that grew until `shm_malloc`
//! failed would take calls down.  So every held event is charged, in
//! bytes, to one budget for the whole module, in one shm block made before
//! the fork, and a charge that would pass the limit is refused (the queue
//! then drops its own oldest events, or the new one).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What the shm allocator spends per block beyond what was asked: its
/// fragment header and rounding (a little more than q_malloc's and
/// f_malloc's headers on 64-bit builds).  Charged so that many small held
/// events cannot take much more than the budget says.
pub const SHM_BLOCK_OVERHEAD: u64 = 48;

/// What a held event is charged: the sizes of the shm blocks it holds
/// (its node, with the event name; the `evi_dup_shm_params` copy, whose
/// size is `sizeof(evi_params_t) + n * sizeof(evi_param_t)` plus every
/// parameter's name and string value), each with the allocator's overhead;
/// a size of 0 is no block.
pub fn held_event_bytes(blocks: &[usize]) -> u64 {
    blocks
        .iter()
        .filter(|&&b| b > 0)
        .map(|&b| (b as u64).saturating_add(SHM_BLOCK_OVERHEAD))
        .fold(0, u64::saturating_add)
}

#[derive(Debug)]
#[repr(C)]
pub struct Budget {
    limit: AtomicU64,
    used: AtomicU64,
    /// Events held in every queue, for the replay process to idle on one
    /// load when there is nothing to do, and for a statistic.
    held: AtomicU64,
}

impl Budget {
    pub fn new(limit_bytes: u64) -> Budget {
        Budget {
            limit: AtomicU64::new(limit_bytes),
            used: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// Charge `bytes` if the total stays within the limit.  A
    /// compare-and-swap loop, so concurrent charges never pass the limit
    /// together.
    pub fn try_charge(&self, bytes: u64) -> bool {
        let limit = self.limit.load(Relaxed);
        self.used
            .fetch_update(Relaxed, Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= limit)
            })
            .is_ok()
    }

    /// Give back what a freed event was charged.
    pub fn release(&self, bytes: u64) {
        let before = self.used.fetch_sub(bytes, Relaxed);
        debug_assert!(before >= bytes, "released more than was charged");
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Relaxed)
    }

    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// Events held in all queues together.
    pub fn held(&self) -> u64 {
        self.held.load(Relaxed)
    }

    pub(crate) fn held_add(&self, n: u64) {
        self.held.fetch_add(n, Relaxed);
    }

    pub(crate) fn held_sub(&self, n: u64) {
        self.held.fetch_sub(n, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_would_pass_the_limit() {
        let b = Budget::new(100);
        assert!(b.try_charge(60));
        assert!(!b.try_charge(41));
        assert!(b.try_charge(40));
        assert!(!b.try_charge(1));
        b.release(60);
        assert_eq!(b.used(), 40);
        assert!(!b.try_charge(u64::MAX)); // no overflow
    }

    #[test]
    fn charges_each_block_with_its_overhead() {
        assert_eq!(held_event_bytes(&[100, 20]), 120 + 2 * SHM_BLOCK_OVERHEAD);
        assert_eq!(held_event_bytes(&[]), 0);
        assert_eq!(held_event_bytes(&[usize::MAX, usize::MAX]), u64::MAX);
    }

    #[test]
    fn concurrent_charges_never_pass_the_limit() {
        let b = Budget::new(1000);
        let granted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        if b.try_charge(7) {
                            granted.fetch_add(7, Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(b.used(), granted.load(Relaxed));
        assert!(b.used() <= 1000 && b.used() > 1000 - 7);
    }
}
