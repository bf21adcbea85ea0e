//! The Event Interface's side of a transport this module exports: the five
//! hooks as trampolines the core calls, registration, the reply sockets it
//! holds, and the walk over its subscriptions.

use std::ffi::{c_int, c_uint, c_void};
use std::marker::PhantomData;
use std::ptr::{NonNull, null_mut};

use super::entry;
use super::event::Event;
use super::str::{self, str_};
use super::sys::{self, evi_async_ctx_t, evi_export_t, evi_params_t, evi_reply_sock, sip_msg};

/// A reply socket for a transport's parse to give the core: `address` is
/// what print shows, `params` the transport's; flagged, as the core expects,
/// as one that has an address and expires.
pub fn reply_sock(address: str_, params: *mut c_void) -> evi_reply_sock {
    // SAFETY: all-zero is the C initialiser of a reply socket.
    let mut reply: evi_reply_sock = unsafe { std::mem::zeroed() };
    reply.flags = sys::EVI_ADDRESS | sys::EVI_EXPIRE;
    reply.address = address;
    reply.params = params;
    reply
}

/// A reply socket the core holds, valid for the call that hands it over.
#[derive(Clone, Copy)]
pub struct CoreSock<'a>(NonNull<evi_reply_sock>, PhantomData<&'a evi_reply_sock>);

impl CoreSock<'_> {
    /// # Safety
    /// `p` is null or a reply socket the core holds for the whole call.
    pub(super) unsafe fn new<'a>(p: *mut evi_reply_sock) -> Option<CoreSock<'a>> {
        NonNull::new(p).map(|p| CoreSock(p, PhantomData))
    }

    pub fn as_ptr(self) -> *mut evi_reply_sock {
        self.0.as_ptr()
    }

    /// The socket's `params` field, which its transport owns.
    pub fn params(self) -> *mut c_void {
        // SAFETY: valid for the call, per new's contract.
        unsafe { (*self.0.as_ptr()).params }
    }
}

/// The five hooks of a transport, as the core calls them.
pub trait Hooks {
    /// A new reply socket for `address`, the core's to hold, or null.
    fn parse(address: &[u8]) -> *mut evi_reply_sock;
    fn print(sock: CoreSock<'_>) -> str_;
    fn matches(a: CoreSock<'_>, b: CoreSock<'_>) -> bool;
    /// The core lets go of a socket parse gave it.
    fn free(sock: CoreSock<'_>);
    /// Raise an event; true when it was delivered (or will be reported on).
    fn raise(event: Event<'_>, sock: CoreSock<'_>) -> bool;
}

/// A transport the module exports to the core.
pub struct TransportExport(evi_export_t);

// SAFETY: never written after load; it points at static data and functions.
unsafe impl Sync for TransportExport {}

impl TransportExport {
    pub const fn new<H: Hooks>(proto: &'static [u8], flags: c_uint) -> Self {
        TransportExport(evi_export_t {
            proto: str_ {
                s: proto.as_ptr().cast_mut().cast(),
                len: proto.len() as c_int,
            },
            raise: Some(raise::<H>),
            parse: Some(parse::<H>),
            match_: Some(matches::<H>),
            free: Some(free::<H>),
            print: Some(print::<H>),
            flags,
        })
    }

    /// `register_event_mod`: false when the core refuses it.
    pub fn register(&'static self) -> bool {
        // SAFETY: the export lives as long as the module.
        unsafe { sys::register_event_mod(&self.0) == 0 }
    }
}

pub(super) type Visitor<'v> = &'v mut dyn FnMut(&[u8], CoreSock<'_>, Option<u32>);

pub(super) unsafe extern "C" fn visit_one(
    arg: *mut c_void,
    event: *const str_,
    sock: *mut evi_reply_sock,
) {
    entry("subscription walk", (), || {
        // SAFETY: arg is walk_subscriptions' visitor; event and sock are the
        // core's, valid and locked for this call.
        unsafe {
            let visit = &mut *arg.cast::<Visitor<'_>>();
            let Some(sock) = CoreSock::new(sock) else {
                return;
            };
            // the core writes flags and expire under the lock we run in
            let r = &*sock.as_ptr();
            let expire = (r.flags & sys::EVI_EXPIRE != 0).then_some(r.expire);
            let event = event.as_ref().map(|e| str::bytes(e)).unwrap_or_default();
            visit(event, sock, expire);
        }
    })
}

// The trampolines the core calls: each checks nothing itself, only turns
// C pointers into the wrappers above and keeps panics out of C.

unsafe extern "C" fn parse<H: Hooks>(address: str_) -> *mut evi_reply_sock {
    entry("parse", null_mut(), || {
        // SAFETY: the core's address is valid for the call.
        H::parse(unsafe { str::bytes(&address) })
    })
}

unsafe extern "C" fn print<H: Hooks>(sock: *mut evi_reply_sock) -> str_ {
    entry("print", str::EMPTY, || {
        // SAFETY: the core prints sockets it holds.
        unsafe { CoreSock::new(sock) }.map_or(str::EMPTY, H::print)
    })
}

unsafe extern "C" fn matches<H: Hooks>(a: *mut evi_reply_sock, b: *mut evi_reply_sock) -> c_int {
    entry("match", 0, || {
        // SAFETY: the core matches sockets it holds or has just parsed.
        match unsafe { (CoreSock::new(a), CoreSock::new(b)) } {
            (Some(a), Some(b)) => H::matches(a, b).into(),
            _ => 0,
        }
    })
}

unsafe extern "C" fn free<H: Hooks>(sock: *mut evi_reply_sock) {
    entry("free", (), || {
        // SAFETY: the core frees each socket it got from parse, once.
        unsafe { CoreSock::new(sock) }.map_or((), H::free)
    })
}

unsafe extern "C" fn raise<H: Hooks>(
    msg: *mut sip_msg,
    name: *mut str_,
    sock: *mut evi_reply_sock,
    params: *mut evi_params_t,
    _async_ctx: *mut evi_async_ctx_t,
) -> c_int {
    entry("raise", -1, || {
        // SAFETY: the core raises on sockets it holds, with arguments valid
        // for the call.
        let (event, sock) = unsafe { (Event::from_core(msg, name, params), CoreSock::new(sock)) };
        match sock {
            Some(sock) if H::raise(event, sock) => 0,
            _ => -1,
        }
    })
}
