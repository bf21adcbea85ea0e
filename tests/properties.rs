//! Property tests and edge inputs for the virtual socket text: parse, print
//! and match, as the module guide `doc/event_virtual.md` section 2 ("Virtual
//! socket syntax") specifies them, and HASH's rendezvous placement.  Pure
//! Rust: no OpenSIPS is needed.

use event_virtual::policy::{
    Attempt, Driver, Health, Progress, Rotation, Rules, Transition, Walk, deliver, digest,
    hash_attempts, hash_order, seeds,
};
use event_virtual::socket::{
    MAX_SUBSCRIBERS, ParseError, Parsed, Policy, Transports, open_subscribers, parse, print_into,
    printed_key, printed_len, quote, same_socket, same_subscription,
};
use event_virtual::spool::OptionError;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// helpers

fn tokens<'a>(p: &Parsed<'a>) -> Vec<&'a [u8]> {
    p.subs.iter().map(|s| s.token).collect()
}

/// The printed form, with the spans checked against the tokens.
fn printed(p: &Parsed<'_>) -> Vec<u8> {
    let mut out = vec![0u8; printed_len(p)];
    let spans = print_into(p, &mut out);
    assert_eq!(spans.len(), p.subs.len());
    for ((off, len), s) in spans.iter().zip(&p.subs) {
        assert_eq!(
            &out[*off..off + len],
            s.token,
            "span does not point at its token"
        );
    }
    out
}

/// The policy token as it must be printed.
fn head(policy: Policy, key: Option<&[u8]>) -> Vec<u8> {
    match key {
        Some(k) => [&b"HASH("[..], k, b")"].concat(),
        None => policy.name().as_bytes().to_vec(),
    }
}

/// The policy token, then the option in its canonical form if there is one.
fn head_with_option(p: &Parsed<'_>) -> Vec<u8> {
    let mut v = head(p.policy, p.key);
    if let Some(o) = p.spool {
        v.push(b' ');
        v.extend_from_slice(o.to_string().as_bytes());
    }
    v
}

/// A refused option names the token it refused, as one of the input's.
fn assert_names_a_token(e: &OptionError, input: &[u8]) {
    let named = match e {
        OptionError::Unknown(t)
        | OptionError::PolicyNotFirst(t)
        | OptionError::BadSize(t)
        | OptionError::BadAge(t)
        | OptionError::Duplicate(t) => t,
    };
    assert!(
        input
            .split(|b| *b == b' ' || *b == b'\t')
            .any(|t| quote(t) == *named),
        "{e} names no token of the input"
    );
    assert!(e.to_string().contains(&format!("'{named}'")), "{e}");
}

/// What the printed form must be: the policy, then each token after one space.
fn joined(head: &[u8], toks: &[&[u8]]) -> Vec<u8> {
    let mut v = head.to_vec();
    for t in toks {
        v.push(b' ');
        v.extend_from_slice(t);
    }
    v
}

/// Error text goes into a log line: printable ASCII only (no raw NUL, no
/// control bytes, no raw non-UTF-8 input).
fn assert_printable(e: &ParseError) {
    let text = e.to_string();
    assert!(
        text.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "error text is not printable ASCII: {text:?}"
    );
}

/// Everything that must hold of any input: no panic, a printable error, or
/// a socket that prints to the canonical text and parses back to itself.
fn check_any(input: &[u8]) {
    let p = match parse(input) {
        Ok(p) => p,
        Err(e) => {
            assert_printable(&e);
            if let ParseError::Option(o) = &e {
                assert_names_a_token(o, input);
            }
            return;
        }
    };
    assert!(!p.subs.is_empty() && p.subs.len() <= MAX_SUBSCRIBERS);
    for s in &p.subs {
        assert!(!s.proto.is_empty() && !s.rest.is_empty());
        assert_ne!(s.proto, b"virtual");
        assert_eq!(s.token.len(), s.proto.len() + 1 + s.rest.len());
        assert!(s.token.starts_with(s.proto) && s.token.ends_with(s.rest));
        assert_eq!(s.token[s.proto.len()], b':');
    }
    assert_eq!(p.key.is_some(), p.policy == Policy::Hash);
    if let Some(k) = p.key {
        assert!(!k.is_empty());
        assert!(!k.iter().any(|b| b" \t()".contains(b)));
    }
    let toks = tokens(&p);
    let out = printed(&p);
    assert_eq!(out, joined(&head_with_option(&p), &toks));
    assert_eq!(printed_key(&out), p.key);
    let again = parse(&out).expect("the printed socket parses");
    assert_eq!(again.policy, p.policy);
    assert_eq!(tokens(&again), toks);
    assert_eq!(again, p);
    assert!(same_socket(
        p.policy,
        p.key,
        &toks,
        again.policy,
        again.key,
        &toks
    ));
}

