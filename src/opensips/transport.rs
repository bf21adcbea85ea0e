//! The core's event transports, as this module calls them: looking one
//! up, and parse, raise (with or without an asynchronous report) and free
//! through it.

use std::ffi::{c_int, c_void};
use std::ptr::{NonNull, null_mut};

use super::entry;
use super::event::Event;
use super::evi::{CoreSock, Visitor, visit_one};
use super::shm::{ShmRc, Tail};
use super::str::{self, str_};
use super::sys::{self, evi_async_ctx_t, evi_export_t, evi_reply_sock};

/// A transport registered with the core; it lives as long as the server.
#[derive(Clone, Copy)]
pub struct Transport(&'static evi_export_t);

impl Transport {
    pub fn lookup(proto: &[u8]) -> Option<Transport> {
        let mut name = str::of(proto)?;
        // SAFETY: name is valid for its length; the core only reads it and
        // returns a registered transport or null.
        unsafe { sys::get_trans_mod(&mut name).as_ref() }.map(Transport)
    }

    /// Calls `visit` for every live subscription through this transport, of
    /// every event or of the one named by `filter`, with the event's name,
    /// the socket and, when it expires, its expire time, while that event's
    /// subscriber list is locked: visit must only copy.  Err when `filter`
    /// names no event.
    pub fn walk_subscriptions(
        self,
        filter: Option<&[u8]>,
        mut visit: impl FnMut(&[u8], CoreSock<'_>, Option<u32>),
    ) -> Result<(), ()> {
        let mut visit: Visitor<'_> = &mut visit;
        let name = match filter {
            Some(f) => Some(str::of(f).ok_or(())?),
            None => None,
        };
        let name_ptr = name.as_ref().map_or(std::ptr::null(), |n| n as *const str_);
        // SAFETY: the visitor gets our closure back, during the call only.
        let rc = unsafe {
            sys::evv_walk_subscriptions(
                name_ptr,
                self.0,
                Some(visit_one),
                (&raw mut visit).cast::<c_void>(),
            )
        };
        if rc < 0 { Err(()) } else { Ok(()) }
    }

    /// The transport's own parse of an address; None when it refuses it.
    pub fn parse(self, address: &[u8]) -> Option<SubSocket> {
        // Transports write into the text they parse (event_stream cuts
        // host from port in place, some NUL-terminate past the end), so
        // each gets a scratch copy with a spare byte, never the caller's.
        let mut scratch = Vec::with_capacity(address.len() + 1);
        scratch.extend_from_slice(address);
        scratch.push(0);
        let mut addr = str::of(&scratch[..address.len()])?;
        addr.s = scratch.as_mut_ptr().cast();
        // SAFETY: addr is ours to scribble on for the call, and transports
        // keep copies, not pointers (the core's own text is transient too).
        let sock = NonNull::new(unsafe { (self.0.parse?)(addr) })?;
        // the core marks a direct subscriber's socket with its transport's
        // flags, and some transports rely on it in match and raise: a
        // sub-socket must look the same
        // SAFETY: a socket the transport just built, ours alone.
        unsafe { (*sock.as_ptr()).flags |= self.0.flags };
        Some(SubSocket { trans: self, sock })
    }
}

/// A reply socket built by a transport's parse, released through that
/// transport when dropped.
pub struct SubSocket {
    trans: Transport,
    sock: NonNull<evi_reply_sock>,
}

impl SubSocket {
    /// Whether the transport reports on each raise later, through a status
    /// callback (`EVI_ASYNC_STATUS`).
    pub fn asynchronous(&self) -> bool {
        // SAFETY: the socket lives as long as self.
        unsafe { (*self.sock.as_ptr()).flags & sys::EVI_ASYNC_STATUS != 0 }
    }

    fn call(&self, event: &Event<'_>, mut ctx: evi_async_ctx_t) -> c_int {
        let Some(raise) = self.trans.0.raise else {
            return -1;
        };
        let (msg, name, params) = event.parts();
        // SAFETY: the socket lives as long as self, the event for the call.
        unsafe { raise(msg, name, self.sock.as_ptr(), params, &mut ctx) }
    }

    /// One synchronous raise: the transport's return code, 0 for success.
    pub fn raise(&self, event: &Event<'_>) -> c_int {
        let ctx = evi_async_ctx_t {
            status_cb: None,
            cb_param: null_mut(),
        };
        self.call(event, ctx)
    }

    /// One raise whose outcome the transport reports later, in whatever
    /// process, to `T::report` with `param`.  When the transport refuses
    /// at once no report comes, and `param` is dropped.
    pub fn raise_reported<T: Report>(
        &self,
        event: &Event<'_>,
        param: ShmRc<T>,
    ) -> Result<(), c_int> {
        let raw = param.into_raw();
        let ctx = evi_async_ctx_t {
            status_cb: Some(report::<T>),
            cb_param: raw.cast(),
        };
        match self.call(event, ctx) {
            0 => Ok(()),
            rc => {
                // SAFETY: refused at once, so no report will come with raw:
                // the reference is ours again, and dropped.
                drop(unsafe { ShmRc::from_raw(raw) });
                Err(rc)
            }
        }
    }
}

impl Drop for SubSocket {
    fn drop(&mut self) {
        // SAFETY: built by this transport's parse, released once.
        // Transports without a free function (event_datagram) allocate
        // their sockets with shm_malloc, as the core assumes too.
        unsafe {
            match self.trans.0.free {
                Some(free) => free(self.sock.as_ptr()),
                None => sys::evv_shm_free(self.sock.as_ptr().cast()),
            }
        }
    }
}

/// What comes back with a transport's asynchronous report.
pub trait Report: Tail + Sized {
    fn report(this: ShmRc<Self>, ok: bool);
}

unsafe extern "C" fn report<T: Report>(param: *mut c_void, status: sys::evi_status) {
    entry("status report", (), || {
        // SAFETY: the transport hands back, once, the param that
        // raise_reported gave it.
        if let Some(this) = unsafe { ShmRc::<T>::from_raw(param.cast()) } {
            T::report(this, status == sys::evi_status_EVI_STATUS_SUCCESS);
        }
    })
}
