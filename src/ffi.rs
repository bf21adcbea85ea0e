//! The FFI layer: the only place with `unsafe`.
//!
//! It exports the module to OpenSIPS (`exports`), implements the five
//! transport hooks the C shim registers (parse, print, match, free, raise),
//! lays a virtual socket out in shared memory and calls the other event
//! transports.  Everything it decides is delegated to the safe modules:
//! [`crate::socket`] for the text, [`crate::policy`] for delivery.
//!
//! A virtual socket is one `shm_malloc` block:
//!
//! ```text
//! [ VSock | Sub; n | printed text "POLICY SUB1 SUB2 ..." ]
//! ```
//!
//! The `evi_reply_sock` the core holds is the first field of `VSock`, so the
//! pointer the core hands back is the block itself, and `params` points at
//! it too (a check that a socket is ours).  The printed text is what print
//! returns; each `Sub` finds its token in it.  Sub-sockets are built and
//! freed by their own transports.

use std::cell::UnsafeCell;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::mem::size_of;
use std::ptr::{self, null, null_mut};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::boundary::guard;
use crate::policy::{self, Driver, Health, Rules, Transition};
use crate::socket::{self, ParseError, Parsed, Policy, Transports};

#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    unnecessary_transmutes,
    clippy::all
)]
mod sys {
    include!(concat!(env!("OUT_DIR"), "/opensips.rs"));
}

use sys::{evi_async_ctx_t, evi_export_t, evi_params_t, evi_reply_sock, sip_msg, str_};

// The hooks below must have exactly the types the core calls them with.
const _: sys::parse_f = Some(evv_rs_parse);
const _: sys::print_f = Some(evv_rs_print);
const _: sys::match_f = Some(evv_rs_match);
const _: sys::evi_free_f = Some(evv_rs_free);
const _: sys::raise_f = Some(evv_rs_raise);

/// `struct module_exports`, shared read-only with the core.
#[repr(transparent)]
pub struct ModuleExports(sys::module_exports);

// SAFETY: never written after load; the pointers are to static C data.
unsafe impl Sync for ModuleExports {}

/// What OpenSIPS looks up by name when it loads the module.  The version
/// strings come from the C shim, compiled with the core's own definitions.
#[unsafe(no_mangle)]
#[allow(non_upper_case_globals)]
pub static exports: ModuleExports = ModuleExports(sys::module_exports {
    name: c"event_virtual".as_ptr(),
    type_: sys::module_type_MOD_TYPE_DEFAULT,
    ver_info: sys::module_exports__bindgen_ty_1 {
        version: (&raw const sys::evv_full_version).cast::<c_char>(),
        compile_flags: (&raw const sys::evv_compile_flags).cast::<c_char>(),
        scm: sys::scm_version {
            type_: (&raw const sys::evv_scm_type).cast::<c_char>(),
            rev: (&raw const sys::evv_scm_rev).cast::<c_char>(),
        },
    },
    dlflags: 0,
    load_f: None,
    deps: null(),
    cmds: null(),
    acmds: null(),
    params: (&raw const sys::evv_params).cast::<sys::param_export_t>(),
    stats: null(),
    mi_cmds: null(),
    items: null(),
    trans: null(),
    procs: null(),
    preinit_f: None,
    init_f: Some(sys::evv_mod_init),
    response_f: None,
    destroy_f: Some(sys::evv_destroy),
    init_child_f: None,
    reload_ack_f: None,
});

// ---- logging and time ----------------------------------------------------

use sys::evv_log_level as Level;

fn log_enabled(level: Level) -> bool {
    // SAFETY: reads the core's log level; no preconditions.
    unsafe { sys::evv_log_enabled(level as c_int) != 0 }
}

fn log(level: Level, msg: &str) {
    let len = c_int::try_from(msg.len()).unwrap_or(c_int::MAX);
    // SAFETY: msg is valid for len bytes; the shim prints it with %.*s.
    unsafe { sys::evv_log(level as c_int, msg.as_ptr().cast(), len) }
}

/// Milliseconds on the monotonic clock, which every process of the server
/// shares (unlike `Instant`, it can be stored in shared memory).
fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// `failover_timeout` in ms.  Set in mod_init, before OpenSIPS forks, and
/// only read afterwards: every process has the same value.
static WINDOW_MS: AtomicU64 = AtomicU64::new(30_000);

fn rules() -> Rules {
    Rules {
        window_ms: WINDOW_MS.load(Ordering::Relaxed),
    }
}

/// Run an entry point's body; a panic is logged and becomes `failure`.
fn entry<R>(name: &str, failure: R, body: impl FnOnce() -> R) -> R {
    guard(
        failure,
        |why| {
            log(
                Level::EVV_L_ERR,
                &format!("internal error in {name}: {why}; the call failed"),
            )
        },
        body,
    )
}

