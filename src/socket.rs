//! The virtual socket text: parse, print and match.
//!
//! `virtual:` has already been stripped by the core; what is left is
//! `POLICY SUB [SUB ...]`, tokens separated by runs of spaces and tabs.
//! Nothing here touches OpenSIPS: opening the subscribers through their
//! transports goes through the [`Transports`] trait, which the FFI layer
//! implements over the core and the tests implement over a fake.

#![forbid(unsafe_code)]

use std::fmt;

/// How an event is handed to the subscribers of one virtual socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Policy {
    Parallel = 0,
    Failover = 1,
    RoundRobin = 2,
    /// `HASH(<param>)`: by rendezvous hashing of the event parameter's value.
    Hash = 3,
}

impl Policy {
    pub const ALL: [Policy; 4] = [
        Policy::Parallel,
        Policy::Failover,
        Policy::RoundRobin,
        Policy::Hash,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Parallel => "PARALLEL",
            Policy::Failover => "FAILOVER",
            Policy::RoundRobin => "ROUND-ROBIN",
            Policy::Hash => "HASH",
        }
    }

    /// How many spool queues a virtual socket of this policy with `n`
    /// subscribers has: PARALLEL one per subscriber (each gets every event
    /// it missed), every other policy one for the socket (the event needs
    /// one taker).
    pub fn spool_queues(self, n: usize) -> usize {
        match self {
            Policy::Parallel => n,
            _ => 1,
        }
    }

    /// The policy of exactly this upper-case name (a bare `HASH` token
    /// never gets here: [`hash_key`] refuses it first).
    fn named(name: &[u8]) -> Option<Policy> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name().as_bytes() == name)
    }
}

/// What opens a HASH policy token, `HASH(<param>)`.
const HASH_OPEN: &[u8] = b"HASH(";

/// The parameter name of a `HASH(<param>)` token: `Ok(None)` when the token
/// is not a HASH one at all, an error when it is a malformed one.
fn hash_key(tok: &[u8]) -> Result<Option<&[u8]>, ParseError> {
    if tok == b"HASH" {
        return Err(ParseError::BadHash(quote(tok), "names no parameter"));
    }
    let Some(inner) = tok.strip_prefix(HASH_OPEN) else {
        return Ok(None);
    };
    let bad = |why| Err(ParseError::BadHash(quote(tok), why));
    let Some(close) = inner.iter().position(|&b| b == b')') else {
        return bad("has unbalanced parentheses");
    };
    let (key, after) = (&inner[..close], &inner[close + 1..]);
    if key.contains(&b'(') || after.contains(&b')') {
        return bad("has unbalanced parentheses");
    }
    if !after.is_empty() {
        return bad("has text after its closing parenthesis");
    }
    if key.is_empty() {
        return bad("names no parameter");
    }
    Ok(Some(key))
}

/// The HASH parameter name of a socket's printed text (what [`print_into`]
/// wrote), or None for the other policies.
pub fn printed_key(text: &[u8]) -> Option<&[u8]> {
    let head = text.split(|&b| b == b' ').next()?;
    hash_key(head).ok().flatten()
}

/// A printed text without its `SPOOL(...)` option, in two parts: what
/// names a subscription across a restart (the option is not identity).
pub fn identity(text: &[u8]) -> [&[u8]; 2] {
    let head = text.split(|&b| b == b' ').next().unwrap_or_default();
    let rest = &text[head.len()..];
    match rest.strip_prefix(b" SPOOL(") {
        Some(r) => [
            head,
            &r[r.iter().position(|&b| b == b' ').unwrap_or(r.len())..],
        ],
        None => [head, rest],
    }
}

pub use crate::text::quote;

/// The transport name a virtual socket is registered under; it may not
/// appear inside a virtual socket.
pub const VIRTUAL_PROTO: &[u8] = b"virtual";

/// More subscribers than this in one virtual socket is refused: the policies
/// keep a per-event bitmap of this size on the stack instead of allocating.
pub const MAX_SUBSCRIBERS: usize = 1024;

/// One subscriber token, `proto:rest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubToken<'a> {
    pub token: &'a [u8],
    pub proto: &'a [u8],
    pub rest: &'a [u8],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub policy: Policy,
    /// HASH's parameter name; None for the other policies.
    pub key: Option<&'a [u8]>,
    /// The `SPOOL(...)` option after the policy, if given.
    pub spool: Option<crate::spool::SpoolOption>,
    pub subs: Vec<SubToken<'a>>,
}

