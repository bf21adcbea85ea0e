//! The virtual socket in shared memory, and who owns it.
//!
//! A virtual socket is one [`ShmRc`] block:
//!
//! ```text
//! [ VSock | refs, payload length | Sub; n | Queue; q | printed text "POLICY SUB1 ..." ]
//! ```
//!
//! `q` is 0 without a spool; with one (issue 10) it is one queue for the
//! socket (FAILOVER, ROUND-ROBIN), or one per subscriber (PARALLEL, queue
//! `i` is subscriber `i`'s).  The queues live and die with the block.
//!
//! The `evi_reply_sock` the core holds is the first field of `VSock`, so the
//! pointer the core hands back is the block itself, and `params` points at
//! it too (a check that a socket is ours).  The printed text is what print
//! returns; each `Sub` finds its token in it.  Sub-sockets are built and
//! freed by their own transports.
//!
//! References are held by the core's subscription (from parse to free),
//! each raise in progress, and each event waiting for an asynchronous
//! report.  A [`SockRef`] is one of them, given back when dropped; the last
//! frees the block, so a socket the core has freed stays valid for a chain
//! that still needs it.  Outside `crate::opensips`, this layout is the only
//! unsafe code.

use std::cell::UnsafeCell;
use std::ops::Deref;
use std::ptr::{self, NonNull, null_mut};
use std::sync::atomic::AtomicBool;

use crate::opensips::evi::{CoreSock, reply_sock};
use crate::opensips::evi_reply_sock;
use crate::opensips::shm::{ShmRc, Tail, tail_offset};
use crate::opensips::str::{self, str_};
use crate::opensips::transport::{SubSocket, Transport};
use crate::policy::{self, Health, Rotation};
use crate::socket::{self, ParseError, Policy, Transports, VIRTUAL_PROTO};
use crate::spool::SpoolOption;

use super::held::Queue;

#[repr(C)]
pub struct VSock {
    /// What the core holds; it writes flags, expire and subscription time
    /// under its event lock while raises read the rest of the block.
    reply: UnsafeCell<evi_reply_sock>,
    pub policy: Policy,
    /// Subscribers, and spool queues after them (0: no spool); u16s, so
    /// that the block is no larger for the rotation's count.
    n: u16,
    q: u16,
    pub rotation: Rotation,
    /// HASH: set once an event without the parameter has been logged.
    pub unkeyed_said: AtomicBool,
    /// The `SPOOL(...)` option the socket was made with.
    pub spool: Option<SpoolOption>,
}

/// One subscriber: its transport's socket, where its token is in the
/// printed text, its health.
#[repr(C)]
pub struct Sub {
    pub sock: SubSocket,
    token_off: u32,
    token_len: u32,
    pub health: Health,
}

impl AsRef<Health> for Sub {
    fn as_ref(&self) -> &Health {
        &self.health
    }
}

// the core reads the block as its evi_reply_sock
const _: () = assert!(std::mem::offset_of!(VSock, reply) == 0);
const _: () = assert!(socket::MAX_SUBSCRIBERS <= u16::MAX as usize);
// the Subs start the payload, which is aligned for a usize
const _: () = assert!(align_of::<Sub>() <= align_of::<usize>());
const _: () = assert!(tail_offset::<VSock>().is_multiple_of(align_of::<usize>()));
// the Queues follow the Subs, aligned
const _: () = assert!(align_of::<Queue>() <= align_of::<usize>());
const _: () = assert!(size_of::<Sub>().is_multiple_of(align_of::<Queue>()));

impl Tail for VSock {
    fn drop_tail(&mut self, tail: NonNull<u8>) {
        let subs = ptr::slice_from_raw_parts_mut(tail.cast::<Sub>().as_ptr(), self.n as usize);
        // SAFETY: open placed n Subs at the head of the payload; the block
        // is going, so they are dropped (their sub-sockets released) once.
        unsafe { ptr::drop_in_place(subs) }
        // close (unsubscribe) and finish emptied the queues; a queue that
        // still held events would free them here
        let queues = tail
            .as_ptr()
            .wrapping_add(self.n as usize * size_of::<Sub>());
        let queues = ptr::slice_from_raw_parts_mut(queues.cast::<Queue>(), self.q as usize);
        // SAFETY: open placed q Queues after the Subs, dropped once, here.
        unsafe { ptr::drop_in_place(queues) }
    }
}