#[unsafe(no_mangle)]
pub extern "C" fn evv_rs_init(failover_timeout_s: c_uint) -> c_int {
    entry("mod_init", -1, || {
        WINDOW_MS.store(u64::from(failover_timeout_s) * 1000, Ordering::Relaxed);
        // a panic is reported by `entry` with its message; the default hook
        // would print the same to a stderr OpenSIPS may have closed
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            log(Level::EVV_L_ERR, &format!("Rust panic{at}"));
        }));
        0
    })
}

// ---- the virtual socket in shared memory ---------------------------------

#[repr(C)]
struct VSock {
    /// What the core holds; it writes flags, expire and subscription time
    /// under its event lock while raises read the rest of the block.
    reply: UnsafeCell<evi_reply_sock>,
    /// One for the core's subscription, one per raise in progress.
    refs: AtomicU32,
    policy: Policy,
    n: u32,
    text_len: u32,
    rotation: AtomicU64,
}

#[repr(C)]
struct Sub {
    trans: *const evi_export_t,
    sock: *mut evi_reply_sock,
    token_off: u32,
    token_len: u32,
    health: Health,
}

impl AsRef<Health> for Sub {
    fn as_ref(&self) -> &Health {
        &self.health
    }
}

const SUBS_OFF: usize = size_of::<VSock>();
// the Subs follow the VSock directly
const _: () = assert!(SUBS_OFF.is_multiple_of(std::mem::align_of::<Sub>()));

impl VSock {
    /// The virtual socket behind a reply socket the core hands us, if it is
    /// one of ours.
    ///
    /// # Safety
    /// `sock` is null or a reply socket the core got from a transport's
    /// parse and has not freed.
    unsafe fn from_reply<'a>(sock: *mut evi_reply_sock) -> Option<&'a VSock> {
        if sock.is_null() {
            return None;
        }
        // SAFETY: per the contract, sock points at a live evi_reply_sock;
        // ours point at themselves through params.
        unsafe {
            if (*sock).params != sock.cast() {
                return None;
            }
            Some(&*sock.cast::<VSock>())
        }
    }

    fn block(&self) -> *const u8 {
        (self as *const VSock).cast()
    }

    fn subs(&self) -> &[Sub] {
        // SAFETY: a VSock only exists at the head of a block built by
        // `build`, which placed n initialised Subs right after it.
        unsafe { std::slice::from_raw_parts(self.block().add(SUBS_OFF).cast(), self.n as usize) }
    }

    fn text(&self) -> &[u8] {
        let off = SUBS_OFF + self.n as usize * size_of::<Sub>();
        // SAFETY: as for subs: the printed text follows them.
        unsafe { std::slice::from_raw_parts(self.block().add(off), self.text_len as usize) }
    }

    fn token(&self, sub: &Sub) -> &[u8] {
        let off = sub.token_off as usize;
        &self.text()[off..off + sub.token_len as usize]
    }

    fn tokens(&self) -> Vec<&[u8]> {
        self.subs().iter().map(|s| self.token(s)).collect()
    }

    /// Keep the block alive for the length of a raise, even if the core
    /// frees the subscription meanwhile.
    fn hold(&self) -> Hold {
        self.refs.fetch_add(1, Ordering::Relaxed);
        Hold(self)
    }

    /// Drop one reference; the last one frees the block.  Takes a pointer,
    /// not a reference, because the block may be gone when it returns.
    ///
    /// # Safety
    /// The caller owns one reference and touches nothing of the block after.
    unsafe fn release(this: *const VSock) {
        // SAFETY: the caller's reference keeps the block alive until here.
        let last = unsafe { (*this).refs.fetch_sub(1, Ordering::AcqRel) } == 1;
        if !last {
            return;
        }
        let mut core = CoreTransports;
        // SAFETY: last reference: nobody else can reach the block, and the
        // borrow of it ends before it is freed.
        unsafe {
            for sub in (*this).subs() {
                core.release(sub.trans, sub.sock);
            }
            sys::evv_shm_free(this as *mut c_void);
        }
    }
}

/// One reference to a virtual socket, given back on drop.
struct Hold(*const VSock);

impl Drop for Hold {
    fn drop(&mut self) {
        // SAFETY: `hold` took the reference this gives back.
        unsafe { VSock::release(self.0) }
    }
}

