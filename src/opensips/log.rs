//! OpenSIPS's log, through the shim's LM_* calls: every line gets the
//! `event_virtual` prefix and obeys `log_level`.

use std::ffi::c_int;
use std::fmt;

use super::line::format_into;
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

/// One line, formatted on the stack (cut with `...` past 2 KiB).
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    let mut buf = [0; 2048];
    let msg = format_into(&mut buf, args);
    // SAFETY: msg is valid for its length (at most 2048); the shim prints
    // it with %.*s.
    unsafe { sys::evv_log(level as c_int, msg.as_ptr().cast(), msg.len() as c_int) }
}

/// `log!(WARN, "...", args)`: one line at that level, formatted only when
/// it will be printed, and never on the heap.
macro_rules! log {
    ($level:ident, $($arg:tt)+) => {{
        let level = $crate::opensips::log::$level;
        if $crate::opensips::log::enabled(level) {
            $crate::opensips::log::write(level, format_args!($($arg)+));
        }
    }};
}
pub(crate) use log;
