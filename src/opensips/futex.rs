//! Sleeping on a word of shared memory until another process changes it.

use std::ptr::null_mut;
use std::sync::atomic::AtomicU32;

/// Sleep until `word` is no longer `seen`, or `ms` have passed (or a
/// signal).  Shared (not FUTEX_PRIVATE): shm is one mapping in every
/// process.
pub fn wait(word: &AtomicU32, seen: u32, ms: u64) {
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as libc::time_t,
        tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: word is a live, aligned u32; ts a valid timespec; the
    // kernel only reads them.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            seen,
            &ts as *const libc::timespec,
            null_mut::<u32>(),
            0,
        );
    }
}

/// Wake whoever sleeps on `word`.
pub fn wake(word: &AtomicU32) {
    // SAFETY: word is a live, aligned u32; no other argument is read.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            null_mut::<libc::timespec>(),
            null_mut::<u32>(),
            0,
        );
    }
}
