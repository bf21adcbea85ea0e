//! A log line formatted on the stack, so that logging allocates nothing.

#![forbid(unsafe_code)]

use std::fmt;
use std::io::{Cursor, Write};

/// `args` written into `buf`, cut to end with `...` if it does not fit;
/// the bytes written.  Nothing is allocated.
pub fn format_into<'b>(buf: &'b mut [u8], args: fmt::Arguments<'_>) -> &'b [u8] {
    let mut cursor = Cursor::new(&mut *buf);
    let _ = cursor.write_fmt(args);
    let len = cursor.position() as usize;
    if len == buf.len() && len >= 3 {
        buf[len - 3..].copy_from_slice(b"...");
    }
    &buf[..len]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_what_fits_and_cuts_the_rest() {
        let mut buf = [0u8; 16];
        assert_eq!(format_into(&mut buf, format_args!("a {} c", 7)), b"a 7 c");
        let long = format_into(&mut buf, format_args!("a {} c{}", 7, "x".repeat(20)));
        assert_eq!(long, b"a 7 cxxxxxxxx...");
        assert_eq!(format_into(&mut [], format_args!("x")), b"");
    }
}