/// Lay out a parsed socket and its opened sub-sockets in one shm block.
/// On failure the sub-sockets are the caller's to release.
fn build(
    parsed: &Parsed<'_>,
    subs: &[(*const evi_export_t, *mut evi_reply_sock)],
) -> Result<*mut evi_reply_sock, ParseError> {
    let n = subs.len();
    let text_len = socket::printed_len(parsed);
    let text_off = SUBS_OFF + n * size_of::<Sub>();
    let (Ok(n32), Ok(text_len32), Ok(len)) = (
        u32::try_from(n),
        u32::try_from(text_len),
        c_int::try_from(text_len),
    ) else {
        return Err(ParseError::NoMemory);
    };
    // SAFETY: plain allocation; checked for null below.
    let block = unsafe { sys::evv_shm_malloc(text_off + text_len) }.cast::<u8>();
    if block.is_null() {
        return Err(ParseError::NoMemory);
    }
    // SAFETY: block has text_off + text_len bytes, aligned for VSock by
    // shm_malloc; every part is written before a reference to it exists.
    unsafe {
        let text = std::slice::from_raw_parts_mut(block.add(text_off), text_len);
        let spans = socket::print_into(parsed, text);
        let mut reply: evi_reply_sock = std::mem::zeroed();
        reply.flags = sys::EVI_ADDRESS | sys::EVI_EXPIRE;
        reply.address = str_ {
            s: block.add(text_off).cast(),
            len,
        };
        reply.params = block.cast();
        ptr::write(
            block.cast::<VSock>(),
            VSock {
                reply: UnsafeCell::new(reply),
                refs: AtomicU32::new(1),
                policy: parsed.policy,
                n: n32,
                text_len: text_len32,
                rotation: AtomicU64::new(0),
            },
        );
        let first = block.add(SUBS_OFF).cast::<Sub>();
        for (i, (&(trans, sock), (off, tlen))) in subs.iter().zip(spans).enumerate() {
            ptr::write(
                first.add(i),
                Sub {
                    trans,
                    sock,
                    token_off: off as u32,
                    token_len: tlen as u32,
                    health: Health::default(),
                },
            );
        }
    }
    Ok(block.cast())
}

/// The event transports registered with the core.
struct CoreTransports;

impl Transports for CoreTransports {
    type Trans = *const evi_export_t;
    type Sock = *mut evi_reply_sock;

    fn lookup(&mut self, proto: &[u8]) -> Option<Self::Trans> {
        let mut name = str_ {
            s: proto.as_ptr() as *mut c_char,
            len: c_int::try_from(proto.len()).ok()?,
        };
        // SAFETY: name is valid for len bytes; the core only reads it.
        let t = unsafe { sys::get_trans_mod(&mut name) };
        (!t.is_null()).then_some(t)
    }

    fn parse(&mut self, trans: Self::Trans, rest: &[u8]) -> Option<Self::Sock> {
        let addr = str_ {
            s: rest.as_ptr() as *mut c_char,
            len: c_int::try_from(rest.len()).ok()?,
        };
        // SAFETY: trans came from get_trans_mod and lives as long as the
        // server; its parse only reads addr (the core passes its own
        // transient strings the same way).
        unsafe {
            let sock = ((*trans).parse?)(addr);
            if sock.is_null() {
                return None;
            }
            // the core marks a direct subscriber's socket with its
            // transport's flags, and some transports rely on it in match
            // and raise: a sub-socket must look the same
            (*sock).flags |= (*trans).flags;
            Some(sock)
        }
    }

    fn release(&mut self, trans: Self::Trans, sock: Self::Sock) {
        // SAFETY: sock was built by trans's parse and is released once.
        // Transports without a free function (event_datagram) allocate
        // their sockets with shm_malloc, as the core assumes too.
        unsafe {
            match (*trans).free {
                Some(free) => free(sock),
                None => sys::evv_shm_free(sock.cast()),
            }
        }
    }
}

/// Bytes of a core `str`, empty when it has none.
///
/// # Safety
/// `s.s` is null or valid for `s.len` bytes for as long as the result is
/// used.
unsafe fn bytes<'a>(s: &str_) -> &'a [u8] {
    match usize::try_from(s.len) {
        // SAFETY: per the contract.
        Ok(len) if !s.s.is_null() && len > 0 => unsafe {
            std::slice::from_raw_parts(s.s.cast(), len)
        },
        _ => &[],
    }
}

fn open(input: &[u8]) -> Result<*mut evi_reply_sock, ParseError> {
    let parsed = socket::parse(input)?;
    let mut core = CoreTransports;
    let subs = socket::open_subscribers(&mut core, &parsed)?;
    build(&parsed, &subs).inspect_err(|_| socket::release_all(&mut core, subs))
}

// ---- the transport hooks -------------------------------------------------

