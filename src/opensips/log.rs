//! OpenSIPS's log, through the shim's LM_* calls: every line gets the
//! `event_virtual` prefix and obeys `log_level`.

use std::ffi::c_int;

use super::sys;
pub use sys::evv_log_level as Level;

pub const ERR: Level = Level::EVV_L_ERR;
pub const WARN: Level = Level::EVV_L_WARN;
pub const NOTICE: Level = Level::EVV_L_NOTICE;
pub const DBG: Level = Level::EVV_L_DBG;

/// Whether a line at `level` would be printed now; `log_level` can change
/// at run time, so it is asked every time.
pub fn enabled(level: Level) -> bool {
    // SAFETY: reads the core's log level; no preconditions.
    unsafe { sys::evv_log_enabled(level as c_int) != 0 }
}

pub fn write(level: Level, msg: &str) {
    let len = c_int::try_from(msg.len()).unwrap_or(c_int::MAX);
    // SAFETY: msg is valid for len bytes; the shim prints it with %.*s.
    unsafe { sys::evv_log(level as c_int, msg.as_ptr().cast(), len) }
}

/// `log!(WARN, "...", args)`: one line at that level, formatted only when
/// it will be printed, so that a quiet log costs no allocation.
macro_rules! log {
    ($level:ident, $($arg:tt)+) => {{
        let level = $crate::opensips::log::$level;
        if $crate::opensips::log::enabled(level) {
            $crate::opensips::log::write(level, &format!($($arg)+));
        }
    }};
}
pub(crate) use log;