/// Why a virtual socket was refused; every variant names what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    Empty,
    UnknownPolicy(String),
    /// A malformed `HASH(<param>)` token, and what is wrong with it.
    BadHash(String, &'static str),
    NoSubscribers(Policy),
    TooManySubscribers(usize),
    MissingColon(String),
    MissingProto(String),
    MissingAddress(String),
    Nested(String),
    UnknownTransport {
        proto: String,
        token: String,
    },
    Refused {
        proto: String,
        token: String,
    },
    NoMemory,
    /// A malformed option token (`SPOOL(...)`).
    Option(crate::spool::OptionError),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Empty => write!(f, "empty virtual socket"),
            ParseError::UnknownPolicy(p) => write!(
                f,
                "unknown policy '{p}' (expected PARALLEL, FAILOVER, ROUND-ROBIN or HASH(<param>), in upper case)"
            ),
            ParseError::BadHash(t, why) => {
                write!(f, "policy '{t}' {why} (expected HASH(<param>))")
            }
            ParseError::NoSubscribers(p) => write!(f, "policy '{}' has no subscribers", p.name()),
            ParseError::TooManySubscribers(n) => write!(
                f,
                "{n} subscribers in one virtual socket, at most {MAX_SUBSCRIBERS} are allowed"
            ),
            ParseError::MissingColon(t) => {
                write!(f, "subscriber '{t}' is not of the form transport:address")
            }
            ParseError::MissingProto(t) => write!(f, "subscriber '{t}' names no transport"),
            ParseError::MissingAddress(t) => write!(f, "subscriber '{t}' has no address"),
            ParseError::Nested(t) => write!(f, "virtual subscriber '{t}' cannot be nested"),
            ParseError::UnknownTransport { proto, token } => {
                write!(f, "unknown transport '{proto}' in '{token}'")
            }
            ParseError::Refused { proto, token } => {
                write!(f, "transport '{proto}' refused subscriber '{token}'")
            }
            ParseError::NoMemory => write!(f, "out of shared memory"),
            ParseError::Option(e) => write!(f, "{e}"),
        }
    }
}

fn tokens(input: &[u8]) -> impl Iterator<Item = &[u8]> {
    input
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|t| !t.is_empty())
}

/// Parse the text after `virtual:`.  Only the text is checked here; whether
/// each transport exists and accepts its address is [`open_subscribers`]'s
/// job.
pub fn parse(input: &[u8]) -> Result<Parsed<'_>, ParseError> {
    let mut toks = tokens(input).peekable();
    let first = toks.next().ok_or(ParseError::Empty)?;
    let key = hash_key(first)?;
    let policy = match key {
        Some(_) => Policy::Hash,
        None => Policy::named(first).ok_or_else(|| ParseError::UnknownPolicy(quote(first)))?,
    };
    let spool = crate::spool::config::take_options(&mut toks, |n| Policy::named(n).is_some())
        .map_err(ParseError::Option)?;
    let options = usize::from(spool.is_some());
    let mut subs = Vec::new();
    for token in toks {
        if subs.len() == MAX_SUBSCRIBERS {
            // all tokens but the policy and the option
            return Err(ParseError::TooManySubscribers(
                tokens(input).count() - 1 - options,
            ));
        }
        subs.push(sub_token(token)?);
    }
    if subs.is_empty() {
        return Err(ParseError::NoSubscribers(policy));
    }
    Ok(Parsed {
        policy,
        key,
        spool,
        subs,
    })
}

fn sub_token(token: &[u8]) -> Result<SubToken<'_>, ParseError> {
    let colon = token
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| ParseError::MissingColon(quote(token)))?;
    let (proto, rest) = (&token[..colon], &token[colon + 1..]);
    if proto.is_empty() {
        return Err(ParseError::MissingProto(quote(token)));
    }
    if proto == VIRTUAL_PROTO {
        return Err(ParseError::Nested(quote(token)));
    }
    if rest.is_empty() {
        return Err(ParseError::MissingAddress(quote(token)));
    }
    Ok(SubToken { token, proto, rest })
}

