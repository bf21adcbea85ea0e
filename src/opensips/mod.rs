//! Thin, safe wrappers over the OpenSIPS core and the C shim: strings,
//! logging, shared memory, events, transports, MI and the module's
//! declaration.  Nothing here knows what a virtual socket is.
//!
//! Every `unsafe` of the module lives in this layer, or in the layout of a
//! virtual socket in shared memory (`crate::module::vsock`); what is built
//! on top is safe Rust.  Each entry point the core calls is a trampoline
//! here that runs its body through [`entry`], so no panic reaches C.

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

pub mod event;
pub mod evi;
pub mod futex;
pub mod log;
pub mod mi;
pub mod module;
pub mod shm;
pub mod spool;
pub mod str;
pub mod transport;

pub use sys::evi_reply_sock;

use crate::boundary::guard;
use log::log;

/// Milliseconds on the monotonic clock, which every process of the server
/// shares (unlike `Instant`, it can be stored in shared memory).
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
pub fn shm_total() -> u64 {
    // SAFETY: reads the core's shm_mem_size, set at start-up.
    unsafe { sys::evv_shm_total() as u64 }
}

/// Run the body of an entry point the core calls; a panic is logged and
/// becomes `failure`.
pub fn entry<R>(name: &str, failure: R, body: impl FnOnce() -> R) -> R {
    guard(
        failure,
        |why| log!(ERR, "internal error in {name}: {why}; the call failed"),
        body,
    )
}

/// Report panics through the log: `entry` adds the message, and the default
/// hook would print to a stderr OpenSIPS may have closed.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        log!(ERR, "Rust panic{at}");
    }));
}
