//! The lock of a queue in shared memory, and what a panic under it does.
//!
//! A queue is changed by whichever process raises, replays or
//! unsubscribes, so its lock must work across processes: [`SpinLock`] is
//! one atomic word, a [`lock_api::RawMutex`] (as ngx-rust builds its shared
//! memory mutex), so the queue's state is a plain struct inside a
//! [`Mutex`].  `std`'s and `parking_lot`'s mutexes park threads of one
//! process and cannot.
//!
//! A panic inside a critical section would leave that state half changed
//! for every other process, and `lock_api`'s guard unlocks on unwind; so
//! [`critical`] aborts the process instead (OpenSIPS then stops the
//! others): torn state is never published.

use std::hint::spin_loop;
use std::sync::atomic::{AtomicU32, Ordering};

/// A test-and-test-and-set spinlock in one shared word.  It is held for a
/// handful of pointer moves (never across a transport call, an allocation
/// or a log line), so a waiter spins briefly, then yields its CPU.
#[derive(Debug, Default)]
#[repr(C)]
pub struct SpinLock(AtomicU32);

/// Spins before a waiter starts yielding.
const SPINS: u32 = 100;

// SAFETY: lock and try_lock acquire the word with Acquire ordering and
// unlock releases it with Release, so one holder at a time and each sees
// the previous holder's writes; the word works in any process that maps it.
#[allow(unsafe_code)]
unsafe impl lock_api::RawMutex for SpinLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: SpinLock = SpinLock(AtomicU32::new(0));
    type GuardMarker = lock_api::GuardSend;

    fn lock(&self) {
        let mut spins = 0;
        while !self.try_lock() {
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

    fn try_lock(&self) -> bool {
        self.0
            .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    unsafe fn unlock(&self) {
        self.0.store(0, Ordering::Release);
    }
}

/// A mutex whose data may live in shared memory.
pub type Mutex<T> = lock_api::Mutex<SpinLock, T>;

/// Run `f` on the locked state; a panic inside aborts the process before
/// the guard could unlock (see the module's text).
pub fn critical<T, R>(m: &Mutex<T>, f: impl FnOnce(&mut T) -> R) -> R {
    struct Abort;
    impl Drop for Abort {
        fn drop(&mut self) {
            std::process::abort()
        }
    }
    let mut guard = m.lock();
    let bomb = Abort;
    let r = f(&mut guard);
    std::mem::forget(bomb);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_between_threads() {
        let m = Mutex::new((0u64, 0u64));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        critical(&m, |(a, b)| {
                            *a += 1;
                            *b = *a;
                        });
                    }
                });
            }
        });
        assert_eq!(*m.lock(), (80_000, 80_000));
    }

    /// Run by `a_panic_in_a_critical_section_aborts`, in a child process.
    #[test]
    #[ignore = "run in a child process by a_panic_in_a_critical_section_aborts"]
    fn panic_under_the_lock() {
        let m = Mutex::new(1);
        critical(&m, |v| {
            *v = 2;
            panic!("half way");
        });
    }

    #[test]
    fn a_panic_in_a_critical_section_aborts() {
        use std::os::unix::process::ExitStatusExt;
        let me = std::env::current_exe().unwrap();
        let out = std::process::Command::new(me)
            .args([
                "--ignored",
                "--exact",
                "--nocapture",
                "spool::lock::tests::panic_under_the_lock",
            ])
            .output()
            .unwrap();
        // killed by SIGABRT: the unlock that would publish `2` never ran
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("half way"));
    }
}
