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
use crate::policy::{
    self, Attempt, Driver, Health, Outcome, Progress, Rules, State, Transition, Walk,
};
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
    stats: (&raw const sys::evv_stats).cast::<sys::stat_export_t>(),
    mi_cmds: (&raw const sys::evv_mi_cmds).cast::<sys::mi_export_t>(),
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
    /// HASH: set once an event without the parameter has been logged.
    unkeyed_said: AtomicU32,
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

    /// HASH's parameter name; None for the other policies.
    fn key(&self) -> Option<&[u8]> {
        socket::printed_key(self.text())
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
                unkeyed_said: AtomicU32::new(0),
            },
        );
        let tokens: Vec<&[u8]> = parsed.subs.iter().map(|s| s.token).collect();
        let seeds = policy::seeds(&tokens);
        let first = block.add(SUBS_OFF).cast::<Sub>();
        for (i, ((&(trans, sock), (off, tlen)), seed)) in
            subs.iter().zip(spans).zip(seeds).enumerate()
        {
            ptr::write(
                first.add(i),
                Sub {
                    trans,
                    sock,
                    token_off: off as u32,
                    token_len: tlen as u32,
                    health: Health::seeded(seed),
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
        // Transports write into the text they parse (event_stream cuts
        // host from port in place, some NUL-terminate past the end), so
        // each gets a scratch copy with a spare byte, never the operator's
        // text that print shows.
        let mut scratch = Vec::with_capacity(rest.len() + 1);
        scratch.extend_from_slice(rest);
        scratch.push(0);
        let addr = str_ {
            s: scratch.as_mut_ptr().cast(),
            len: c_int::try_from(rest.len()).ok()?,
        };
        // SAFETY: trans came from get_trans_mod and lives as long as the
        // server; addr is ours to scribble on for the call, and transports
        // keep copies, not pointers (the core's own text is transient too).
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
        socket::same_socket(
            a.policy,
            a.key(),
            &a.tokens(),
            b.policy,
            b.key(),
            &b.tokens(),
        )
        .into()
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

/// One event as the core raised it: what each attempt passes on.
#[derive(Clone, Copy)]
struct Event {
    msg: *mut sip_msg,
    name: *mut str_,
    params: *mut evi_params_t,
}

/// Hands one event to one subscriber through its transport.
struct CoreDriver<'a> {
    vsock: &'a VSock,
    event: Event,
    /// The shared-memory copy of the event that asynchronous FAILOVER and
    /// ROUND-ROBIN attempts continue from; made at the first such attempt,
    /// and null again once handed to a transport.
    chain: *mut Chain,
}

impl CoreDriver<'_> {
    fn describe(&self, i: usize) -> String {
        format!(
            "subscriber '{}' of 'virtual:{}'",
            socket::quote(self.vsock.token(&self.vsock.subs()[i])),
            socket::quote(self.vsock.text())
        )
    }

    /// One call of subscriber `i`'s raise; true when it returned success.
    fn raise(&self, i: usize, event: Event, ctx: evi_async_ctx_t) -> bool {
        let sub = &self.vsock.subs()[i];
        let mut ctx = ctx;
        // SAFETY: trans and sock live as long as the block, which the
        // caller holds; the event is the core's for the call, or a chain's.
        let rc = unsafe {
            match (*sub.trans).raise {
                Some(raise) => raise(event.msg, event.name, sub.sock, event.params, &mut ctx),
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

    /// An asynchronous attempt in a FAILOVER or ROUND-ROBIN walk: the
    /// chain, positioned after this attempt, goes with the event; the
    /// transport's report resumes it, in whatever process.
    fn attempt_chained(&mut self, i: usize, walk: &Walk) -> Attempt {
        if self.chain.is_null() {
            self.chain = Chain::new(self.vsock, self.event, walk);
            if self.chain.is_null() {
                log(
                    Level::EVV_L_ERR,
                    &format!("out of shared memory for an event to {}", self.describe(i)),
                );
                return Attempt::Failed;
            }
        }
        let chain = self.chain;
        // SAFETY: the chain is ours until a transport accepts it, and its
        // fields are written before it is handed over.
        let event = unsafe {
            (*chain).walk = *walk;
            (*chain).current = i as u32;
            Chain::event(chain, self.event.msg)
        };
        let ctx = evi_async_ctx_t {
            status_cb: Some(evv_chain_status),
            cb_param: chain.cast(),
        };
        if !self.raise(i, event, ctx) {
            // refused at once: no report will come, the chain is still ours
            return Attempt::Failed;
        }
        // the report may already be running elsewhere: hands off
        self.chain = null_mut();
        Attempt::Pending
    }

    /// An asynchronous attempt in a PARALLEL fan-out: its report only
    /// updates the subscriber's health.
    fn attempt_probed(&mut self, i: usize) -> Attempt {
        let probe = Probe::new(self.vsock, i);
        if probe.is_null() {
            log(
                Level::EVV_L_ERR,
                &format!("out of shared memory for an event to {}", self.describe(i)),
            );
            return Attempt::Failed;
        }
        let ctx = evi_async_ctx_t {
            status_cb: Some(evv_probe_status),
            cb_param: probe.cast(),
        };
        if self.raise(i, self.event, ctx) {
            Attempt::Pending
        } else {
            // SAFETY: refused at once, so no report will use the probe
            unsafe { Probe::free(probe) };
            Attempt::Failed
        }
    }

    /// A settled event: count it, and say so if it was lost.
    fn settle(&mut self, out: Outcome) {
        count(out);
        if !out.delivered() {
            // a PARALLEL subscriber that fails is reported once, as it
            // starts failing; an event no subscriber took is lost, and said
            // every time
            let level = match out.policy {
                Policy::Parallel => Level::EVV_L_DBG,
                _ => Level::EVV_L_ERR,
            };
            if log_enabled(level) {
                // SAFETY: the event name is the core's or the chain's
                let name = unsafe { self.event.name.as_ref().map(|n| bytes(n)) };
                log(
                    level,
                    &format!(
                        "event '{}' was not delivered by 'virtual:{}'",
                        socket::quote(name.unwrap_or_default()),
                        socket::quote(self.vsock.text())
                    ),
                );
            }
        }
        if !self.chain.is_null() {
            // SAFETY: never handed to a transport, so still ours alone
            unsafe { Chain::free(self.chain) };
            self.chain = null_mut();
        }
    }
}

impl Driver for CoreDriver<'_> {
    fn attempt(&mut self, i: usize, walk: &Walk) -> Attempt {
        let sub = &self.vsock.subs()[i];
        // SAFETY: sock lives as long as the block.
        let asynchronous = unsafe { (*sub.sock).flags } & sys::EVI_ASYNC_STATUS != 0;
        match (asynchronous, self.vsock.policy) {
            (true, Policy::Parallel) => self.attempt_probed(i),
            (true, _) => self.attempt_chained(i, walk),
            // synchronous delivery: the transport's return value is the
            // result, as for the core's own raise
            (false, _) => {
                let ctx = evi_async_ctx_t {
                    status_cb: None,
                    cb_param: null_mut(),
                };
                if self.raise(i, self.event, ctx) {
                    Attempt::Taken
                } else {
                    Attempt::Failed
                }
            }
        }
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

fn stat(which: sys::evv_stat, n: u32) {
    if n > 0 {
        // SAFETY: an atomic add on the module's registered statistic.
        unsafe { sys::evv_stat_add(which as c_int, n.into()) }
    }
}

fn count(out: Outcome) {
    let delivered = out.delivered();
    stat(sys::evv_stat_EVV_ST_DELIVERED, delivered.into());
    stat(sys::evv_stat_EVV_ST_FAILED, (out.taken == 0).into());
    if out.policy == Policy::Parallel {
        stat(
            sys::evv_stat_EVV_ST_INCOMPLETE,
            (out.taken > 0 && !delivered).into(),
        );
    } else {
        stat(
            sys::evv_stat_EVV_ST_FAILOVERS,
            out.attempts.saturating_sub(1),
        );
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
        stat(sys::evv_stat_EVV_ST_EVENTS, 1);
        let mut driver = CoreDriver {
            vsock,
            event: Event {
                msg,
                name: ev_name,
                params,
            },
            chain: null_mut(),
        };
        let mut int_buf = [0u8; 11];
        let value = hash_value(vsock, driver.event, &mut int_buf);
        let progress = policy::deliver(
            vsock.policy,
            &vsock.rotation,
            value,
            vsock.subs(),
            rules(),
            now_ms(),
            &mut driver,
        );
        match progress {
            // accepted: the chain reports on its own
            Progress::Pending => 0,
            Progress::Done(out) => {
                driver.settle(out);
                if out.delivered() { 0 } else { -1 }
            }
        }
    })
}

/// HASH: this event's value of the socket's parameter, the bytes it is
/// placed by (an integer as its decimal text, written into `buf`).  None
/// for the other policies, and for an event without the parameter: such
/// events are counted, and said once per subscription.
fn hash_value<'a>(vsock: &VSock, event: Event, buf: &'a mut [u8; 11]) -> Option<&'a [u8]> {
    let key = vsock.key()?;
    let (mut s, mut len, mut n): (*const c_char, c_int, c_int) = (null(), 0, 0);
    // SAFETY: params are the core's for the raise (or null); the shim
    // only reads them and points s into them.
    let kind = unsafe {
        sys::evv_param_value(
            event.params,
            key.as_ptr().cast(),
            key.len() as c_int,
            &mut s,
            &mut len,
            &mut n,
        )
    };
    match kind as u32 {
        sys::evv_param_kind_EVV_PARAM_STR => {
            // SAFETY: the string is the event's, valid for the raise.
            return Some(unsafe {
                bytes(&str_ {
                    s: s.cast_mut(),
                    len,
                })
            });
        }
        sys::evv_param_kind_EVV_PARAM_INT => return Some(policy::int_text(n, buf)),
        _ => {}
    }
    stat(sys::evv_stat_EVV_ST_UNKEYED, 1);
    if vsock.unkeyed_said.swap(1, Ordering::Relaxed) == 0 {
        // SAFETY: the event name is the core's for the raise
        let name = unsafe { event.name.as_ref().map(|n| bytes(n)) };
        log(
            Level::EVV_L_WARN,
            &format!(
                "event '{}' has no parameter '{}': 'virtual:{}' spreads such events round-robin (said once)",
                socket::quote(name.unwrap_or_default()),
                socket::quote(key),
                socket::quote(vsock.text())
            ),
        );
    }
    None
}

// ---- asynchronous reports ------------------------------------------------

/// A FAILOVER or ROUND-ROBIN event waiting for an asynchronous transport's
/// report, in shared memory: the walk to resume, a copy of the event, and
/// a reference on the virtual socket.  Followed by the event name's bytes.
#[repr(C)]
struct Chain {
    vsock: *const VSock,
    params: *mut evi_params_t,
    /// Points at the bytes behind the chain once [`Chain::event`] ran.
    name: str_,
    name_len: c_int,
    /// The subscriber whose report is awaited.
    current: u32,
    walk: Walk,
}

impl Chain {
    /// Copy the event into shared memory and take a reference on the
    /// virtual socket; null when out of memory.
    fn new(vsock: &VSock, event: Event, walk: &Walk) -> *mut Chain {
        // SAFETY: the event name is the core's for the call.
        let name = unsafe { event.name.as_ref().map(|n| bytes(n)) }.unwrap_or_default();
        let Ok(name_len) = c_int::try_from(name.len()) else {
            return null_mut();
        };
        // SAFETY: allocation, checked; then every field is written before
        // the chain is used, and the name copied behind it.
        unsafe {
            let chain = sys::evv_shm_malloc(size_of::<Chain>() + name.len()).cast::<Chain>();
            if chain.is_null() {
                return null_mut();
            }
            let params = if event.params.is_null() {
                null_mut()
            } else {
                let dup = sys::evi_dup_shm_params(event.params);
                if dup.is_null() {
                    sys::evv_shm_free(chain.cast());
                    return null_mut();
                }
                dup
            };
            ptr::copy_nonoverlapping(name.as_ptr(), chain.add(1).cast::<u8>(), name.len());
            std::mem::forget(vsock.hold());
            ptr::write(
                chain,
                Chain {
                    vsock,
                    params,
                    name: str_ {
                        s: null_mut(),
                        len: 0,
                    },
                    name_len,
                    current: 0,
                    walk: *walk,
                },
            );
            chain
        }
    }

    /// The event as the chain keeps it, with `msg` as its SIP message.
    /// Its name and parameters point into the chain, so the result must
    /// not outlive it.
    ///
    /// # Safety
    /// `this` is a live chain.
    unsafe fn event(this: *mut Chain, msg: *mut sip_msg) -> Event {
        // SAFETY: per the contract; the name bytes follow the chain.
        unsafe {
            (*this).name = str_ {
                s: this.add(1).cast(),
                len: (*this).name_len,
            };
            Event {
                msg,
                name: &raw mut (*this).name,
                params: (*this).params,
            }
        }
    }

    /// Free the chain and give back its reference.
    ///
    /// # Safety
    /// `this` is a live chain that no transport holds.
    unsafe fn free(this: *mut Chain) {
        // SAFETY: per the contract.
        unsafe {
            let vsock = (*this).vsock;
            if !(*this).params.is_null() {
                sys::evi_free_shm_params((*this).params);
            }
            sys::evv_shm_free(this.cast());
            VSock::release(vsock);
        }
    }
}

/// A PARALLEL subscriber's asynchronous attempt: which subscriber, and a
/// reference on the virtual socket until the report comes.
#[repr(C)]
struct Probe {
    vsock: *const VSock,
    index: u32,
}

impl Probe {
    fn new(vsock: &VSock, i: usize) -> *mut Probe {
        // SAFETY: allocation, checked, then written whole.
        unsafe {
            let probe = sys::evv_shm_malloc(size_of::<Probe>()).cast::<Probe>();
            if !probe.is_null() {
                std::mem::forget(vsock.hold());
                ptr::write(
                    probe,
                    Probe {
                        vsock,
                        index: i as u32,
                    },
                );
            }
            probe
        }
    }

    /// # Safety
    /// `this` is a live probe that no transport holds.
    unsafe fn free(this: *mut Probe) {
        // SAFETY: per the contract.
        unsafe {
            let vsock = (*this).vsock;
            sys::evv_shm_free(this.cast());
            VSock::release(vsock);
        }
    }
}

/// A transport's report on a FAILOVER or ROUND-ROBIN attempt, in whichever
/// process the transport runs it: settle the event or offer it on.
unsafe extern "C" fn evv_chain_status(param: *mut c_void, status: sys::evi_status) {
    entry("status report", (), || {
        let chain = param.cast::<Chain>();
        if chain.is_null() {
            return;
        }
        // SAFETY: the transport hands back the chain it was given, once;
        // the chain's reference keeps the virtual socket alive.
        unsafe {
            let vsock = &*(*chain).vsock;
            let i = (*chain).current as usize;
            let mut walk = (*chain).walk;
            // the report is not part of any SIP message's processing:
            // transports raised from here get the core's dummy message
            let msg = sys::get_dummy_sip_msg();
            let mut driver = CoreDriver {
                vsock,
                event: Chain::event(chain, msg),
                chain,
            };
            let ok = status == sys::evi_status_EVI_STATUS_SUCCESS;
            let rules = rules();
            match walk.resume(i, ok, vsock.subs(), rules, now_ms(), &mut driver) {
                Progress::Pending => {}
                Progress::Done(out) => driver.settle(out),
            }
            if !msg.is_null() {
                sys::release_dummy_sip_msg(msg);
            }
        }
    })
}

/// A transport's report on a PARALLEL attempt: health and counters only.
unsafe extern "C" fn evv_probe_status(param: *mut c_void, status: sys::evi_status) {
    entry("status report", (), || {
        let probe = param.cast::<Probe>();
        if probe.is_null() {
            return;
        }
        // SAFETY: the transport hands back the probe it was given, once;
        // the probe's reference keeps the virtual socket alive.
        unsafe {
            let vsock = &*(*probe).vsock;
            let mut driver = CoreDriver {
                vsock,
                event: Event {
                    msg: null_mut(),
                    name: null_mut(),
                    params: null_mut(),
                },
                chain: null_mut(),
            };
            let ok = status == sys::evi_status_EVI_STATUS_SUCCESS;
            policy::record(
                vsock.subs(),
                (*probe).index as usize,
                ok,
                now_ms(),
                &mut driver,
            );
            Probe::free(probe);
        }
    })
}

// ---- MI event_virtual_list -----------------------------------------------

/// One subscriber as the list shows it.
struct SubscriberView {
    socket: Vec<u8>,
    /// HASH's rendezvous seed.
    seed: u64,
    state: State,
    attempts: u64,
    failures: u64,
}

/// One virtual subscription as the list shows it, copied out while its
/// event's subscriber list was locked.
struct SubscriptionView {
    event: Vec<u8>,
    socket: Vec<u8>,
    policy: Policy,
    /// HASH: the parameter name.
    key: Option<Vec<u8>>,
    /// Seconds it was subscribed for, when it expires.
    expire: Option<u32>,
    /// ROUND-ROBIN: the subscriber the next event starts at.
    next: Option<usize>,
    subscribers: Vec<SubscriberView>,
}

/// Called by the shim's walk, under the event's lock: copy and return.
unsafe extern "C" fn evv_visit(arg: *mut c_void, event: *const str_, sock: *mut evi_reply_sock) {
    entry("event_virtual_list", (), || {
        // SAFETY: arg is the list evv_list passed; event and sock are the
        // core's, valid and locked for this call.
        let (out, event, vsock) = unsafe {
            (
                &mut *arg.cast::<Vec<SubscriptionView>>(),
                event.as_ref().map(|e| bytes(e)).unwrap_or_default(),
                VSock::from_reply(sock),
            )
        };
        let Some(vsock) = vsock else { return };
        // SAFETY: flags and expire are written by the core under the lock
        // we are called with.
        let reply = unsafe { &*vsock.reply.get() };
        let (now, window) = (now_ms(), rules().window_ms);
        let n = vsock.subs().len() as u64;
        out.push(SubscriptionView {
            event: event.to_vec(),
            socket: [&b"virtual:"[..], vsock.text()].concat(),
            policy: vsock.policy,
            key: vsock.key().map(<[u8]>::to_vec),
            expire: (reply.flags & sys::EVI_EXPIRE != 0).then_some(reply.expire),
            next: (vsock.policy == Policy::RoundRobin)
                .then(|| (vsock.rotation.load(Ordering::Relaxed) % n) as usize),
            subscribers: vsock
                .subs()
                .iter()
                .map(|s| SubscriberView {
                    socket: vsock.token(s).to_vec(),
                    seed: s.health.seed(),
                    state: s.health.state(now, window),
                    attempts: s.health.attempts(),
                    failures: s.health.failures(),
                })
                .collect(),
        });
    })
}

/// MI output under construction; every add is checked, and a failed one
/// abandons the response.
struct MiItem(*mut sys::mi_item_t);

struct MiFull;

impl MiItem {
    fn name(name: &str) -> (*mut c_char, c_int) {
        (name.as_ptr() as *mut c_char, name.len() as c_int)
    }

    fn array(&self, name: &str) -> Result<MiItem, MiFull> {
        let (n, l) = MiItem::name(name);
        // SAFETY: self is a live item of a response under construction.
        let item = unsafe { sys::add_mi_array(self.0, n, l) };
        if item.is_null() {
            Err(MiFull)
        } else {
            Ok(MiItem(item))
        }
    }

    /// A nameless object, for an array.
    fn element(&self) -> Result<MiItem, MiFull> {
        // SAFETY: as for array.
        let item = unsafe { sys::add_mi_object(self.0, null_mut(), 0) };
        if item.is_null() {
            Err(MiFull)
        } else {
            Ok(MiItem(item))
        }
    }

    fn string(&self, name: &str, value: &[u8]) -> Result<(), MiFull> {
        let (n, l) = MiItem::name(name);
        let len = c_int::try_from(value.len()).map_err(|_| MiFull)?;
        // SAFETY: as for array; the value is copied by the core.
        let rc = unsafe { sys::add_mi_string(self.0, n, l, value.as_ptr() as *mut c_char, len) };
        if rc < 0 { Err(MiFull) } else { Ok(()) }
    }

    fn number(&self, name: &str, value: f64) -> Result<(), MiFull> {
        let (n, l) = MiItem::name(name);
        // SAFETY: as for array.
        let rc = unsafe { sys::add_mi_number(self.0, n, l, value) };
        if rc < 0 { Err(MiFull) } else { Ok(()) }
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn render_state(so: &MiItem, state: State, wall_ms: u64) -> Result<(), MiFull> {
    match state {
        State::Healthy => so.string("state", b"healthy"),
        State::Failing => so.string("state", b"failing"),
        State::Skipped { for_ms } => {
            so.string("state", b"skipped")?;
            so.number("skipped_for_ms", for_ms as f64)?;
            // wall-clock time, in whole seconds, when it is tried again
            so.number("skipped_until", (wall_ms + for_ms).div_ceil(1000) as f64)
        }
    }
}

fn render(root: &MiItem, list: &[SubscriptionView]) -> Result<(), MiFull> {
    let wall_ms = wall_ms();
    let subscriptions = root.array("Subscriptions")?;
    for v in list {
        let o = subscriptions.element()?;
        o.string("event", &v.event)?;
        o.string("socket", &v.socket)?;
        o.string("policy", v.policy.name().as_bytes())?;
        if let Some(key) = &v.key {
            o.string("key", key)?;
        }
        if let Some(expire) = v.expire {
            o.number("expire", expire.into())?;
        }
        if let Some(next) = v.next {
            o.number("next", next as f64)?;
        }
        let subs = o.array("Subscribers")?;
        for s in &v.subscribers {
            let so = subs.element()?;
            so.string("socket", &s.socket)?;
            render_state(&so, s.state, wall_ms)?;
            so.number("attempts", s.attempts as f64)?;
            so.number("failures", s.failures as f64)?;
        }
    }
    Ok(())
}

fn mi_error(code: c_int, msg: &str) -> *mut sys::mi_response_t {
    let len = c_int::try_from(msg.len()).unwrap_or(0);
    // SAFETY: the core copies msg.
    unsafe { sys::init_mi_error_extra(code, msg.as_ptr().cast(), len, null(), 0) }
}

/// The live virtual subscriptions, of every event or of one; an error
/// response when that event does not exist.
fn collect(filter: Option<&[u8]>) -> Result<Vec<SubscriptionView>, *mut sys::mi_response_t> {
    let mut list: Vec<SubscriptionView> = Vec::new();
    let mut name = filter.map(|f| str_ {
        s: f.as_ptr() as *mut c_char,
        len: f.len() as c_int,
    });
    let name_ptr = name.as_mut().map_or(null(), |n| n as *const str_);
    // SAFETY: the visitor is given our list and copies into it.
    let rc = unsafe {
        sys::evv_walk_virtual(name_ptr, Some(evv_visit), (&raw mut list).cast::<c_void>())
    };
    if rc < 0 {
        let event = socket::quote(filter.unwrap_or_default());
        return Err(mi_error(404, &format!("unknown event '{event}'")));
    }
    Ok(list)
}

fn mi_list(filter: Option<&[u8]>) -> *mut sys::mi_response_t {
    let list = match collect(filter) {
        Ok(list) => list,
        Err(resp) => return resp,
    };
    let mut root: *mut sys::mi_item_t = null_mut();
    // SAFETY: builds a new response; root is set to its top object.
    let resp = unsafe { sys::init_mi_result_object(&mut root) };
    if resp.is_null() {
        return null_mut();
    }
    if render(&MiItem(root), &list).is_err() {
        // SAFETY: the response is ours and unsent.
        unsafe { sys::free_mi_response(resp) };
        return mi_error(500, "out of memory building the list");
    }
    resp
}

#[unsafe(no_mangle)]
pub extern "C" fn evv_rs_mi_list(
    _params: *const sys::mi_params_t,
    _async_hdl: *mut sys::mi_handler,
) -> *mut sys::mi_response_t {
    entry("event_virtual_list", null_mut(), || mi_list(None))
}

#[unsafe(no_mangle)]
pub extern "C" fn evv_rs_mi_list_event(
    params: *const sys::mi_params_t,
    _async_hdl: *mut sys::mi_handler,
) -> *mut sys::mi_response_t {
    entry("event_virtual_list", null_mut(), || {
        let mut s: *mut c_char = null_mut();
        let mut len: c_int = 0;
        let name = c"event";
        // SAFETY: params are the core's for this call; s and len are set to
        // the parameter's bytes, valid for the call.
        let rc = unsafe {
            sys::get_mi_string_param(params, name.as_ptr() as *mut c_char, &mut s, &mut len)
        };
        if rc < 0 {
            return mi_error(400, "the 'event' parameter must be a string");
        }
        // SAFETY: as above.
        let event = unsafe { bytes(&str_ { s, len }) };
        mi_list(Some(event))
    })
}

// ---- MI event_virtual_hash -----------------------------------------------

/// A string MI parameter's bytes, valid for the call.
fn mi_string<'a>(params: *const sys::mi_params_t, name: &std::ffi::CStr) -> Option<&'a [u8]> {
    let mut s: *mut c_char = null_mut();
    let mut len: c_int = 0;
    // SAFETY: params are the core's for this call; s and len are set to
    // the parameter's bytes, valid for the call.
    let rc =
        unsafe { sys::get_mi_string_param(params, name.as_ptr() as *mut c_char, &mut s, &mut len) };
    // SAFETY: as above.
    (rc >= 0).then(|| unsafe { bytes(&str_ { s, len }) })
}

/// Which of an event's virtual subscriptions the caller means.
enum Pick<'a> {
    Index(usize),
    Socket(&'a [u8]),
}

fn mi_hash(params: *const sys::mi_params_t, pick: Option<Pick<'_>>) -> *mut sys::mi_response_t {
    let (Some(event), Some(value), Some(pick)) = (
        mi_string(params, c"event"),
        mi_string(params, c"value"),
        pick,
    ) else {
        return mi_error(
            400,
            "event and value must be strings, and index a number from 0 or socket a string",
        );
    };
    let list = match collect(Some(event)) {
        Ok(list) => list,
        Err(resp) => return resp,
    };
    let found = match pick {
        Pick::Index(i) => list.get(i),
        Pick::Socket(text) => {
            let text = text.strip_prefix(b"virtual:").unwrap_or(text);
            list.iter().find(|v| &v.socket[b"virtual:".len()..] == text)
        }
    };
    let Some(v) = found else {
        return mi_error(404, "no such virtual subscription of this event");
    };
    let Some(key) = &v.key else {
        return mi_error(
            400,
            &format!("'{}' is not a HASH subscription", socket::quote(&v.socket)),
        );
    };
    let digest = policy::digest(value);
    let seeds: Vec<u64> = v.subscribers.iter().map(|s| s.seed).collect();
    let skipped: Vec<bool> = v
        .subscribers
        .iter()
        .map(|s| matches!(s.state, State::Skipped { .. }))
        .collect();
    let order = policy::hash_order(digest, &seeds);
    let attempts = policy::hash_attempts(digest, &seeds, &skipped);
    let mut root: *mut sys::mi_item_t = null_mut();
    // SAFETY: builds a new response; root is set to its top object.
    let resp = unsafe { sys::init_mi_result_object(&mut root) };
    if resp.is_null() {
        return null_mut();
    }
    let render = || -> Result<(), MiFull> {
        let o = MiItem(root);
        let wall_ms = wall_ms();
        o.string("event", &v.event)?;
        o.string("socket", &v.socket)?;
        o.string("key", key)?;
        o.string("value", value)?;
        o.string("digest", format!("{digest:#018x}").as_bytes())?;
        o.string("target", &v.subscribers[attempts[0]].socket)?;
        o.number("target_index", attempts[0] as f64)?;
        let tries = o.array("Attempts")?;
        for &i in &attempts {
            let so = tries.element()?;
            so.number("index", i as f64)?;
            so.string("socket", &v.subscribers[i].socket)?;
        }
        let ranks = o.array("Order")?;
        for &i in &order {
            let s = &v.subscribers[i];
            let so = ranks.element()?;
            so.number("index", i as f64)?;
            so.string("socket", &s.socket)?;
            let score = policy::score(s.seed, digest);
            so.string("score", format!("{score:#018x}").as_bytes())?;
            render_state(&so, s.state, wall_ms)?;
        }
        Ok(())
    };
    if render().is_err() {
        // SAFETY: the response is ours and unsent.
        unsafe { sys::free_mi_response(resp) };
        return mi_error(500, "out of memory building the answer");
    }
    resp
}

#[unsafe(no_mangle)]
pub extern "C" fn evv_rs_mi_hash_index(
    params: *const sys::mi_params_t,
    _async_hdl: *mut sys::mi_handler,
) -> *mut sys::mi_response_t {
    entry("event_virtual_hash", null_mut(), || {
        let mut index: c_int = -1;
        // SAFETY: params are the core's for this call.
        let rc =
            unsafe { sys::get_mi_int_param(params, c"index".as_ptr() as *mut c_char, &mut index) };
        let pick = (rc >= 0)
            .then(|| usize::try_from(index).ok())
            .flatten()
            .map(Pick::Index);
        mi_hash(params, pick)
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn evv_rs_mi_hash_socket(
    params: *const sys::mi_params_t,
    _async_hdl: *mut sys::mi_handler,
) -> *mut sys::mi_response_t {
    entry("event_virtual_hash", null_mut(), || {
        mi_hash(params, mi_string(params, c"socket").map(Pick::Socket))
    })
}
