//! OpenSIPS's restart-persistent memory (`mem/rpm_mem.h`): a file the core
//! maps at a fixed address, before the fork, into every process; what is
//! written there is found again at the next start (the page cache keeps it
//! across a crash, not across a power loss: nothing is synced).

use std::ffi::{CStr, c_void};
use std::ptr::null_mut;
use std::sync::atomic::AtomicU64;

use super::sys;

/// A block of restart-persistent memory, as 64-bit words.
pub struct Block {
    pub words: &'static [AtomicU64],
    /// A previous run left it (of its own size, perhaps not the one asked).
    pub found: bool,
}

/// The block stored under `key`: the one a previous run left, or a new one
/// of `words` words (zeroed by the file's creation or not: its user checks).
/// mod_init only, before the fork: the core's allocator for this memory is
/// not safe against a crash, so it is not used afterwards.
pub fn block(key: &'static CStr, words: usize) -> Result<Block, &'static str> {
    let mut p: *mut c_void = null_mut();
    // SAFETY: the key is a NUL-terminated string the core copies; p is
    // written on success.
    let r = unsafe { sys::evv_rpm_block(key.as_ptr().cast_mut(), (words * 8) as _, &mut p) };
    let size_word = p.cast::<u64>();
    match r {
        -1 => return Err("restart persistency is unavailable (see the log above)"),
        0 | 1 if !p.is_null() && size_word.is_aligned() => {}
        _ => return Err("restart-persistent memory has no room for it (restart_persistency_size)"),
    }
    // SAFETY: the block starts with its size word (the shim writes it, or
    // a previous run did), aligned as checked.
    let size = unsafe { size_word.read() };
    // SAFETY: reads the core's restart_persistency_size, set at start-up.
    let total = unsafe { sys::evv_rpm_size() } as u64;
    if size > total || size % 8 != 0 {
        return Err("the block's size word is not one this module wrote");
    }
    // SAFETY: the block is mapped into every process for its life, at the
    // same address, and holds `size` bytes after the size word, aligned
    // for a u64; it is only touched through atomics.
    let words = unsafe { std::slice::from_raw_parts(size_word.add(1).cast(), size as usize / 8) };
    Ok(Block {
        words,
        found: r == 1,
    })
}
