//! The core's `str`: a pointer and a length, not NUL-terminated.

use std::ffi::c_int;
use std::ptr::null_mut;

pub use super::sys::str_;

/// An empty `str`, what a hook answers with when it has nothing.
pub const EMPTY: str_ = str_ {
    s: null_mut(),
    len: 0,
};

/// Bytes of a core `str`, empty when it has none.
///
/// # Safety
/// `s.s` is null or valid for `s.len` bytes for as long as the result is
/// used.
pub unsafe fn bytes<'a>(s: &str_) -> &'a [u8] {
    match usize::try_from(s.len) {
        // SAFETY: per the contract.
        Ok(len) if !s.s.is_null() && len > 0 => unsafe {
            std::slice::from_raw_parts(s.s.cast(), len)
        },
        _ => &[],
    }
}

/// A core `str` over `b`, for the core to read while `b` lives; None when
/// `b` is longer than a `str` can say.
pub fn of(b: &[u8]) -> Option<str_> {
    Some(str_ {
        s: b.as_ptr().cast_mut().cast(),
        len: c_int::try_from(b.len()).ok()?,
    })
}
