//! No Rust panic may unwind into OpenSIPS: every entry point the core calls
//! runs its body through [`guard`] (by [`super::entry`]), which turns a
//! panic into the entry's failure value and a report.

#![forbid(unsafe_code)]

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Run `body`; if it panics, call `report` with a description and return
/// `failure` instead.
///
/// `AssertUnwindSafe` is sound here: after a panic the body's state is
/// dropped, and what it shares with other calls is atomics, which a panic
/// cannot leave half-written, or state behind a lock whose holder aborts
/// rather than unwind (the module's critical sections must guarantee it).
pub fn guard<R>(failure: R, report: impl FnOnce(&str), body: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(payload) => {
            report(panic_message(payload.as_ref()));
            failure
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic with no message")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_body_value() {
        let mut reported = None;
        assert_eq!(guard(-1, |m| reported = Some(m.to_owned()), || 7), 7);
        assert_eq!(reported, None);
    }

    #[test]
    fn turns_a_panic_into_the_failure_value() {
        let mut reported = None;
        let got = guard(
            std::ptr::null::<u8>(),
            |m| reported = Some(m.to_owned()),
            || -> *const u8 { panic!("index {} out of range", 3) },
        );
        assert!(got.is_null());
        assert_eq!(reported.as_deref(), Some("index 3 out of range"));
    }

    #[test]
    fn reports_static_and_opaque_payloads() {
        let mut reported = String::new();
        guard((), |m| reported = m.to_owned(), || panic!("static"));
        assert_eq!(reported, "static");
        guard(
            (),
            |m| reported = m.to_owned(),
            || std::panic::panic_any(42u8),
        );
        assert_eq!(reported, "a panic with no message");
    }
}