/// The reference model of matching: `doc/event_virtual.md` section 2, its
/// last paragraph (same policy; same subscribers, in order or as a multiset).
fn model_match(pa: Policy, a: &[&[u8]], pb: Policy, b: &[&[u8]]) -> bool {
    if pa != pb {
        return false;
    }
    // HASH orders like FAILOVER
    if pa == Policy::Parallel {
        let (mut a, mut b) = (a.to_vec(), b.to_vec());
        a.sort();
        b.sort();
        a == b
    } else {
        a == b
    }
}

/// A registry that knows no transport at all.
struct NoTransports;

impl Transports for NoTransports {
    type Trans = ();
    type Sock = ();
    fn lookup(&mut self, _proto: &[u8]) -> Option<()> {
        None
    }
    fn parse(&mut self, _t: (), _rest: &[u8]) -> Option<()> {
        None
    }
    fn release(&mut self, _t: (), _sock: ()) {}
}

fn refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
    v.iter().map(Vec::as_slice).collect()
}

// ---------------------------------------------------------------------------
// strategies

fn policy() -> impl Strategy<Value = Policy> {
    prop::sample::select(Policy::ALL.to_vec())
}

/// A run of spaces and tabs, at least one byte.
fn sep() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![b' ', b'\t']), 1..4)
}

/// Leading or trailing white space, possibly none.
fn pad() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![b' ', b'\t']), 0..3)
}

/// A well-formed subscriber token: `proto:rest`, proto not `virtual`, no
/// white space anywhere, any other byte (NUL, non-UTF-8, more colons) in rest.
fn valid_token() -> impl Strategy<Value = Vec<u8>> {
    let proto = prop_oneof![
        prop::sample::select(vec![
            "udp",
            "unix",
            "rabbitmq",
            "flatstore",
            "VIRTUAL",
            "virtuals"
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        "[a-z][a-z0-9_]{0,7}".prop_map(String::into_bytes),
    ]
    .prop_filter("virtual cannot be nested", |p| p != b"virtual");
    let rest = prop::collection::vec(
        any::<u8>().prop_filter("no white space", |b| *b != b' ' && *b != b'\t'),
        1..24,
    );
    (proto, rest).prop_map(|(mut p, r)| {
        p.push(b':');
        p.extend(r);
        p
    })
}

/// Words near the policy: the right ones, and ones close to them.
fn policy_word() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![
        "PARALLEL",
        "FAILOVER",
        "ROUND-ROBIN",
        "parallel",
        "PARALLELX",
        "ROUND_ROBIN",
        "ROUND-ROBIN:",
        "virtual:FAILOVER",
        "",
        "HASH(callid)",
        "HASH(i)",
        "HASH",
        "HASH()",
        "HASH(callid",
        "HASH(a)b",
        "HASH((a))",
        "HASH(a))",
        "hash(callid)",
        "HASH(\u{0}\u{7f})",
    ])
    .prop_map(|s| s.as_bytes().to_vec())
}