#[unsafe(no_mangle)]
pub extern "C" fn evv_rs_parse(socket: str_) -> *mut evi_reply_sock {
    entry("parse", null_mut(), || {
        // SAFETY: the core's socket string is valid for this call.
        let input = unsafe { bytes(&socket) };
        open(input).unwrap_or_else(|e| {
            log(
                Level::EVV_L_ERR,
                &format!("refusing virtual socket '{}': {e}", socket::quote(input)),
            );
            null_mut()
        })
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn evv_rs_print(sock: *mut evi_reply_sock) -> str_ {
    let none = str_ {
        s: null_mut(),
        len: 0,
    };
    entry("print", none, || {
        // SAFETY: the core prints sockets it holds.
        match unsafe { VSock::from_reply(sock) } {
            // SAFETY: reply belongs to the block; address is set by build
            // and never changed by the core.
            Some(v) => unsafe { (*v.reply.get()).address },
            None => none,
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn evv_rs_match(a: *mut evi_reply_sock, b: *mut evi_reply_sock) -> c_int {
    entry("match", 0, || {
        // SAFETY: the core matches sockets it holds or has just parsed.
        let (Some(a), Some(b)) = (unsafe { VSock::from_reply(a) }, unsafe {
            VSock::from_reply(b)
        }) else {
            return 0;
        };
        socket::same_subscription(a.policy, &a.tokens(), b.policy, &b.tokens()).into()
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn evv_rs_free(sock: *mut evi_reply_sock) {
    entry("free", (), || {
        // SAFETY: the core frees each socket it got from parse once; that
        // gives back the subscription's reference.
        if let Some(v) = unsafe { VSock::from_reply(sock) } {
            unsafe { VSock::release(v) }
        }
    })
}

/// Hands one event to one subscriber through its transport.
struct CoreDriver<'a> {
    vsock: &'a VSock,
    msg: *mut sip_msg,
    ev_name: *mut str_,
    params: *mut evi_params_t,
}

impl CoreDriver<'_> {
    fn describe(&self, i: usize) -> String {
        format!(
            "subscriber '{}' of 'virtual:{}'",
            socket::quote(self.vsock.token(&self.vsock.subs()[i])),
            socket::quote(self.vsock.text())
        )
    }
}

impl Driver for CoreDriver<'_> {
    fn attempt(&mut self, i: usize) -> bool {
        let sub = &self.vsock.subs()[i];
        // synchronous delivery: the transport reports through its return
        // value, as it does for the core's own raise
        let mut ctx = evi_async_ctx_t {
            status_cb: None,
            cb_param: null_mut(),
        };
        // SAFETY: trans and sock live as long as the block, which this
        // raise holds; msg, ev_name and params are the core's for the call.
        let rc = unsafe {
            match (*sub.trans).raise {
                Some(raise) => raise(self.msg, self.ev_name, sub.sock, self.params, &mut ctx),
                None => -1,
            }
        };
        if rc != 0 && log_enabled(Level::EVV_L_DBG) {
            log(
                Level::EVV_L_DBG,
                &format!("{} failed an event ({rc})", self.describe(i)),
            );
        }
        rc == 0
    }

    fn transition(&mut self, i: usize, t: Transition) {
        match t {
            Transition::Failing => log(
                Level::EVV_L_WARN,
                &format!("{} is failing", self.describe(i)),
            ),
            Transition::Recovered => log(
                Level::EVV_L_NOTICE,
                &format!("{} has recovered", self.describe(i)),
            ),
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn evv_rs_raise(
    msg: *mut sip_msg,
    ev_name: *mut str_,
    sock: *mut evi_reply_sock,
    params: *mut evi_params_t,
    _async_ctx: *mut evi_async_ctx_t,
) -> c_int {
    entry("raise", -1, || {
        // SAFETY: the core raises on sockets it holds.
        let Some(vsock) = (unsafe { VSock::from_reply(sock) }) else {
            log(Level::EVV_L_ERR, "raise on a socket that is not virtual");
            return -1;
        };
        let _hold = vsock.hold();
        let mut driver = CoreDriver {
            vsock,
            msg,
            ev_name,
            params,
        };
        let out = policy::deliver(
            vsock.policy,
            &vsock.rotation,
            vsock.subs(),
            rules(),
            now_ms(),
            &mut driver,
        );
        if out.delivered {
            return 0;
        }
        // a PARALLEL subscriber that fails is reported once, as it starts
        // failing; an event no subscriber took is lost, and said every time
        let level = match vsock.policy {
            Policy::Parallel => Level::EVV_L_DBG,
            _ => Level::EVV_L_ERR,
        };
        if log_enabled(level) {
            // SAFETY: the core's event name is valid for the call.
            let name = unsafe { ev_name.as_ref().map(|n| bytes(n)).unwrap_or_default() };
            log(
                level,
                &format!(
                    "event '{}' was not delivered by 'virtual:{}'",
                    socket::quote(name),
                    socket::quote(vsock.text())
                ),
            );
        }
        -1
    })
}
