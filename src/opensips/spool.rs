//! What the spool (issue 10) needs from OpenSIPS: the size of shared memory, a module-wide block in shared memory, held events
//! (shm copies of an event with the queue's link in their header), and a
//! futex to sleep on in the replay process.

use std::mem::{align_of, size_of};
use std::ptr::{self, NonNull, null_mut};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::event::{Event, Msg};
use super::str::{self, str_};
use super::sys::{self, evi_params_t};
use crate::spool::{Handle, Meta, Nodes, held_event_bytes};

/// The size of OpenSIPS's shared memory, bytes.
pub fn shm_total() -> u64 {
    // SAFETY: reads the core's shm_mem_size, set at start-up.
    unsafe { sys::evv_shm_total() as u64 }
}

/// `value` moved into a shared-memory block that is never freed; made in
/// mod_init, before the fork, so every process sees it at the same address.
pub fn leak<T: Sync>(value: T) -> Option<&'static T> {
    if align_of::<T>() > 8 {
        return None;
    }
    // SAFETY: a plain allocation, checked below.
    let p = NonNull::new(unsafe { sys::evv_shm_malloc(size_of::<T>()) }.cast::<T>())?;
    if !p.as_ptr().is_aligned() {
        // SAFETY: just allocated, never seen by anyone.
        unsafe { sys::evv_shm_free(p.as_ptr().cast()) };
        return None;
    }
    // SAFETY: aligned, with room for a T; never freed, so 'static; T is
    // Sync, and shared memory is mapped the same in every process.
    unsafe {
        p.as_ptr().write(value);
        Some(&*p.as_ptr())
    }
}

/// Sleep until `word` is no longer `seen`, or `ms` have passed (or a
/// signal).  Shared (not FUTEX_PRIVATE): shm is one mapping in every
/// process.
pub fn futex_wait(word: &AtomicU32, seen: u32, ms: u64) {
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
pub fn futex_wake(word: &AtomicU32) {
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

/// A held event's block: `[ Held | name bytes ]`, with its parameters in
/// their own `evi_dup_shm_params` block.
#[repr(C)]
struct Held {
    /// The queue's link ([`Nodes`]), written under the queue's lock.
    next: AtomicU64,
    bytes: u64,
    born_ms: u64,
    params: *mut evi_params_t,
    /// Points at the name's bytes, after the header.
    name: str_,
}

/// Copy an event into a held event's blocks; None when out of shared
/// memory.  The handle is the caller's until a queue takes it.
pub fn hold(event: &Event<'_>, now_ms: u64) -> Option<Handle> {
    let name = event.name();
    let (_, _, params) = event.parts();
    // SAFETY: the event's parameters are null or valid for its life.
    let params_size = unsafe { sys::evv_params_size(params) };
    let params = if params.is_null() {
        null_mut()
    } else {
        // SAFETY: as above.
        let dup = unsafe { sys::evi_dup_shm_params(params) };
        if dup.is_null() {
            return None;
        }
        dup
    };
    let head = size_of::<Held>() + name.len();
    let blocks: &[usize] = if params.is_null() {
        &[head]
    } else {
        &[head, params_size]
    };
    let bytes = held_event_bytes(blocks);
    // SAFETY: a plain allocation, checked below.
    let block = unsafe { sys::evv_shm_malloc(head) }.cast::<Held>();
    if block.is_null() || !block.is_aligned() {
        // SAFETY: ours, freed once; the params copy too.
        unsafe {
            if !block.is_null() {
                sys::evv_shm_free(block.cast());
            }
            if !params.is_null() {
                sys::evi_free_shm_params(params);
            }
        }
        return None;
    }
    // SAFETY: block has room for the header and the name, aligned; nobody
    // else sees it yet.
    unsafe {
        let text = block.add(1).cast::<u8>();
        ptr::copy_nonoverlapping(name.as_ptr(), text, name.len());
        let name = str::of(std::slice::from_raw_parts(text, name.len())).unwrap_or(str::EMPTY);
        block.write(Held {
            next: AtomicU64::new(0),
            bytes,
            born_ms: now_ms,
            params,
            name,
        });
    }
    Handle::new(block as u64)
}

/// Free a held event's blocks.  The caller owns `h` (the queue gave it
/// back, or never took it), and frees it once.
pub fn free(h: Handle) {
    let block = h.get() as *mut Held;
    // SAFETY: per the contract, a live block from hold, ours alone.
    unsafe {
        let params = (*block).params;
        if !params.is_null() {
            sys::evi_free_shm_params(params);
        }
        sys::evv_shm_free(block.cast());
    }
}

/// The held event `h`, raised with `msg`.  `h` must stay live while the
/// event is used: the caller holds its lease (or owns it).
pub fn event<'a>(h: Handle, msg: Msg) -> Event<'a> {
    let block = h.get() as *mut Held;
    // SAFETY: a live held event (per the contract), whose name and
    // parameters never change; transports only read through the pointers.
    unsafe { Event::from_core(msg.raw(), (&raw mut (*block).name).cast(), (*block).params) }
}

/// The [`Nodes`] of held events: their headers.
pub struct HeldNodes;

fn header<'a>(h: Handle) -> &'a Held {
    // SAFETY: the queue only names held events it holds (live) or has
    // handed back and not yet freed.
    unsafe { &*(h.get() as *const Held) }
}

impl Nodes for HeldNodes {
    fn next(&self, h: Handle) -> Option<Handle> {
        Handle::new(header(h).next.load(Ordering::Relaxed))
    }

    fn set_next(&self, h: Handle, next: Option<Handle>) {
        header(h)
            .next
            .store(next.map_or(0, Handle::get), Ordering::Relaxed);
    }

    fn meta(&self, h: Handle) -> Meta {
        let held = header(h);
        Meta {
            bytes: held.bytes,
            born_ms: held.born_ms,
        }
    }
}