/// The event transports registered with the core, as parse needs them.
struct CoreTransports;

impl Transports for CoreTransports {
    type Trans = Transport;
    type Sock = SubSocket;

    fn lookup(&mut self, proto: &[u8]) -> Option<Transport> {
        Transport::lookup(proto)
    }

    fn parse(&mut self, trans: Transport, rest: &[u8]) -> Option<SubSocket> {
        trans.parse(rest)
    }

    fn release(&mut self, _: Transport, sock: SubSocket) {
        drop(sock)
    }
}

/// One reference to a virtual socket.
#[derive(Clone)]
pub struct SockRef(ShmRc<VSock>);

// SAFETY: the count is atomic, and after open the block changes only
// through atomics and locks (the core's fields under its event lock):
// every process already shares it, so another thread may as well.
unsafe impl Send for SockRef {}

impl SockRef {
    /// Parse a virtual socket, open its subscribers and lay it out.
    pub fn open(input: &[u8]) -> Result<SockRef, ParseError> {
        let parsed = socket::parse(input)?;
        let subs = socket::open_subscribers(&mut CoreTransports, &parsed)?;
        let subs_len = subs.len() * size_of::<Sub>();
        let limits = super::shared::limits(parsed.spool);
        let q = limits.map_or(0, |_| parsed.policy.spool_queues(subs.len()));
        let queues_len = q * size_of::<Queue>();
        let text_len = socket::printed_len(&parsed);
        let head = VSock {
            reply: UnsafeCell::new(reply_sock(str::EMPTY, null_mut())),
            policy: parsed.policy,
            // socket.rs caps both at MAX_SUBSCRIBERS
            n: subs.len() as u16,
            q: q as u16,
            rotation: Rotation::default(),
            unkeyed_said: AtomicBool::new(false),
            spool: parsed.spool,
        };
        // HASH's rendezvous seeds (the other policies ignore them)
        let tokens: Vec<&[u8]> = parsed.subs.iter().map(|s| s.token).collect();
        let seeds = policy::seeds(&tokens);
        // out of memory: the sub-sockets are dropped with `subs`, released
        let mut subs = Some(subs);
        let mut block = ShmRc::new(head, subs_len + queues_len + text_len, |tail| {
            let (first, rest) = tail.split_at_mut(subs_len);
            let (queues, text) = rest.split_at_mut(queues_len);
            let first = first.as_mut_ptr().cast::<Sub>();
            if let Some(limits) = limits {
                let queues = queues.as_mut_ptr().cast::<Queue>();
                for i in 0..q {
                    // SAFETY: the payload has room for q Queues after the
                    // Subs, aligned (see the asserts above); each is
                    // written once.
                    unsafe { queues.add(i).write(Queue::new(limits)) }
                }
            }
            let spans = socket::print_into(&parsed, text);
            let opened = subs.take().unwrap_or_default();
            let each = opened.into_iter().zip(spans).zip(seeds);
            for (i, (((_, sock), (off, len)), seed)) in each.enumerate() {
                let sub = Sub {
                    sock,
                    token_off: off as u32,
                    token_len: len as u32,
                    health: Health::seeded(seed),
                };
                // SAFETY: the payload has room for n Subs, aligned (see the
                // asserts above); each is written once.
                unsafe { first.add(i).write(sub) }
            }
        })
        .ok_or(ParseError::NoMemory)?;
        let this = block.as_ptr().cast();
        let (head, tail) = block.get_mut().ok_or(ParseError::NoMemory)?;
        let address = str::of(&tail[subs_len + queues_len..]).ok_or(ParseError::NoMemory)?;
        *head.reply.get_mut() = reply_sock(address, this);
        Ok(SockRef(block))
    }

    fn ours(sock: CoreSock<'_>) -> Option<*mut VSock> {
        (sock.params() == sock.as_ptr().cast()).then(|| sock.as_ptr().cast())
    }