/// The policy token as printed: the name, or `HASH(<param>)`.
fn head_parts<'a>(parsed: &Parsed<'a>) -> [&'a [u8]; 3] {
    match parsed.key {
        Some(key) => [HASH_OPEN, key, b")"],
        None => [parsed.policy.name().as_bytes(), b"", b""],
    }
}

/// Length of the printed form `POLICY SUB1 SUB2 ...`.
pub fn printed_len(parsed: &Parsed<'_>) -> usize {
    head_parts(parsed).iter().map(|p| p.len()).sum::<usize>()
        + parsed.spool.map_or(0, |o| 1 + o.to_string().len())
        + parsed.subs.iter().map(|s| 1 + s.token.len()).sum::<usize>()
}

/// Write the printed form into `out` (exactly [`printed_len`] bytes) and
/// return where each subscriber token sits in it, as (offset, length).
pub fn print_into(parsed: &Parsed<'_>, out: &mut [u8]) -> Vec<(usize, usize)> {
    let mut at = 0;
    for part in head_parts(parsed) {
        out[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    if let Some(o) = parsed.spool {
        let o = o.to_string();
        out[at] = b' ';
        out[at + 1..at + 1 + o.len()].copy_from_slice(o.as_bytes());
        at += 1 + o.len();
    }
    let mut spans = Vec::with_capacity(parsed.subs.len());
    for s in &parsed.subs {
        out[at] = b' ';
        at += 1;
        out[at..at + s.token.len()].copy_from_slice(s.token);
        spans.push((at, s.token.len()));
        at += s.token.len();
    }
    spans
}

/// Whether two virtual sockets are the same subscription: same policy, and
/// the same subscriber tokens in the same order (FAILOVER, ROUND-ROBIN,
/// HASH, where order is behaviour) or as the same multiset (PARALLEL).
/// HASH sockets must have the same key too: see [`same_socket`].
pub fn same_subscription(pa: Policy, a: &[&[u8]], pb: Policy, b: &[&[u8]]) -> bool {
    if pa != pb || a.len() != b.len() {
        return false;
    }
    if pa != Policy::Parallel {
        return a == b;
    }
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// [`same_subscription`], with HASH's parameter names (None for the other
/// policies) compared too.
pub fn same_socket(
    pa: Policy,
    ka: Option<&[u8]>,
    a: &[&[u8]],
    pb: Policy,
    kb: Option<&[u8]>,
    b: &[&[u8]],
) -> bool {
    ka == kb && same_subscription(pa, a, pb, b)
}

/// The event transports registered with the core, as parse needs them.
pub trait Transports {
    /// A registered transport.
    type Trans: Copy;
    /// A sub-socket that transport built.
    type Sock;
    fn lookup(&mut self, proto: &[u8]) -> Option<Self::Trans>;
    /// The transport's own parse of the address after `proto:`.
    fn parse(&mut self, trans: Self::Trans, rest: &[u8]) -> Option<Self::Sock>;
    /// Give a sub-socket back to its transport.
    fn release(&mut self, trans: Self::Trans, sock: Self::Sock);
}

/// The sub-sockets of one virtual socket, each with its transport.
pub type Opened<T> = Vec<(<T as Transports>::Trans, <T as Transports>::Sock)>;

/// Build every subscriber's sub-socket through its transport.  All
/// transports are looked up before any address is parsed, so an unknown
/// transport costs nothing; when a transport refuses its address, every
/// sub-socket already built is released before the error is returned.
pub fn open_subscribers<T: Transports>(
    reg: &mut T,
    parsed: &Parsed<'_>,
) -> Result<Opened<T>, ParseError> {
    let mut trans = Vec::with_capacity(parsed.subs.len());
    for s in &parsed.subs {
        let t = reg
            .lookup(s.proto)
            .ok_or_else(|| ParseError::UnknownTransport {
                proto: quote(s.proto),
                token: quote(s.token),
            })?;
        trans.push(t);
    }
    let mut built = Vec::with_capacity(parsed.subs.len());
    for (s, t) in parsed.subs.iter().zip(trans) {
        match reg.parse(t, s.rest) {
            Some(sock) => built.push((t, sock)),
            None => {
                release_all(reg, built);
                return Err(ParseError::Refused {
                    proto: quote(s.proto),
                    token: quote(s.token),
                });
            }
        }
    }
    Ok(built)
}

/// Release sub-sockets, last built first.
pub fn release_all<T: Transports>(reg: &mut T, built: Opened<T>) {
    for (t, sock) in built.into_iter().rev() {
        reg.release(t, sock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::OptionError::{PolicyNotFirst, Unknown};

    fn toks<'a>(p: &'a Parsed<'a>) -> Vec<&'a [u8]> {
        p.subs.iter().map(|s| s.token).collect()
    }

    fn printed(input: &str) -> String {
        let p = parse(input.as_bytes()).unwrap();
        let mut out = vec![0u8; printed_len(&p)];
        let spans = print_into(&p, &mut out);
        for ((off, len), s) in spans.iter().zip(&p.subs) {
            assert_eq!(&out[*off..off + len], s.token);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn identity_leaves_out_the_option() {
        let id = |t: &str| identity(t.as_bytes()).concat();
        assert_eq!(
            id("FAILOVER SPOOL(5,60) udp:a:1 udp:b:2"),
            b"FAILOVER udp:a:1 udp:b:2"
        );
        assert_eq!(id("HASH(callid) udp:a:1"), b"HASH(callid) udp:a:1");
        assert_eq!(id("HASH(k) SPOOL(5,60) udp:a:1"), id("HASH(k) udp:a:1"));
        assert_eq!(id("PARALLEL SPOOL(0)"), b"PARALLEL");
    }

    #[test]
    fn parses_the_three_policies() {
        for p in Policy::ALL[..3].iter().copied() {
            let text = format!("{} udp:127.0.0.1:1", p.name());
            assert_eq!(parse(text.as_bytes()).unwrap().policy, p);
        }
    }

    #[test]
    fn parses_hash_with_its_parameter() {
        let p = parse(b" HASH(callid)\tudp:1.2.3.4:5  unix:/x ").unwrap();
        assert_eq!(p.policy, Policy::Hash);
        assert_eq!(p.key, Some(&b"callid"[..]));
        assert_eq!(toks(&p), vec![&b"udp:1.2.3.4:5"[..], b"unix:/x"]);
        assert_eq!(
            printed(" HASH(callid)\tudp:1.2.3.4:5  unix:/x "),
            "HASH(callid) udp:1.2.3.4:5 unix:/x"
        );
        assert_eq!(
            printed_key(b"HASH(callid) udp:1.2.3.4:5"),
            Some(&b"callid"[..])
        );
        assert_eq!(printed_key(b"FAILOVER udp:1.2.3.4:5"), None);
        // the other policies have no key
        assert_eq!(parse(b"FAILOVER udp:a:1").unwrap().key, None);
    }

    #[test]
    fn refuses_malformed_hash_policies_naming_the_token() {
        for (bad, why) in [
            ("HASH udp:a:1", "names no parameter"),
            ("HASH() udp:a:1", "names no parameter"),
            ("HASH(callid udp:a:1", "has unbalanced parentheses"),
            ("HASH(a(b) udp:a:1", "has unbalanced parentheses"),
            ("HASH(a)) udp:a:1", "has unbalanced parentheses"),
            ("HASH((a)) udp:a:1", "has unbalanced parentheses"),
            ("HASH(a)b udp:a:1", "has text after its closing parenthesis"),
        ] {
            let tok = bad.split(' ').next().unwrap();
            let e = parse(bad.as_bytes()).unwrap_err();
            assert_eq!(e, ParseError::BadHash(tok.into(), why), "{bad}");
            assert!(e.to_string().contains(&format!("'{tok}'")), "{e}");
        }
        for other in ["hash(callid) udp:a:1", "HASHX udp:a:1", "Hash(a) udp:a:1"] {
            assert!(matches!(
                parse(other.as_bytes()),
                Err(ParseError::UnknownPolicy(_))
            ));
        }
        assert_eq!(
            parse(b"HASH(callid)"),
            Err(ParseError::NoSubscribers(Policy::Hash))
        );
    }

    #[test]
    fn a_policy_where_the_options_go_is_refused_as_one() {
        for p in [
            "HASH(callid)",
            "PARALLEL(1)",
            "FAILOVER(x)",
            "ROUND-ROBIN()",
        ] {
            let text = format!("FAILOVER SPOOL(5) {p} udp:a:1");
            let e = parse(text.as_bytes()).unwrap_err();
            assert_eq!(e, ParseError::Option(PolicyNotFirst(p.into())));
            assert!(
                e.to_string()
                    .ends_with("is a policy: it must be the first token")
            );
        }
        let e = parse(b"FAILOVER SPOOLX(5) udp:a:1").unwrap_err();
        assert_eq!(e, ParseError::Option(Unknown("SPOOLX(5)".into())));
    }

    #[test]
    fn hash_matches_like_failover_and_only_with_the_same_key() {
        let (a, b): (&[u8], &[u8]) = (b"udp:a:1", b"udp:b:1");
        let (h, f) = (Policy::Hash, Policy::Failover);
        let (k1, k2) = (Some(&b"callid"[..]), Some(&b"aor"[..]));
        assert!(same_socket(h, k1, &[a, b], h, k1, &[a, b]));
        assert!(!same_socket(h, k1, &[a, b], h, k1, &[b, a]));
        assert!(!same_socket(h, k1, &[a, b], h, k2, &[a, b]));
        assert!(!same_socket(h, k1, &[a, b], f, None, &[a, b]));
        assert!(!same_socket(
            h,
            k1,
            &[a, b],
            Policy::RoundRobin,
            None,
            &[a, b]
        ));
        assert!(same_socket(f, None, &[a, b], f, None, &[a, b]));
    }

    #[test]
    fn splits_on_runs_of_spaces_and_tabs() {
        let p = parse(b" \tFAILOVER \t udp:1.2.3.4:5\t\tunix:/tmp/x  flatstore:/f \t").unwrap();
        assert_eq!(p.policy, Policy::Failover);
        assert_eq!(
            toks(&p),
            vec![&b"udp:1.2.3.4:5"[..], b"unix:/tmp/x", b"flatstore:/f"]
        );
        assert_eq!(p.subs[1].proto, b"unix");
        assert_eq!(p.subs[1].rest, b"/tmp/x");
    }

    #[test]
    fn keeps_everything_after_the_first_colon_as_the_address() {
        let p = parse(b"PARALLEL rabbitmq:guest:guest@127.0.0.1:5672/pike").unwrap();
        assert_eq!(p.subs[0].proto, b"rabbitmq");
        assert_eq!(p.subs[0].rest, b"guest:guest@127.0.0.1:5672/pike");
    }

    #[test]
    fn prints_single_spaces_and_tokens_as_given() {
        assert_eq!(
            printed("\t ROUND-ROBIN   udp:127.0.0.1:9\tunix:/a  udp:127.0.0.1:9 "),
            "ROUND-ROBIN udp:127.0.0.1:9 unix:/a udp:127.0.0.1:9"
        );
    }

    #[test]
    fn refuses_bad_policies() {
        for bad in [
            "PARALLELX udp:a:1",
            "parallel udp:a:1",
            "ROUND_ROBIN udp:a:1",
        ] {
            let first = bad.split(' ').next().unwrap().to_string();
            assert_eq!(
                parse(bad.as_bytes()),
                Err(ParseError::UnknownPolicy(first.clone()))
            );
        }
        // a subscriber where the policy should be
        assert_eq!(
            parse(b"udp:127.0.0.1:1"),
            Err(ParseError::UnknownPolicy("udp:127.0.0.1:1".into()))
        );
    }

    #[test]
    fn refuses_empty_and_subscriberless_sockets() {
        assert_eq!(parse(b""), Err(ParseError::Empty));
        assert_eq!(parse(b" \t "), Err(ParseError::Empty));
        assert_eq!(
            parse(b"FAILOVER  \t"),
            Err(ParseError::NoSubscribers(Policy::Failover))
        );
    }

    #[test]
    fn refuses_malformed_subscribers() {
        assert_eq!(
            parse(b"PARALLEL udp"),
            Err(ParseError::MissingColon("udp".into()))
        );
        assert_eq!(
            parse(b"PARALLEL :x"),
            Err(ParseError::MissingProto(":x".into()))
        );
        assert_eq!(
            parse(b"PARALLEL udp:"),
            Err(ParseError::MissingAddress("udp:".into()))
        );
        assert_eq!(
            parse(b"PARALLEL virtual:FAILOVER udp:1.1.1.1:1"),
            Err(ParseError::Nested("virtual:FAILOVER".into()))
        );
    }

    #[test]
    fn error_messages_name_the_token() {
        let e = ParseError::UnknownTransport {
            proto: "bogus".into(),
            token: "bogus:1".into(),
        };
        assert_eq!(e.to_string(), "unknown transport 'bogus' in 'bogus:1'");
        assert!(
            ParseError::UnknownPolicy("PARALLELX".into())
                .to_string()
                .contains("'PARALLELX'")
        );
    }

    #[test]
    fn quotes_unprintable_and_long_input_safely() {
        assert_eq!(quote(b"a\0b\xff"), "a\\x00b\\xff");
        let long = vec![b'x'; 1000];
        let q = quote(&long);
        assert!(q.len() < 200 && q.ends_with("..."));
    }

    #[test]
    fn caps_the_subscriber_count() {
        let ok = format!("PARALLEL{}", " udp:1:1".repeat(MAX_SUBSCRIBERS));
        assert_eq!(parse(ok.as_bytes()).unwrap().subs.len(), MAX_SUBSCRIBERS);
        let over = format!("PARALLEL{}", " udp:1:1".repeat(MAX_SUBSCRIBERS + 5));
        assert_eq!(
            parse(over.as_bytes()),
            Err(ParseError::TooManySubscribers(MAX_SUBSCRIBERS + 5))
        );
    }

    #[test]
    fn matches_in_order_except_parallel() {
        let (a, b, c): (&[u8], &[u8], &[u8]) = (b"udp:a:1", b"udp:b:1", b"unix:/c");
        for p in [Policy::Failover, Policy::RoundRobin] {
            assert!(same_subscription(p, &[a, b], p, &[a, b]));
            assert!(!same_subscription(p, &[a, b], p, &[b, a]));
        }
        let par = Policy::Parallel;
        assert!(same_subscription(par, &[a, b, c], par, &[c, a, b]));
        // duplicates count: a multiset, not a set
        assert!(!same_subscription(par, &[a, a, b], par, &[a, b, b]));
        assert!(!same_subscription(par, &[a, b], par, &[a, b, b]));
        assert!(!same_subscription(par, &[a, b], Policy::Failover, &[a, b]));
    }

    /// A registry that knows `udp` and `unix`, refuses addresses that
    /// contain `bad`, and records what is alive.
    #[derive(Default)]
    struct Fake {
        next: u32,
        live: Vec<u32>,
        released: Vec<u32>,
    }

    impl Transports for Fake {
        type Trans = u8;
        type Sock = u32;
        fn lookup(&mut self, proto: &[u8]) -> Option<u8> {
            match proto {
                b"udp" => Some(1),
                b"unix" => Some(2),
                _ => None,
            }
        }
        fn parse(&mut self, _t: u8, rest: &[u8]) -> Option<u32> {
            if rest.windows(3).any(|w| w == b"bad") {
                return None;
            }
            self.next += 1;
            self.live.push(self.next);
            Some(self.next)
        }
        fn release(&mut self, _t: u8, sock: u32) {
            self.live.retain(|&s| s != sock);
            self.released.push(sock);
        }
    }

    #[test]
    fn opens_every_subscriber() {
        let mut reg = Fake::default();
        let p = parse(b"PARALLEL udp:a:1 unix:/x udp:a:1").unwrap();
        let built = open_subscribers(&mut reg, &p).unwrap();
        assert_eq!(built, vec![(1, 1), (2, 2), (1, 3)]);
        release_all(&mut reg, built);
        assert!(reg.live.is_empty());
        assert_eq!(reg.released, vec![3, 2, 1]);
    }

    #[test]
    fn unknown_transport_builds_nothing() {
        let mut reg = Fake::default();
        let p = parse(b"PARALLEL udp:a:1 bogus:1").unwrap();
        assert_eq!(
            open_subscribers(&mut reg, &p),
            Err(ParseError::UnknownTransport {
                proto: "bogus".into(),
                token: "bogus:1".into()
            })
        );
        assert_eq!(reg.next, 0);
    }

    #[test]
    fn refusal_releases_what_was_built() {
        let mut reg = Fake::default();
        let p = parse(b"FAILOVER udp:a:1 unix:/ok udp:bad udp:b:1").unwrap();
        assert_eq!(
            open_subscribers(&mut reg, &p),
            Err(ParseError::Refused {
                proto: "udp".into(),
                token: "udp:bad".into()
            })
        );
        assert!(reg.live.is_empty());
        assert_eq!(reg.released, vec![2, 1]);
    }
}
