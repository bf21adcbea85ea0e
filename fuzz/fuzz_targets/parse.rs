//! Arbitrary bytes into `socket::parse`; whatever parses must print, parse
//! back to the same thing, and match itself.

#![no_main]

use event_virtual::socket::{
    ParseError, Parsed, parse, print_into, printed_key, printed_len, quote, same_socket,
};
use libfuzzer_sys::fuzz_target;

fn tokens<'a>(p: &Parsed<'a>) -> Vec<&'a [u8]> {
    p.subs.iter().map(|s| s.token).collect()
}

fn check_error(data: &[u8], e: &ParseError) {
    // error text goes to a log line: never a raw NUL or control byte
    let text = e.to_string();
    assert!(
        !text.bytes().any(|b| b < 0x20 || b == 0x7f),
        "raw control byte in error for {data:?}: {text:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    // quote never panics, escapes every unprintable byte and stays short
    let q = quote(data);
    assert!(q.bytes().all(|b| (0x20..0x7f).contains(&b)));
    assert!(q.len() <= 4 * 120 + 3);

    let parsed = match parse(data) {
        Ok(p) => p,
        Err(e) => {
            check_error(data, &e);
            return;
        }
    };
    assert!(!parsed.subs.is_empty());
    for s in &parsed.subs {
        assert!(!s.proto.is_empty() && !s.rest.is_empty());
        assert_eq!(s.token.len(), s.proto.len() + 1 + s.rest.len());
        assert_eq!(&s.token[..s.proto.len()], s.proto);
        assert_eq!(s.token[s.proto.len()], b':');
        assert!(!s.token.iter().any(|&b| b == b' ' || b == b'\t'));
    }

    // print, and the spans point at the tokens
    let len = printed_len(&parsed);
    let mut out = vec![0u8; len];
    let spans = print_into(&parsed, &mut out);
    assert_eq!(spans.len(), parsed.subs.len());
    // the policy as printed: its name, or HASH(<param>)
    let mut expect = match parsed.key {
        Some(k) => [&b"HASH("[..], k, b")"].concat(),
        None => parsed.policy.name().as_bytes().to_vec(),
    };
    if let Some(o) = parsed.spool {
        expect.push(b' ');
        expect.extend_from_slice(o.to_string().as_bytes());
    }
    for ((off, n), s) in spans.iter().zip(&parsed.subs) {
        assert_eq!(&out[*off..off + n], s.token);
        expect.push(b' ');
        expect.extend_from_slice(s.token);
    }
    assert_eq!(out, expect);
    assert_eq!(printed_key(&out), parsed.key);

    // the printed text parses back to the same socket
    let again = parse(&out).expect("printed socket must parse");
    assert_eq!(again.policy, parsed.policy);
    assert_eq!(again.key, parsed.key);
    assert_eq!(tokens(&again), tokens(&parsed));
    assert_eq!(again.subs, parsed.subs);
    assert_eq!(again.spool, parsed.spool);

    // match is reflexive, against itself and against its printed form
    let toks = tokens(&parsed);
    let (p, k) = (parsed.policy, parsed.key);
    assert!(same_socket(p, k, &toks, p, k, &toks));
    assert!(same_socket(p, k, &toks, again.policy, again.key, &tokens(&again)));
});
