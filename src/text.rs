//! Operator input quoted back in log lines and MI errors.

#![forbid(unsafe_code)]

/// Longest piece of operator input quoted back in an error message.
const QUOTE_MAX: usize = 120;

/// Operator input as it may be quoted in a log line: non-printable and
/// non-ASCII bytes escaped, long input cut.
pub fn quote(bytes: &[u8]) -> String {
    let cut = bytes.len() > QUOTE_MAX;
    let mut s = bytes[..bytes.len().min(QUOTE_MAX)]
        .escape_ascii()
        .to_string();
    if cut {
        s.push_str("...");
    }
    s
}