/// Tokens near a `SPOOL(...)` option: good ones, ones out of range or
/// malformed, other names, a policy where options go, and ones that are not
/// option-shaped at all.
fn near_option() -> impl Strategy<Value = Vec<u8>> {
    let arg = prop_oneof![
        prop::sample::select(vec![
            "0",
            "1",
            "007",
            "999999",
            "1000000",
            "1000001",
            "4294967295",
            "4294967296",
            "99999999999",
            "",
            "x",
            "-1",
            "+1",
            " 1",
        ])
        .prop_map(String::from),
        (0u32..2_000_000).prop_map(|n| n.to_string()),
    ];
    // odd bytes inside the parentheses (no white space, no colon: still
    // option-shaped)
    let odd = prop::collection::vec(
        any::<u8>().prop_filter("option-shaped", |b| !b" \t:".contains(b)),
        0..8,
    )
    .prop_map(|inner| [&b"SPOOL("[..], &inner, b")"].concat());
    prop_oneof![
        3 => (arg.clone(), prop::option::of(arg.clone()))
            .prop_map(|(a, b)| match b {
                None => format!("SPOOL({a})").into_bytes(),
                Some(b) => format!("SPOOL({a},{b})").into_bytes(),
            }),
        1 => prop::collection::vec(arg, 0..5)
            .prop_map(|v| format!("SPOOL({})", v.join(",")).into_bytes()),
        1 => odd,
        2 => prop::sample::select(vec![
            "SPOOL()", "SPOOL(5,)", "SPOOL(,5)", "SPOOL(5", "SPOOL5)", "SPOOL(5))", "SPOOL((5))",
            "spool(5)", "Spool(5)", "SPOOL_(5)", "X(1)", "HASH(callid)", "PARALLEL(1)",
            "ROUND-ROBIN(2)", "SPOOL(5):x", "SPOOL", "(5)", "SPOOL(5)x",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
    ]
}

/// Tokens near a subscriber: good ones, and ones missing a part, nested,
/// or with odd bytes, or an option where a subscriber goes.
fn near_token() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => valid_token(),
        1 => near_option(),
        2 => prop::sample::select(vec![
            "udp", ":x", "udp:", ":", "virtual:", "virtual:FAILOVER", "virtual:PARALLEL udp:1:1",
            "###", "udp:1.2.3.4:5", "rabbitmq:guest:guest@127.0.0.1:5672/pike", "PARALLEL",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        2 => prop::collection::vec(any::<u8>(), 0..12),
    ]
}

/// Near-valid sockets: [`near_words`], and a well-formed policy and
/// subscribers around near-valid options (a valid one now and then).
fn near_socket() -> impl Strategy<Value = Vec<u8>> {
    let option_socket = (
        policy(),
        hash_key(),
        prop::collection::vec(near_option(), 1..3),
        prop::collection::vec(valid_token(), 1..4),
    )
        .prop_map(|(p, key, options, toks)| {
            let key = (p == Policy::Hash).then_some(key);
            let mut v = head(p, key.as_deref());
            for t in options.iter().chain(&toks) {
                v.push(b' ');
                v.extend_from_slice(t);
            }
            v
        });
    prop_oneof![3 => near_words(), 1 => option_socket]
}

/// Policy word, options (none, one, or more), then tokens, separated by
/// runs of spaces and tabs (or by nothing at all, now and then).
fn near_words() -> impl Strategy<Value = Vec<u8>> {
    let sep_or_none = || prop_oneof![9 => sep(), 1 => Just(Vec::new())];
    let options = prop_oneof![
        2 => Just(Vec::new()),
        2 => prop::collection::vec((sep_or_none(), near_option()), 1..2),
        1 => prop::collection::vec((sep_or_none(), near_option()), 2..4),
    ];
    (
        pad(),
        policy_word(),
        options,
        prop::collection::vec((sep_or_none(), near_token()), 0..8),
        pad(),
    )
        .prop_map(|(lead, word, options, parts, trail)| {
            let mut v = lead;
            v.extend(word);
            for (s, t) in options.into_iter().chain(parts) {
                v.extend(s);
                v.extend(t);
            }
            v.extend(trail);
            v
        })
}

/// A HASH parameter name: any bytes but white space and parentheses.
fn hash_key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        any::<u8>().prop_filter("no white space or parentheses", |b| !b" \t()".contains(b)),
        1..16,
    )
}

/// A valid socket and the text it was written as, with arbitrary runs of
/// white space around and between the tokens.
fn valid_socket() -> impl Strategy<Value = (Policy, Vec<u8>, Vec<Vec<u8>>, Vec<u8>)> {
    (
        policy(),
        hash_key(),
        prop::collection::vec(valid_token(), 1..10),
    )
        .prop_flat_map(|(p, key, toks)| {
            let n = toks.len();
            let key = (p == Policy::Hash).then_some(key);
            (
                Just(p),
                Just(head(p, key.as_deref())),
                Just(toks),
                pad(),
                prop::collection::vec(sep(), n),
                pad(),
            )
        })
        .prop_map(|(p, head, toks, lead, seps, trail)| {
            let mut text = lead;
            text.extend_from_slice(&head);
            for (s, t) in seps.iter().zip(&toks) {
                text.extend_from_slice(s);
                text.extend_from_slice(t);
            }
            text.extend(trail);
            (p, head, toks, text)
        })
}

