//! Thin, safe wrappers over the OpenSIPS core and the C shim: strings,
//! logging, shared memory, restart-persistent memory, events, transports,
//! MI, the module's declaration and the clusterer's API.  Nothing here
//! knows the module built on it, and nothing
//! here imports from outside this layer (`tests/layers.rs` checks it).
//!
//! Every `unsafe` of the module lives in this layer, or in the module's
//! shared-memory layouts; what is built on top is safe Rust.  Each entry
//! point the core calls is a trampoline here that runs its body through
//! [`entry`], so no panic reaches C.  [`guard`], [`line`] and [`shm`]
//! (over the system allocator) need no OpenSIPS, so `cargo test` runs them.

/// Items that call into OpenSIPS: `cargo test` does not link the core.
macro_rules! core_only {
    ($($item:item)*) => { $(#[cfg(all(opensips, not(test)))] $item)* };
}

core_only! {
    #[allow(
        non_camel_case_types,
        non_upper_case_globals,
        non_snake_case,
        dead_code,
        unnecessary_transmutes,
        unsafe_op_in_unsafe_fn,
        clippy::all,
        clippy::undocumented_unsafe_blocks
    )]
    mod sys {
        include!(concat!(env!("OUT_DIR"), "/opensips.rs"));
    }

    pub(crate) mod cluster;
    pub(crate) mod event;
    pub(crate) mod evi;
    pub(crate) mod futex;
    pub(crate) mod log;
    pub(crate) mod mi;
    pub(crate) mod module;
    pub(crate) mod rpm;
    pub(crate) mod str;
    pub(crate) mod transport;

    pub(crate) use sys::evi_reply_sock;
    use log::log;
}

pub mod guard;
pub mod line;
pub mod shm;

/// Milliseconds on the monotonic clock, which every process of the server
/// shares (unlike `Instant`, it can be stored in shared memory).
#[cfg(all(opensips, not(test)))]
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// The size of OpenSIPS's shared memory, bytes.
#[cfg(all(opensips, not(test)))]
pub fn shm_total() -> u64 {
    // SAFETY: reads the core's shm_mem_size, set at start-up.
    unsafe { sys::evv_shm_total() as u64 }
}

/// Run the body of an entry point the core calls; a panic is logged and
/// becomes `failure`.
#[cfg(all(opensips, not(test)))]
pub fn entry<R>(name: &str, failure: R, body: impl FnOnce() -> R) -> R {
    guard::guard(
        failure,
        |why| log!(ERR, "internal error in {name}: {why}; the call failed"),
        body,
    )
}

/// Report panics through the log: `entry` adds the message, and the default
/// hook would print to a stderr OpenSIPS may have closed.
#[cfg(all(opensips, not(test)))]
fn log_panics() {
    std::panic::set_hook(Box::new(|info| match info.location() {
        Some(l) => log!(ERR, "Rust panic at {}:{}", l.file(), l.line()),
        None => log!(ERR, "Rust panic"),
    }));
}
