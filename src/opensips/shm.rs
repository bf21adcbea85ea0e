//! OpenSIPS shared memory, owned by Rust values.
//!
//! Every block is a value followed by a payload of bytes, made by one
//! helper ([`alloc`]) and owned by [`ShmRc`] references, counted in the
//! block and shared by every process; the last one frees it.  A reference
//! can go through C and back as a pointer.  The server
//! forks after the blocks' memory is mapped, so a pointer into a block is
//! good in every process.

use std::mem::{ManuallyDrop, size_of};
use std::ops::Deref;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, Ordering};

use super::sys;

/// A value that keeps something in its block's payload that must be
/// dropped with it.
pub trait Tail {
    /// Called once, just before the value is dropped and the block freed,
    /// with the payload's first byte.
    fn drop_tail(&mut self, _tail: NonNull<u8>) {}
}

#[repr(C)]
struct Block<T> {
    /// First, so that a pointer to the block is a pointer to the value: the
    /// core holds such pointers, and gives them back.
    value: T,
    refs: AtomicU32,
    tail_len: usize,
}

/// Where the payload starts: right after the block, so aligned for
/// anything up to a `usize`.
pub const fn tail_offset<T>() -> usize {
    size_of::<Block<T>>()
}

/// One block holding `value` and `tail_len` payload bytes, zeroed and then
/// written by `fill`; None when out of shared memory.
fn alloc<T>(value: T, tail_len: usize, fill: impl FnOnce(&mut [u8])) -> Option<NonNull<Block<T>>> {
    const { assert!(std::mem::offset_of!(Block<T>, value) == 0) };
    let size = tail_offset::<T>().checked_add(tail_len)?;
    // SAFETY: a plain allocation, checked below.
    let block = NonNull::new(unsafe { sys::evv_shm_malloc(size) }.cast::<Block<T>>())?;
    if !block.as_ptr().is_aligned() {
        // shm_malloc aligns for the core's own structures; a value that
        // needs more is refused rather than misplaced
        // SAFETY: just allocated, never seen by anyone.
        unsafe { sys::evv_shm_free(block.as_ptr().cast()) };
        return None;
    }
    // SAFETY: block is aligned and has room for the Block and tail_len
    // bytes after it; nothing else can see it yet.
    unsafe {
        block.as_ptr().write(Block {
            value,
            refs: AtomicU32::new(1),
            tail_len,
        });
        let tail = std::slice::from_raw_parts_mut(tail_ptr(block).as_ptr(), tail_len);
        tail.fill(0);
        fill(tail);
    }
    Some(block)
}

fn tail_ptr<T>(block: NonNull<Block<T>>) -> NonNull<u8> {
    // SAFETY: one past the Block is inside (or at the end of) its allocation.
    unsafe { block.add(1).cast() }
}

/// The payload of a live block.
///
/// # Safety
/// `block` came from [`alloc`] and is not freed while the result lives.
unsafe fn tail<'a, T>(block: NonNull<Block<T>>) -> &'a [u8] {
    // SAFETY: alloc initialised tail_len bytes after the block.
    unsafe { std::slice::from_raw_parts(tail_ptr(block).as_ptr(), (*block.as_ptr()).tail_len) }
}

/// Drop the value and free the block.
///
/// # Safety
/// The caller owns the block's last reference and gives it up.
unsafe fn free<T>(block: NonNull<Block<T>>) {
    // SAFETY: per the contract, nobody else can reach the block.
    unsafe {
        ptr::drop_in_place(block.as_ptr());
        sys::evv_shm_free(block.as_ptr().cast());
    }
}

/// One reference to a block shared by its holders, in any process; the
/// last one dropped frees it.  Only the payload and atomics in the value
/// may change once it is shared.
pub struct ShmRc<T: Tail>(NonNull<Block<T>>);

impl<T: Tail> ShmRc<T> {
    /// A block without payload.
    pub fn single(value: T) -> Option<Self> {
        Self::new(value, 0, |_| {})
    }

    /// The value and a payload of `tail_len` bytes written by `fill`.
    pub fn new(value: T, tail_len: usize, fill: impl FnOnce(&mut [u8])) -> Option<Self> {
        alloc(value, tail_len, fill).map(ShmRc)
    }

    /// The payload: its bytes may be shared with other processes, so the
    /// caller says what it holds (atomics, or bytes written before sharing).
    pub fn tail_ptr(&self) -> NonNull<u8> {
        tail_ptr(self.0)
    }

    pub fn tail_len(&self) -> usize {
        // SAFETY: our reference keeps the block; tail_len never changes.
        unsafe { (*self.0.as_ptr()).tail_len }
    }

    /// The value and payload, while this is the only reference.
    pub fn get_mut(&mut self) -> Option<(&mut T, &[u8])> {
        let block = self.0.as_ptr();
        // SAFETY: our reference keeps the block; with a count of 1 nobody
        // else can reach it.
        unsafe {
            ((*block).refs.load(Ordering::Acquire) == 1)
                .then(|| (&mut (*block).value, tail(self.0)))
        }
    }

    /// Where the value is: what the core holds (see [`Block`]).
    pub fn as_ptr(&self) -> *mut T {
        self.0.as_ptr().cast()
    }

    /// Hand this reference to C, as a pointer to the value.
    pub fn into_raw(self) -> *mut T {
        ManuallyDrop::new(self).as_ptr()
    }

    /// # Safety
    /// `p` came from [`ShmRc::into_raw`] of a `ShmRc<T>`; the reference it
    /// stands for is taken back once.
    pub unsafe fn from_raw(p: *mut T) -> Option<Self> {
        NonNull::new(p.cast()).map(ShmRc)
    }

    /// A new reference to the block behind `p`.
    ///
    /// # Safety
    /// `p` is the value of a live `ShmRc<T>` block, kept alive meanwhile by
    /// a reference someone else holds.
    pub unsafe fn clone_raw(p: *mut T) -> Option<Self> {
        // SAFETY: per the contract; the borrowed handle is not dropped.
        let borrowed = ManuallyDrop::new(unsafe { Self::from_raw(p) }?);
        Some(ShmRc::clone(&borrowed))
    }
}

impl<T: Tail> Clone for ShmRc<T> {
    fn clone(&self) -> Self {
        // SAFETY: our reference keeps the block.
        unsafe { (*self.0.as_ptr()).refs.fetch_add(1, Ordering::Relaxed) };
        ShmRc(self.0)
    }
}

impl<T: Tail> Deref for ShmRc<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: our reference keeps the block.
        unsafe { &(*self.0.as_ptr()).value }
    }
}

impl<T: Tail> Drop for ShmRc<T> {
    fn drop(&mut self) {
        // SAFETY: our reference keeps the block until the count says we
        // held the last one.
        let last = unsafe { (*self.0.as_ptr()).refs.fetch_sub(1, Ordering::AcqRel) } == 1;
        if last {
            // SAFETY: the last reference: nobody else can reach the block.
            unsafe {
                (*self.0.as_ptr()).value.drop_tail(tail_ptr(self.0));
                free(self.0)
            }
        }
    }
}