/// Tokens from a small alphabet, so that equal multisets and duplicates are
/// common.
fn small_tokens() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(
        prop::sample::select(vec!["udp:a:1", "udp:b:1", "unix:/c", "udp:a:1 "])
            .prop_map(|s| s.trim_end().as_bytes().to_vec()),
        0..7,
    )
}

// ---------------------------------------------------------------------------
// properties

proptest! {
    #[test]
    fn parse_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        check_any(&bytes);
    }

    #[test]
    fn parse_never_panics_on_near_valid_sockets(text in near_socket()) {
        check_any(&text);
    }

    #[test]
    fn valid_sockets_parse_print_and_parse_back((p, head, toks, text) in valid_socket()) {
        let parsed = parse(&text).expect("a valid socket parses");
        prop_assert_eq!(parsed.policy, p);
        prop_assert_eq!(tokens(&parsed), refs(&toks));
        let out = printed(&parsed);
        prop_assert_eq!(&out, &joined(&head, &refs(&toks)));
        let again = parse(&out).expect("the printed socket parses");
        prop_assert_eq!(again.policy, p);
        prop_assert_eq!(tokens(&again), refs(&toks));
        check_any(&text);
    }

    #[test]
    fn spool_options_parse_print_canonically_and_parse_back(
        (_p, head, toks, _text) in valid_socket(),
        size in 0u32..=1_000_000,
        age in prop::option::of(0u32..100_000),
        zeros in 0usize..3,
    ) {
        let opt = event_virtual::spool::SpoolOption { size, max_age_s: age };
        // leading zeros are accepted; printing is canonical
        let written = match age {
            None => format!("SPOOL({}{size})", "0".repeat(zeros)),
            Some(a) => format!("SPOOL({size},{}{a})", "0".repeat(zeros)),
        };
        let t = refs(&toks);
        let mut text = head.clone();
        text.extend_from_slice(b" ");
        text.extend_from_slice(written.as_bytes());
        for tok in &t {
            text.push(b' ');
            text.extend_from_slice(tok);
        }
        let parsed = parse(&text).expect("a socket with an option parses");
        prop_assert_eq!(parsed.spool, Some(opt));
        prop_assert_eq!(tokens(&parsed), t.clone());
        let out = printed(&parsed);
        let mut want = head.clone();
        want.push(b' ');
        want.extend_from_slice(opt.to_string().as_bytes());
        for tok in &t {
            want.push(b' ');
            want.extend_from_slice(tok);
        }
        prop_assert_eq!(&out, &want);
        let again = parse(&out).expect("the printed socket parses");
        prop_assert_eq!(again.spool, Some(opt));
        prop_assert_eq!(tokens(&again), t);
    }

    #[test]
    fn match_is_reflexive((p, _head, toks, _text) in valid_socket()) {
        let t = refs(&toks);
        prop_assert!(same_subscription(p, &t, p, &t));
    }

    #[test]
    fn hash_sockets_match_only_with_the_same_key_and_order(
        ka in hash_key(), kb in hash_key(),
        (toks, shuffled) in small_tokens()
            .prop_flat_map(|t| (Just(t.clone()), Just(t).prop_shuffle())),
        other in prop::sample::select(Policy::ALL[..3].to_vec()),
    ) {
        let (a, b) = (refs(&toks), refs(&shuffled));
        let h = Policy::Hash;
        let (ka, kb) = (Some(ka.as_slice()), Some(kb.as_slice()));
        prop_assert!(same_socket(h, ka, &a, h, ka, &a));
        prop_assert_eq!(same_socket(h, ka, &a, h, kb, &a), ka == kb);
        prop_assert_eq!(same_socket(h, ka, &a, h, ka, &b), a == b);
        // never another policy, whatever its tokens
        prop_assert!(!same_socket(h, ka, &a, other, None, &a));
        prop_assert!(!same_socket(other, None, &a, h, ka, &a));
    }

    #[test]
    fn match_is_symmetric_and_follows_the_spec(
        pa in policy(), a in small_tokens(), pb in policy(), b in small_tokens(),
    ) {
        let (a, b) = (refs(&a), refs(&b));
        let ab = same_subscription(pa, &a, pb, &b);
        prop_assert_eq!(ab, same_subscription(pb, &b, pa, &a));
        prop_assert_eq!(ab, model_match(pa, &a, pb, &b));
        if pa != pb {
            prop_assert!(!ab);
        }
    }

    #[test]
    fn parallel_matches_any_permutation(
        (toks, shuffled) in prop::collection::vec(valid_token(), 0..10)
            .prop_flat_map(|t| (Just(t.clone()), Just(t).prop_shuffle())),
    ) {
        let (a, b) = (refs(&toks), refs(&shuffled));
        prop_assert!(same_subscription(Policy::Parallel, &a, Policy::Parallel, &b));
        prop_assert!(same_subscription(Policy::Parallel, &b, Policy::Parallel, &a));
    }

    #[test]
    fn ordered_policies_match_a_permutation_iff_unchanged(
        p in prop::sample::select(vec![Policy::Failover, Policy::RoundRobin, Policy::Hash]),
        (toks, shuffled) in small_tokens()
            .prop_flat_map(|t| (Just(t.clone()), Just(t).prop_shuffle())),
    ) {
        let (a, b) = (refs(&toks), refs(&shuffled));
        prop_assert_eq!(same_subscription(p, &a, p, &b), a == b);
        prop_assert_eq!(same_subscription(p, &b, p, &a), a == b);
    }

    #[test]
    fn parallel_is_a_multiset(a in small_tokens(), extra in 0usize..7) {
        let a = refs(&a);
        let par = Policy::Parallel;
        // one more copy of a token already there is another subscription
        if let Some(&dup) = a.get(extra % a.len().max(1)) {
            let mut more = a.clone();
            more.insert(extra % (a.len() + 1), dup);
            prop_assert!(!same_subscription(par, &a, par, &more));
            prop_assert!(!same_subscription(par, &more, par, &a));
        }
        // the set of tokens only matches when there were no duplicates
        let mut set = a.clone();
        set.sort();
        set.dedup();
        prop_assert_eq!(same_subscription(par, &a, par, &set), set.len() == a.len());
    }

    #[test]
    fn parallel_counts_duplicates(
        (a, b) in (1usize..7).prop_flat_map(|n| {
            let two = || prop::collection::vec(prop::sample::select(vec!["udp:a:1", "unix:/b"]), n);
            (two(), two())
        }),
    ) {
        // same length, two tokens: same set but another multiset is common
        let (a, b): (Vec<&[u8]>, Vec<&[u8]>) = (
            a.iter().map(|s| s.as_bytes()).collect(),
            b.iter().map(|s| s.as_bytes()).collect(),
        );
        let par = Policy::Parallel;
        prop_assert_eq!(same_subscription(par, &a, par, &b), model_match(par, &a, par, &b));
    }

    #[test]
    fn quote_never_panics_and_is_printable(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let q = quote(&bytes);
        prop_assert!(q.bytes().all(|b| (0x20..0x7f).contains(&b)));
        prop_assert!(q.len() <= 4 * 120 + 3);
    }
}

