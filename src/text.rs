//! Operator input quoted back in log lines and MI errors.

#![forbid(unsafe_code)]

use std::fmt;

/// Longest piece of operator input quoted back in an error message.
const QUOTE_MAX: usize = 120;

/// Operator input as it may be quoted in a log line: non-printable and
/// non-ASCII bytes escaped, long input cut.  Written as it is formatted,
/// with no allocation.
pub struct Quoted<'a>(pub &'a [u8]);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cut = self.0.len() > QUOTE_MAX;
        write!(
            f,
            "{}",
            self.0[..self.0.len().min(QUOTE_MAX)].escape_ascii()
        )?;
        f.write_str(if cut { "..." } else { "" })
    }
}

/// [`Quoted`] as a `String`, for an error value.
pub fn quote(bytes: &[u8]) -> String {
    Quoted(bytes).to_string()
}
