//! OpenSIPS shared memory, owned by Rust values.
//!
//! Every block is a value followed by a payload of bytes, made by one
//! helper ([`alloc`]) and owned by [`ShmRc`] references, counted in the
//! block and shared by every process; the last one frees it.  A reference
//! can go through C and back as a pointer.  The server
//! forks after the blocks' memory is mapped, so a pointer into a block is
//! good in every process.

use std::cell::UnsafeCell;
use std::mem::{ManuallyDrop, size_of};
use std::ops::Deref;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, Ordering};

#[cfg(all(opensips, not(test)))]
use super::sys::{evv_shm_free as shm_free, evv_shm_malloc as shm_malloc};
// `cargo test` (and Miri) run this layout code over the system allocator
#[cfg(not(all(opensips, not(test))))]
use libc::{free as shm_free, malloc as shm_malloc};

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
    let block = NonNull::new(unsafe { shm_malloc(size) }.cast::<Block<T>>())?;
    if !block.as_ptr().is_aligned() {
        // shm_malloc aligns for the core's own structures; a value that
        // needs more is refused rather than misplaced
        // SAFETY: just allocated, never seen by anyone.
        unsafe { shm_free(block.as_ptr().cast()) };
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
        shm_free(block.as_ptr().cast());
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

/// `value` in a block of its own that is never freed; made in mod_init,
/// before the fork, so every process sees it at the same address.
pub fn leak<T: Tail + Sync>(value: T) -> Option<&'static T> {
    let p = ShmRc::single(value)?.into_raw();
    // SAFETY: the reference is never given back, so the block lives for
    // the server's life; T is Sync, and shared memory is mapped the same in
    // every process.
    Some(unsafe { &*p })
}

/// One value in a block of its own, owned by one holder at a time (not
/// `Clone`), so that a [`ShmList`] may link it.
pub struct ShmNode<T: Tail>(ShmRc<Node<T>>);

pub struct Node<T: Tail> {
    value: T,
    /// The node after this one, while in a list: written only by the list
    /// that owns the node.
    next: UnsafeCell<Option<ShmNode<T>>>,
}

impl<T: Tail> Tail for Node<T> {}

impl<T: Tail> ShmNode<T> {
    /// The size of a node's block.
    pub const SIZE: usize = tail_offset::<Node<T>>();

    /// None when out of shared memory.
    pub fn new(value: T) -> Option<Self> {
        ShmRc::single(Node {
            value,
            next: UnsafeCell::new(None),
        })
        .map(ShmNode)
    }

    fn next(&self) -> *mut Option<ShmNode<T>> {
        self.0.next.get()
    }
}

impl<T: Tail> Deref for ShmNode<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0.value
    }
}

/// A FIFO of nodes in shared memory, each linked to the next: it owns its
/// first node, each node the next, and it points at the last.  Changed
/// through `&mut` only (the spool keeps it behind its lock); nodes are
/// made before, and freed after, outside that lock.
pub struct ShmList<T: Tail> {
    head: Option<ShmNode<T>>,
    tail: *const Node<T>,
    len: usize,
}

impl<T: Tail> Default for ShmList<T> {
    fn default() -> Self {
        ShmList {
            head: None,
            tail: ptr::null(),
            len: 0,
        }
    }
}

impl<T: Tail> ShmList<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push_back(&mut self, node: ShmNode<T>) {
        let at: *const Node<T> = &*node.0;
        match self.head {
            None => self.head = Some(node),
            // SAFETY: tail is the last node of this list, owned through
            // the chain from head, and reached by nobody else (a ShmNode
            // has one owner); &mut self excludes every other access.
            Some(_) => unsafe { *(*self.tail).next.get() = Some(node) },
        }
        self.tail = at;
        self.len += 1;
    }

    /// The node at 0 (the first) or 1.
    pub fn get(&self, at: usize) -> Option<&ShmNode<T>> {
        let head = self.head.as_ref()?;
        match at {
            0 => Some(head),
            // SAFETY: links change only through &mut self.
            1 => unsafe { (*head.next()).as_ref() },
            _ => None,
        }
    }

    /// Take out the node at 0 or 1.
    pub fn remove(&mut self, at: usize) -> Option<ShmNode<T>> {
        let head = self.head.as_mut()?;
        // SAFETY: links change only here, through &mut self; a node taken
        // out leaves with no link.
        let taken = unsafe {
            match at {
                0 => {
                    let next = (*head.next()).take();
                    std::mem::replace(&mut self.head, next)
                }
                1 => {
                    let second = (*head.next()).take()?;
                    *head.next() = (*second.next()).take();
                    Some(second)
                }
                _ => None,
            }
        }?;
        self.len -= 1;
        if std::ptr::eq(self.tail, &*taken.0) {
            self.tail = self.head.as_ref().map_or(ptr::null(), |h| {
                // the one left, or none: after removing at 1, the head
                // is the last
                &*h.0 as *const Node<T>
            });
        }
        Some(taken)
    }
}