/// The near-valid generator reaches what it is there for: sockets with a
/// valid option, and each way an option is refused.
#[test]
fn near_sockets_reach_valid_and_malformed_options() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = near_socket();
    let mut seen = std::collections::BTreeMap::<&str, u32>::new();
    for _ in 0..4000 {
        let text = strategy.new_tree(&mut runner).unwrap().current();
        let what = match parse(&text) {
            Ok(p) if p.spool.is_some() => "valid option",
            Ok(_) => "no option",
            Err(ParseError::Option(OptionError::Unknown(_))) => "unknown",
            Err(ParseError::Option(OptionError::PolicyNotFirst(_))) => "policy",
            Err(ParseError::Option(OptionError::BadSize(_))) => "size",
            Err(ParseError::Option(OptionError::BadAge(_))) => "age",
            Err(ParseError::Option(OptionError::Duplicate(_))) => "twice",
            Err(_) => "other error",
        };
        *seen.entry(what).or_default() += 1;
    }
    println!("{seen:?}");
    for what in [
        "valid option",
        "no option",
        "unknown",
        "policy",
        "size",
        "age",
        "twice",
        "other error",
    ] {
        assert!(
            seen.get(what).copied().unwrap_or(0) >= 20,
            "{what}: {seen:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// edge inputs

const KIB64: usize = 64 * 1024;

#[test]
fn a_64_kib_socket_with_one_long_subscriber() {
    let mut text = b"FAILOVER udp:".to_vec();
    text.resize(KIB64, b'a');
    let p = parse(&text).unwrap();
    assert_eq!(p.subs.len(), 1);
    assert_eq!(p.subs[0].rest.len(), KIB64 - b"FAILOVER udp:".len());
    check_any(&text);
}

#[test]
fn a_64_kib_socket_with_many_subscribers() {
    // 1000 tokens of 64 bytes and separators, padded with tabs to 64 KiB
    let mut text = b"ROUND-ROBIN".to_vec();
    for i in 0..1000 {
        text.push(b' ');
        let tok = format!("udp:10.0.{}.{}:{:0>47}", i / 256, i % 256, i);
        text.extend_from_slice(tok.as_bytes());
    }
    assert!(text.len() <= KIB64);
    text.resize(KIB64, b'\t');
    let p = parse(&text).unwrap();
    assert_eq!(p.subs.len(), 1000);
    check_any(&text);
}

#[test]
fn a_64_kib_invalid_socket() {
    // one 64 KiB token without a colon: refused, and quoted short
    let mut text = b"PARALLEL ".to_vec();
    text.resize(KIB64, b'x');
    match parse(&text) {
        Err(ParseError::MissingColon(t)) => {
            assert!(t.starts_with("xxx") && t.ends_with("...") && t.len() < 200)
        }
        other => panic!("expected MissingColon, got {other:?}"),
    }
    // 64 KiB of white space
    let blank: Vec<u8> = (0..KIB64)
        .map(|i| if i % 3 == 0 { b'\t' } else { b' ' })
        .collect();
    assert_eq!(parse(&blank), Err(ParseError::Empty));
    // 64 KiB of subscribers: far too many
    let mut many = b"PARALLEL".to_vec();
    while many.len() + 8 <= KIB64 {
        many.extend_from_slice(b" udp:1:1");
    }
    let n = (many.len() - b"PARALLEL".len()) / 8;
    assert_eq!(parse(&many), Err(ParseError::TooManySubscribers(n)));
    // 64 KiB of bytes that are not a socket at all
    let junk: Vec<u8> = (0..KIB64).map(|i| (i * 131 % 251) as u8).collect();
    check_any(&junk);
}

fn with_subscribers(n: usize) -> Vec<u8> {
    let mut text = b"PARALLEL".to_vec();
    for i in 0..n {
        text.extend_from_slice(format!(" udp:127.0.0.1:{}", 1 + i).as_bytes());
    }
    text
}

#[test]
fn max_subscribers_and_a_thousand_are_accepted() {
    for n in [1000, MAX_SUBSCRIBERS] {
        let text = with_subscribers(n);
        let p = parse(&text).unwrap();
        assert_eq!(p.subs.len(), n);
        check_any(&text);
    }
}

#[test]
fn one_subscriber_too_many_is_refused() {
    let text = with_subscribers(MAX_SUBSCRIBERS + 1);
    let e = parse(&text).unwrap_err();
    assert_eq!(e, ParseError::TooManySubscribers(MAX_SUBSCRIBERS + 1));
    assert!(e.to_string().contains(&format!("{}", MAX_SUBSCRIBERS + 1)));
    assert!(
        e.to_string()
            .contains(&format!("at most {MAX_SUBSCRIBERS}"))
    );
}

#[test]
fn bytes_that_are_not_utf8_are_accepted_in_tokens() {
    let text = b"FAILOVER udp:\xff\xfe\x80:1\tunix:/tmp/\xc3\xa9";
    let p = parse(text).unwrap();
    assert_eq!(p.subs[0].rest, b"\xff\xfe\x80:1");
    assert_eq!(p.subs[1].token, b"unix:/tmp/\xc3\xa9");
    assert_eq!(
        printed(&p),
        b"FAILOVER udp:\xff\xfe\x80:1 unix:/tmp/\xc3\xa9"
    );
    check_any(text);
}

#[test]
fn bytes_that_are_not_utf8_are_quoted_in_errors() {
    let e = parse(b"PARALLEL \xff\xfe").unwrap_err();
    assert_eq!(e, ParseError::MissingColon("\\xff\\xfe".into()));
    assert_printable(&e);
    let e = parse(b"PAR\xc0LLEL udp:1:1").unwrap_err();
    assert_eq!(e, ParseError::UnknownPolicy("PAR\\xc0LLEL".into()));
    assert_printable(&e);
    // a proto that is not UTF-8 parses; the registry then does not know it
    let p = parse(b"PARALLEL \x80:1").unwrap();
    assert_eq!(p.subs[0].proto, b"\x80");
    let e = open_subscribers(&mut NoTransports, &p).unwrap_err();
    assert_eq!(
        e,
        ParseError::UnknownTransport {
            proto: "\\x80".into(),
            token: "\\x80:1".into()
        }
    );
    assert_printable(&e);
}

#[test]
fn a_nul_inside_a_token_is_a_byte_of_the_token() {
    let text = b"PARALLEL udp:1.2\x003.4:5 unix:/x";
    let p = parse(text).unwrap();
    assert_eq!(p.subs.len(), 2);
    assert_eq!(p.subs[0].token, b"udp:1.2\x003.4:5");
    assert_eq!(printed(&p), b"PARALLEL udp:1.2\x003.4:5 unix:/x");
    check_any(text);
    // NUL is not a separator
    let e = parse(b"ROUND-ROBIN\x00udp:1:1").unwrap_err();
    assert_eq!(
        e,
        ParseError::UnknownPolicy("ROUND-ROBIN\\x00udp:1:1".into())
    );
    assert_printable(&e);
}

#[test]
fn a_nul_in_a_bad_token_never_reaches_the_error_text() {
    for (text, want) in [
        (
            &b"PARALLEL bad\x00tok"[..],
            ParseError::MissingColon("bad\\x00tok".into()),
        ),
        (
            b"PARALLEL \x00:",
            ParseError::MissingAddress("\\x00:".into()),
        ),
        (b"FAILOVER \x00", ParseError::MissingColon("\\x00".into())),
        (
            b"\x00PARALLEL udp:1:1",
            ParseError::UnknownPolicy("\\x00PARALLEL".into()),
        ),
    ] {
        let e = parse(text).unwrap_err();
        assert_eq!(e, want);
        assert_printable(&e);
        assert!(!e.to_string().contains('\0'));
    }
    // `virtual` followed by a NUL is another transport name, not a nesting:
    // the registry refuses it by name, quoted
    let p = parse(b"FAILOVER virtual\x00:x").unwrap();
    let e = open_subscribers(&mut NoTransports, &p).unwrap_err();
    assert_eq!(
        e,
        ParseError::UnknownTransport {
            proto: "virtual\\x00".into(),
            token: "virtual\\x00:x".into()
        }
    );
    assert!(!e.to_string().contains('\0'));
}

#[test]
fn trailing_garbage_after_a_valid_socket_is_refused() {
    let e = parse(b"PARALLEL udp:1.2.3.4:5 ###").unwrap_err();
    assert_eq!(e, ParseError::MissingColon("###".into()));
    assert!(e.to_string().contains("'###'"));
    let e = parse(b"FAILOVER udp:1.2.3.4:5\t virtual:FAILOVER").unwrap_err();
    assert_eq!(e, ParseError::Nested("virtual:FAILOVER".into()));
}

#[test]
fn the_virtual_prefix_is_not_part_of_the_socket() {
    // the core strips `virtual:`; left in, it is not a policy
    let e = parse(b"virtual:FAILOVER udp:1:1").unwrap_err();
    assert_eq!(e, ParseError::UnknownPolicy("virtual:FAILOVER".into()));
    let e = parse(b"PARALLELX udp:1:1").unwrap_err();
    assert_eq!(e, ParseError::UnknownPolicy("PARALLELX".into()));
}

// ---------------------------------------------------------------------------
// HASH placement (rendezvous hashing) over the real walk

struct Sub(Health);

impl AsRef<Health> for Sub {
    fn as_ref(&self) -> &Health {
        &self.0
    }
}

fn seeded(tokens: &[Vec<u8>]) -> Vec<Sub> {
    seeds(&refs(tokens))
        .into_iter()
        .map(|s| Sub(Health::seeded(s)))
        .collect()
}

/// Subscribers up or down; records the order of attempts.
struct Tried {
    up: Vec<bool>,
    order: Vec<usize>,
}

impl Driver for Tried {
    fn attempt(&mut self, i: usize, _: &Walk) -> Attempt {
        self.order.push(i);
        if self.up[i] {
            Attempt::Taken
        } else {
            Attempt::Failed
        }
    }
    fn transition(&mut self, _: usize, _: Transition) {}
}

const RULES: Rules = Rules { window_ms: 1000 };

/// The subscribers one HASH event with `value` was attempted on, in order
/// (the last one took it, if any did).
fn place(subs: &[Sub], value: &[u8], up: &[bool], now: u64) -> Vec<usize> {
    let mut d = Tried {
        up: up.to_vec(),
        order: vec![],
    };
    let rotation = Rotation::default();
    let p = deliver(
        Policy::Hash,
        &rotation,
        Some(value),
        subs,
        RULES,
        now,
        &mut d,
    );
    assert!(matches!(p, Progress::Done(_)));
    d.order
}

fn distinct_tokens() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::hash_set(valid_token(), 2..9).prop_map(|s| s.into_iter().collect())
}

proptest! {
    #[test]
    fn hash_offers_in_the_documented_order(
        toks in prop::collection::vec(
            prop::sample::select(vec!["udp:a:1", "udp:b:1", "unix:/c", "tcp:d:1"])
                .prop_map(|s| s.as_bytes().to_vec()),
            1..9),
        value in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let subs = seeded(&toks);
        let s: Vec<u64> = subs.iter().map(|s| s.0.seed()).collect();
        let order = place(&subs, &value, &vec![false; toks.len()], 10);
        prop_assert_eq!(order, hash_order(digest(&value), &s));
    }

    #[test]
    fn hash_offers_healthy_ones_first_as_hash_attempts_says(
        toks in distinct_tokens(),
        value in prop::collection::vec(any::<u8>(), 0..40),
        down in prop::collection::vec(any::<bool>(), 9),
    ) {
        let n = toks.len();
        let subs = seeded(&toks);
        let skipped = &down[..n];
        // fail the "down" ones now: they are inside their window after
        for (i, &d) in skipped.iter().enumerate() {
            if d {
                subs[i].0.record(false, 5);
            }
        }
        let s: Vec<u64> = subs.iter().map(|s| s.0.seed()).collect();
        let order = place(&subs, &value, &vec![false; n], 10);
        prop_assert_eq!(order, hash_attempts(digest(&value), &s, skipped));
    }

    #[test]
    fn hash_is_sticky_and_a_failure_moves_only_the_failed_ones_values(
        toks in distinct_tokens(),
        values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 1..40),
        down in any::<prop::sample::Index>(),
    ) {
        let n = toks.len();
        let down = down.index(n);
        let s = seeds(&refs(&toks));
        // one socket through the whole run, its clock only going forward
        let subs = seeded(&toks);
        let all_up = vec![true; n];
        let mut up = all_up.clone();
        up[down] = false;
        let (t_during, t_back) = (20, 20 + RULES.window_ms + 100);
        let mut down_failed = false;
        for (k, v) in values.iter().enumerate() {
            // where the value goes while all are healthy: from the hash
            // alone, not from a placement the socket made
            let order = hash_order(digest(v), &s);
            let healthy = order[0];
            // on a socket of its own that nothing has failed yet
            let fresh = seeded(&toks);
            prop_assert_eq!(place(&fresh, v, &all_up, 10), vec![healthy]);
            prop_assert_eq!(place(&fresh, v, &all_up, 11), vec![healthy], "not sticky");
            // the shared socket: `down` fails (the first of its values
            // finds it healthy, every later one inside its window)
            let tried = place(&subs, v, &up, t_during + k as u64);
            let during = *tried.last().unwrap();
            prop_assert_ne!(during, down);
            if healthy != down {
                prop_assert_eq!(&tried, &vec![healthy], "a healthy subscriber's value moved");
            } else {
                // to the value's second choice
                prop_assert_eq!(during, order[1]);
                let want = if down_failed { vec![order[1]] } else { vec![down, order[1]] };
                prop_assert_eq!(&tried, &want);
                down_failed = true;
            }
        }
        // the window over, `down` is up again: every value goes home
        for (k, v) in values.iter().enumerate() {
            let healthy = hash_order(digest(v), &s)[0];
            let tried = place(&subs, v, &all_up, t_back + k as u64);
            prop_assert_eq!(tried.last(), Some(&healthy), "{:?}", tried);
        }
    }

    #[test]
    fn removing_a_subscriber_moves_only_its_values(
        toks in distinct_tokens(),
        values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 1..40),
        gone in any::<prop::sample::Index>(),
    ) {
        let gone = gone.index(toks.len());
        let mut fewer = toks.clone();
        fewer.remove(gone);
        let (s_all, s_fewer) = (seeds(&refs(&toks)), seeds(&refs(&fewer)));
        for v in &values {
            let d = digest(v);
            let before = hash_order(d, &s_all)[0];
            let after = hash_order(d, &s_fewer)[0];
            let after = if after >= gone { after + 1 } else { after };
            if before != gone {
                prop_assert_eq!(before, after);
            }
        }
    }
}