    /// A new reference to a socket the core holds, if it is ours.
    pub fn of(sock: CoreSock<'_>) -> Option<SockRef> {
        // SAFETY: ours, so the value of a live ShmRc<VSock> block, kept by
        // the core's reference for the call.
        Self::ours(sock).and_then(|v| unsafe { ShmRc::clone_raw(v) }.map(SockRef))
    }

    /// The core's reference to a socket of ours, which it lets go of.
    pub fn take(sock: CoreSock<'_>) -> Option<SockRef> {
        // SAFETY: the core's reference came from into_core and is given
        // back once (the core frees each socket once).
        Self::ours(sock).and_then(|v| unsafe { ShmRc::from_raw(v) }.map(SockRef))
    }

    /// Hand this reference to the core.
    pub fn into_core(self) -> *mut evi_reply_sock {
        self.0.into_raw().cast()
    }

    pub fn subs(&self) -> &[Sub] {
        // SAFETY: open placed n initialised Subs at the head of the payload;
        // they change only through their atomics.
        unsafe { std::slice::from_raw_parts(self.0.tail_ptr().cast().as_ptr(), self.0.n as usize) }
    }

    /// The spool's queues: none without a spool, one (FAILOVER,
    /// ROUND-ROBIN) or one per subscriber (PARALLEL).
    pub fn queues(&self) -> &[Queue] {
        let off = self.0.n as usize * size_of::<Sub>();
        // SAFETY: open placed q initialised Queues after the Subs; they
        // change only through their atomics.
        unsafe {
            let start = self.0.tail_ptr().add(off).cast::<Queue>();
            std::slice::from_raw_parts(start.as_ptr(), self.0.q as usize)
        }
    }

    /// When a subscriber that could take queue `qi`'s head is out of its
    /// failover window: the queue's own (PARALLEL), or any.
    pub fn eligible_at(&self, qi: usize, now_ms: u64, window_ms: u64) -> u64 {
        let subs = match self.policy {
            Policy::Parallel => &self.subs()[qi..=qi],
            _ => self.subs(),
        };
        let states = subs.iter().map(|s| s.health.state(now_ms, window_ms));
        policy::eligible_at(now_ms, states)
    }

    /// The printed text, `POLICY SUB1 SUB2 ...`.
    pub fn text(&self) -> &[u8] {
        let off = self.0.n as usize * size_of::<Sub>() + self.0.q as usize * size_of::<Queue>();
        // SAFETY: the text follows the Subs, written before the socket was
        // shared and never changed.
        unsafe {
            let start = self.0.tail_ptr().add(off);
            std::slice::from_raw_parts(start.as_ptr(), self.0.tail_len() - off)
        }
    }

    pub fn token(&self, sub: &Sub) -> &[u8] {
        let off = sub.token_off as usize;
        &self.text()[off..off + sub.token_len as usize]
    }

    /// The printed text without its `SPOOL(...)` option: what names the
    /// subscription to another node and to the next start.
    pub fn identity(&self) -> Vec<u8> {
        socket::identity(self.text()).concat()
    }

    /// HASH's parameter name; None for the other policies.
    pub fn key(&self) -> Option<&[u8]> {
        // the policy first: a raise of the other policies reads no text
        (self.policy == Policy::Hash)
            .then(|| socket::printed_key(self.text()))
            .flatten()
    }

    pub fn tokens(&self) -> Vec<&[u8]> {
        self.subs().iter().map(|s| self.token(s)).collect()
    }

    /// What print shows: the printed text.
    pub fn address(&self) -> str_ {
        str::of(self.text()).unwrap_or(str::EMPTY)
    }
}

impl Deref for SockRef {
    type Target = VSock;
    fn deref(&self) -> &VSock {
        &self.0
    }
}

/// Calls `visit` for every live virtual subscription, of every event or
/// of the one named by `filter` (Err when there is no such event), with
/// the event's name, a reference on the socket and its expire time.
pub fn walk(
    filter: Option<&[u8]>,
    mut visit: impl FnMut(&[u8], SockRef, Option<u32>),
) -> Result<(), ()> {
    let ours = Transport::lookup(VIRTUAL_PROTO).ok_or(())?;
    ours.walk_subscriptions(filter, |event, sock, expire| {
        if let Some(s) = SockRef::of(sock) {
            visit(event, s, expire)
        }
    })
}