impl<T: Tail> Drop for ShmList<T> {
    fn drop(&mut self) {
        // one node at a time: dropping the head would drop the chain
        // recursively
        while self.remove(0).is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its drops, and its tails dropped.
    struct Counted<'a>(&'a AtomicUsize, u64);

    impl Tail for Counted<'_> {
        fn drop_tail(&mut self, tail: NonNull<u8>) {
            // blocks with a payload are made with 8 bytes of 7
            if self.1 == 5 || self.1 == 6 {
                // SAFETY: the payload's first byte, in the block
                assert_eq!(unsafe { *tail.as_ptr() }, 7);
                self.0.fetch_add(100, Ordering::Relaxed);
            }
        }
    }

    impl Drop for Counted<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_last_reference_frees_once_through_c_and_back() {
        let drops = AtomicUsize::new(0);
        let a = ShmRc::new(Counted(&drops, 5), 8, |t| t.fill(7)).unwrap();
        assert_eq!(a.tail_len(), 8);
        // the core's pointer is the block's, and comes back
        let raw = a.clone().into_raw();
        assert_eq!(raw, a.as_ptr());
        // SAFETY: raw is a's clone, kept alive by a meanwhile
        let b = unsafe { ShmRc::clone_raw(raw) }.unwrap();
        assert_eq!(b.1, 5);
        let mut a = a;
        assert!(a.get_mut().is_none(), "shared: no &mut");
        drop(b);
        // SAFETY: the reference into_raw gave, taken back once
        drop(unsafe { ShmRc::from_raw(raw) });
        let (v, tail) = a.get_mut().unwrap();
        v.1 = 6;
        assert_eq!(tail, &[7; 8]);
        assert_eq!(drops.load(Ordering::Relaxed), 0);
        drop(a);
        assert_eq!(drops.load(Ordering::Relaxed), 101);
    }

    #[test]
    fn a_list_keeps_order_and_takes_out_the_first_or_second() {
        let drops = AtomicUsize::new(0);
        let node = |n| ShmNode::new(Counted(&drops, n)).unwrap();
        let ids = |l: &ShmList<Counted<'_>>| -> Vec<u64> {
            (0..2).filter_map(|i| l.get(i).map(|c| c.1)).collect()
        };
        let mut l = ShmList::default();
        assert!(l.get(0).is_none() && l.remove(0).is_none() && l.remove(1).is_none());
        for n in 1..=3 {
            l.push_back(node(n));
        }
        assert_eq!((ids(&l), l.len()), (vec![1, 2], 3));
        assert_eq!(l.remove(1).unwrap().1, 2);
        assert_eq!(l.remove(1).unwrap().1, 3);
        // the tail moved back to the head: pushing links after it
        l.push_back(node(4));
        assert_eq!(ids(&l), vec![1, 4]);
        assert_eq!(l.remove(0).unwrap().1, 1);
        assert_eq!(l.remove(0).unwrap().1, 4);
        assert_eq!(l.len(), 0);
        l.push_back(node(5));
        assert_eq!(ids(&l), vec![5]);
        assert_eq!(drops.load(Ordering::Relaxed), 4);
        drop(l);
        assert_eq!(drops.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn a_long_list_is_dropped_without_recursion() {
        let drops = AtomicUsize::new(0);
        let n = if cfg!(miri) { 100 } else { 200_000 };
        let mut l = ShmList::default();
        for i in 0..n {
            l.push_back(ShmNode::new(Counted(&drops, i)).unwrap());
        }
        drop(l);
        assert_eq!(drops.load(Ordering::Relaxed), n as usize);
    }

    #[test]
    #[cfg_attr(miri, ignore = "it leaks, by design")]
    fn a_leaked_block_stays() {
        struct Word(AtomicUsize);
        impl Tail for Word {}
        let v = &leak(Word(AtomicUsize::new(3))).unwrap().0;
        v.fetch_add(1, Ordering::Relaxed);
        assert_eq!(v.load(Ordering::Relaxed), 4);
    }
}
