//! The spool's settings: the modparams, and the per-subscription
//! `SPOOL(...)` token.
//!
//! ```text
//! modparam("event_virtual", "spool_size", 500)            # 0 = off (default)
//! modparam("event_virtual", "spool_max_age", 3600)        # seconds, 0 = none
//! modparam("event_virtual", "spool_max_memory", "16M")    # bytes, K, M, G
//! modparam("event_virtual", "spool_retry_interval", 1000) # ms
//!
//! virtual:FAILOVER SPOOL(1000) udp:10.0.0.1:9 udp:10.0.0.2:9
//! virtual:PARALLEL SPOOL(200,600) unix:/run/a.sock tcp:10.0.0.5:8080/m
//! virtual:ROUND-ROBIN SPOOL(0) udp:10.0.0.1:9     # off for this one
//! ```
//!
//! Option tokens come between the policy and the first subscriber.  They
//! cannot be mistaken for a subscriber: a subscriber token is always
//! `proto:rest`, and an option token never has a `:`.  Nor for a policy:
//! the policy is always the first token (`HASH(<param>)` included), an
//! option never is.  Plain C syntax has no option token, and means the
//! modparams.

use std::fmt;
use std::iter::Peekable;

use crate::text::quote;

/// The largest `spool_size`, per queue: a bound on what one typing slip
/// can ask for (the memory budget bounds what it gets).
pub const MAX_SPOOL_SIZE: u32 = 1_000_000;
/// `spool_retry_interval` if not set, ms.
pub const DEFAULT_RETRY_MS: u64 = 1000;
/// The shortest `spool_retry_interval`, ms: no faster retry loop than this.
pub const MIN_RETRY_MS: u64 = 10;
/// `spool_max_memory` if not set: an eighth of shared memory, at most this.
pub const DEFAULT_BUDGET_CAP: u64 = 64 << 20;

/// One queue's bounds, fixed when the subscription is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Events held at most; 0 holds nothing.
    pub capacity: u32,
    /// Older events are dropped; 0 keeps them however old.
    pub max_age_ms: u64,
    /// The least time between two failed attempts on the queue's head.
    pub retry_ms: u64,
}

/// The modparams as OpenSIPS hands them over (integers as set, the memory
/// as text, `None` when not set).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModParams {
    pub spool_size: i64,
    pub spool_max_age: i64,
    pub spool_max_memory: Option<String>,
    pub spool_retry_interval: i64,
}

/// The module's spool settings, checked at mod_init.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `spool_size`: the capacity of a subscription without `SPOOL(...)`;
    /// 0 leaves those subscriptions without a spool.
    pub default_capacity: u32,
    pub max_age_ms: u64,
    /// `spool_max_memory`: bytes all held events may take together.
    pub budget_bytes: u64,
    pub retry_ms: u64,
}

impl ModParams {
    /// Check the modparams against the size of shared memory; the error
    /// is the one line mod_init logs before it refuses to start.
    pub fn check(&self, shm_total: u64) -> Result<Config, String> {
        let default_capacity = u32::try_from(self.spool_size)
            .ok()
            .filter(|&n| n <= MAX_SPOOL_SIZE)
            .ok_or_else(|| {
                format!(
                    "spool_size must be 0 (off) to {MAX_SPOOL_SIZE}, not {}",
                    self.spool_size
                )
            })?;
        let max_age_ms = u64::try_from(self.spool_max_age)
            .map(|s| s.saturating_mul(1000))
            .map_err(|_| {
                format!(
                    "spool_max_age must be 0 (no limit) or more seconds, not {}",
                    self.spool_max_age
                )
            })?;
        let ms = self.spool_retry_interval;
        let retry_ms = u64::try_from(ms)
            .ok()
            .filter(|&ms| ms >= MIN_RETRY_MS)
            .ok_or_else(|| {
                format!("spool_retry_interval must be {MIN_RETRY_MS} ms or more, not {ms}")
            })?;
        let budget_bytes = match self.spool_max_memory.as_deref() {
            None | Some("") | Some("auto") => default_budget(shm_total),
            Some(text) => {
                let b = parse_bytes(text).ok_or_else(|| {
                    format!(
                        "spool_max_memory '{}' is not a size (bytes, or a number with K, M or G)",
                        quote(text.as_bytes())
                    )
                })?;
                // half of shared memory at most: the SIP server needs the rest
                if shm_total > 0 && b > shm_total / 2 {
                    return Err(format!(
                        "spool_max_memory {b} is more than half of shared memory ({shm_total} bytes)"
                    ));
                }
                b
            }
        };
        Ok(Config {
            default_capacity,
            max_age_ms,
            budget_bytes,
            retry_ms,
        })
    }
}

impl Config {
    /// The bounds of a new subscription's queues, from its `SPOOL(...)`
    /// token if it has one, else the modparams; None: no spool.
    pub fn limits(&self, option: Option<SpoolOption>) -> Option<Limits> {
        let (capacity, max_age_ms) = match option {
            None => (self.default_capacity, self.max_age_ms),
            Some(o) => (
                o.size,
                o.max_age_s.map_or(self.max_age_ms, |s| u64::from(s) * 1000),
            ),
        };
        (capacity > 0).then_some(Limits {
            capacity,
            max_age_ms,
            retry_ms: self.retry_ms,
        })
    }
}

/// An eighth of shared memory, at most [`DEFAULT_BUDGET_CAP`].
pub fn default_budget(shm_total: u64) -> u64 {
    (shm_total / 8).min(DEFAULT_BUDGET_CAP)
}

/// `1048576`, `1024K`, `1M`, `1G` (powers of 1024, either case).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, shift) = match t.as_bytes().last()? {
        b'k' | b'K' => (&t[..t.len() - 1], 10),
        b'm' | b'M' => (&t[..t.len() - 1], 20),
        b'g' | b'G' => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1 << shift)
}

/// A subscription's own spool setting: `SPOOL(<size>[,<max_age_s>])`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpoolOption {
    /// Events held per queue; 0 turns the spool off for this subscription.
    pub size: u32,
    /// Seconds; None: the `spool_max_age` modparam.
    pub max_age_s: Option<u32>,
}

impl fmt::Display for SpoolOption {
    /// The canonical text, as print shows it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.max_age_s {
            None => write!(f, "SPOOL({})", self.size),
            Some(a) => write!(f, "SPOOL({},{a})", self.size),
        }
    }
}

/// Why an option token was refused; every variant names the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionError {
    Unknown(String),
    /// `HASH(...)` (or another policy) where options go.
    PolicyNotFirst(String),
    BadSize(String),
    BadAge(String),
    Duplicate(String),
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionError::Unknown(t) => write!(
                f,
                "unknown option '{t}' (expected SPOOL(<size>[,<max_age>]))"
            ),
            OptionError::PolicyNotFirst(t) => {
                write!(f, "'{t}' is a policy: it must be the first token")
            }
            OptionError::BadSize(t) => write!(
                f,
                "option '{t}': the size must be a number from 0 to {MAX_SPOOL_SIZE}"
            ),
            OptionError::BadAge(t) => {
                write!(
                    f,
                    "option '{t}': the maximum age must be a number of seconds"
                )
            }
            OptionError::Duplicate(t) => write!(f, "option '{t}' given twice"),
        }
    }
}

/// Whether `tok` is shaped as an option, `NAME(...)`, with no `:`.  Other
/// tokens are left to the subscriber parser, which refuses a colon-less
/// token as before (`is not of the form transport:address`).
pub fn is_option(tok: &[u8]) -> bool {
    let Some(open) = tok.iter().position(|&b| b == b'(') else {
        return false;
    };
    !tok.contains(&b':')
        && open > 0
        && tok.ends_with(b")")
        && tok[..open]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
}

/// Parse one option token (see [`is_option`]); a name `is_policy` knows
/// is a misplaced policy.
pub fn parse_option(tok: &[u8], is_policy: fn(&[u8]) -> bool) -> Result<SpoolOption, OptionError> {
    let q = || quote(tok);
    let open = tok.iter().position(|&b| b == b'(').unwrap_or(tok.len());
    let (name, args) = (&tok[..open], tok.get(open + 1..tok.len().saturating_sub(1)));
    match name {
        b"SPOOL" => {}
        _ if is_policy(name) => return Err(OptionError::PolicyNotFirst(q())),
        _ => return Err(OptionError::Unknown(q())),
    }
    let args = args.filter(|_| tok.ends_with(b")")).unwrap_or_default();
    let mut parts = args.split(|&b| b == b',');
    let size = parts
        .next()
        .and_then(number)
        .filter(|&n| n <= u64::from(MAX_SPOOL_SIZE))
        .ok_or_else(|| OptionError::BadSize(q()))?;
    let max_age_s = match parts.next() {
        None => None,
        Some(a) => Some(
            number(a)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| OptionError::BadAge(q()))?,
        ),
    };
    if parts.next().is_some() {
        return Err(OptionError::BadAge(q()));
    }
    Ok(SpoolOption {
        size: size as u32,
        max_age_s,
    })
}

/// Decimal digits only: no sign, no spaces, at most 10 of them.
fn number(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 10 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// Take the option tokens that follow the policy off `tokens`, leaving the
/// first subscriber next.  This is the call the socket parser makes right
/// after it has read the policy, telling the policies' names.
pub fn take_options<'a, I>(
    tokens: &mut Peekable<I>,
    is_policy: fn(&[u8]) -> bool,
) -> Result<Option<SpoolOption>, OptionError>
where
    I: Iterator<Item = &'a [u8]>,
{
    let mut spool = None;
    while let Some(tok) = tokens.next_if(|t| is_option(t)) {
        let o = parse_option(tok, is_policy)?;
        if spool.replace(o).is_some() {
            return Err(OptionError::Duplicate(quote(tok)));
        }
    }
    Ok(spool)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    /// The socket parser's test of a policy's name.
    fn hash(name: &[u8]) -> bool {
        matches!(name, b"HASH" | b"PARALLEL" | b"FAILOVER" | b"ROUND-ROBIN")
    }

    fn opt(s: &str) -> Result<SpoolOption, OptionError> {
        assert!(is_option(s.as_bytes()), "{s} is not option-shaped");
        parse_option(s.as_bytes(), hash)
    }

    #[test]
    fn parses_size_and_age() {
        assert_eq!(
            opt("SPOOL(500)"),
            Ok(SpoolOption {
                size: 500,
                max_age_s: None
            })
        );
        assert_eq!(
            opt("SPOOL(0,60)"),
            Ok(SpoolOption {
                size: 0,
                max_age_s: Some(60)
            })
        );
        assert_eq!(opt("SPOOL(1000000)").unwrap().to_string(), "SPOOL(1000000)");
        assert_eq!(opt("SPOOL(7,0)").unwrap().to_string(), "SPOOL(7,0)");
    }

    #[test]
    fn refuses_bad_options_naming_the_token() {
        for bad in [
            "SPOOL()",
            "SPOOL(x)",
            "SPOOL(-1)",
            "SPOOL(+1)",
            "SPOOL(1000001)",
            "SPOOL(99999999999)",
        ] {
            assert_eq!(opt(bad), Err(OptionError::BadSize(bad.into())), "{bad}");
        }
        for bad in [
            "SPOOL(5,)",
            "SPOOL(5,x)",
            "SPOOL(5,1,2)",
            "SPOOL(5,4294967296)",
        ] {
            assert_eq!(opt(bad), Err(OptionError::BadAge(bad.into())), "{bad}");
        }
        assert_eq!(
            opt("spool(5)"),
            Err(OptionError::Unknown("spool(5)".into()))
        );
        assert_eq!(
            opt("HASH(callid)"),
            Err(OptionError::PolicyNotFirst("HASH(callid)".into()))
        );
        assert!(
            OptionError::Unknown("X(1)".into())
                .to_string()
                .contains("'X(1)'")
        );
    }

    #[test]
    fn never_takes_a_subscriber_token() {
        for sub in [
            "udp:127.0.0.1:9",
            "unix:/run/SPOOL(5)",
            "SPOOL(5):x",
            "tcp:h:1/m(x)",
            "rabbitmq:g:g@h:5672/q",
            "udp",
            "SPOOL",
            "(5)",
            "SPOOL(5",
        ] {
            assert!(!is_option(sub.as_bytes()), "{sub}");
        }
    }

    #[test]
    fn takes_options_between_policy_and_subscribers() {
        let text: Vec<&[u8]> = vec![b"SPOOL(9)", b"udp:a:1", b"SPOOL(3)"];
        let mut it = text.into_iter().peekable();
        let o = take_options(&mut it, hash).unwrap();
        assert_eq!(o.map(|o| o.size), Some(9));
        // the subscribers are left, a later option-shaped token included
        // (the subscriber parser refuses it)
        assert_eq!(it.next(), Some(&b"udp:a:1"[..]));
        let mut none = [&b"udp:a:1"[..]].into_iter().peekable();
        assert_eq!(take_options(&mut none, hash), Ok(None));
        assert_eq!(none.count(), 1);
        let mut twice = [&b"SPOOL(1)"[..], b"SPOOL(2)"].into_iter().peekable();
        assert_eq!(
            take_options(&mut twice, hash),
            Err(OptionError::Duplicate("SPOOL(2)".into()))
        );
    }

    proptest::proptest! {
        #[test]
        fn prints_what_it_parses(size in 0..=MAX_SPOOL_SIZE, age in proptest::option::of(proptest::num::u32::ANY)) {
            let o = SpoolOption { size, max_age_s: age };
            let text = o.to_string();
            proptest::prop_assert!(is_option(text.as_bytes()));
            proptest::prop_assert_eq!(parse_option(text.as_bytes(), hash), Ok(o));
        }

        #[test]
        fn any_token_is_refused_safely_or_left_to_the_subscriber_parser(
            tok in proptest::prop_oneof![
                1 => proptest::collection::vec(proptest::num::u8::ANY, 0..24),
                3 => shaped_token(),
            ]
        ) {
            // no panic; a token with a ':' is never an option; an
            // option-shaped token that is refused is named, quoted safely
            // for a log line
            if is_option(&tok) {
                proptest::prop_assert!(!tok.contains(&b':'));
                match parse_option(&tok, hash) {
                    Err(e) => {
                        let text = e.to_string();
                        proptest::prop_assert!(text.bytes().all(|b| (0x20..0x7f).contains(&b)));
                        proptest::prop_assert!(text.contains(&format!("'{}'", quote(&tok))), "{}", text);
                    }
                    Ok(o) => {
                        proptest::prop_assert!(tok.starts_with(b"SPOOL("));
                        proptest::prop_assert_eq!(parse_option(o.to_string().as_bytes(), hash), Ok(o));
                    }
                }
            }
        }

        #[test]
        fn option_shaped_tokens_are_options_unless_they_have_a_colon(tok in shaped_token()) {
            proptest::prop_assert_eq!(is_option(&tok), !tok.contains(&b':'));
        }

        #[test]
        fn option_shaped_text_round_trips(
            name in proptest::prop_oneof![
                3 => proptest::strategy::Just("SPOOL".to_string()),
                1 => proptest::sample::select(vec!["HASH", "FAILOVER", "PARALLEL", "SPOOLS", "SPOO"])
                    .prop_map(String::from),
                1 => "[A-Z]{1,6}",
            ],
            args in proptest::prop_oneof![
                3 => proptest::collection::vec(number_text(), 0..4).prop_map(|v| v.join(",")),
                1 => "[0-9,]{0,12}",
            ],
        ) {
            let tok = format!("{name}({args})");
            proptest::prop_assert!(is_option(tok.as_bytes()));
            let got = parse_option(tok.as_bytes(), hash);
            proptest::prop_assert_eq!(&got, &model(&name, &args, &tok));
            if let Ok(o) = got {
                proptest::prop_assert_eq!(parse_option(o.to_string().as_bytes(), hash), Ok(o));
            }
        }
    }

    /// `NAME(...)`: a name near the option's or the policies' (or any
    /// word of the allowed bytes), any bytes between the parentheses.
    fn shaped_token() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let name = prop_oneof![
            prop::sample::select(vec!["SPOOL", "HASH", "ROUND-ROBIN", "spool", "SPOOL_"])
                .prop_map(|s| s.as_bytes().to_vec()),
            "[A-Za-z0-9_-]{1,8}".prop_map(String::into_bytes),
        ];
        let inner = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..16),
            "[0-9,]{0,14}".prop_map(String::into_bytes),
        ];
        (name, inner).prop_map(|(mut t, inner)| {
            t.push(b'(');
            t.extend(inner);
            t.push(b')');
            t
        })
    }

    /// An argument of `SPOOL(...)`: numbers in and out of range, at the
    /// bounds, with leading zeros, too long, empty, or not a number.
    fn number_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let max = u64::from(MAX_SPOOL_SIZE);
        let bounds = vec![
            0,
            1,
            max - 1,
            max,
            max + 1,
            1 << 32,
            (1 << 32) - 1,
            9_999_999_999,
        ];
        prop_oneof![
            3 => prop::sample::select(bounds).prop_map(|n| n.to_string()),
            1 => (0u64..2_000_000).prop_map(|n| n.to_string()),
            1 => (max - 10..max + 10).prop_map(|n| n.to_string()),
            1 => ((1u64 << 32) - 10..(1 << 32) + 10).prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => (0usize..12, 0u64..1000).prop_map(|(z, n)| format!("{}{n}", "0".repeat(z))),
            1 => "[0-9]{0,12}",
            1 => "[-+ x0-9]{1,4}",
        ]
    }

    /// What `parse_option` must answer for `NAME(args)`, from the syntax
    /// alone: a size of 1 to 10 digits up to MAX_SPOOL_SIZE, then
    /// optionally an age of 1 to 10 digits that fits in 32 bits.
    fn model(name: &str, args: &str, tok: &str) -> Result<SpoolOption, OptionError> {
        match name {
            "SPOOL" => {}
            "HASH" | "FAILOVER" | "PARALLEL" | "ROUND-ROBIN" => {
                return Err(OptionError::PolicyNotFirst(tok.into()));
            }
            _ => return Err(OptionError::Unknown(tok.into())),
        }
        let num = |s: &str| {
            (!s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u64>().unwrap())
        };
        let parts: Vec<&str> = args.split(',').collect();
        let size = num(parts[0])
            .filter(|&n| n <= u64::from(MAX_SPOOL_SIZE))
            .ok_or_else(|| OptionError::BadSize(tok.into()))?;
        let max_age_s = match parts.get(1..) {
            Some([]) | None => None,
            Some([a]) => Some(
                num(a)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| OptionError::BadAge(tok.into()))?,
            ),
            Some(_) => return Err(OptionError::BadAge(tok.into())),
        };
        Ok(SpoolOption {
            size: size as u32,
            max_age_s,
        })
    }

    #[test]
    fn checks_the_modparams() {
        let shm = 256 << 20;
        let c = ModParams {
            spool_retry_interval: DEFAULT_RETRY_MS as i64,
            ..ModParams::default()
        }
        .check(shm)
        .unwrap();
        assert_eq!(
            c,
            Config {
                default_capacity: 0,
                max_age_ms: 0,
                budget_bytes: 32 << 20,
                retry_ms: DEFAULT_RETRY_MS
            }
        );
        assert_eq!(default_budget(4 << 30), DEFAULT_BUDGET_CAP);
        let p = ModParams {
            spool_size: 500,
            spool_max_age: 60,
            spool_max_memory: Some("8M".into()),
            spool_retry_interval: 250,
        };
        let c = p.check(shm).unwrap();
        assert_eq!(
            (c.default_capacity, c.max_age_ms, c.budget_bytes, c.retry_ms),
            (500, 60_000, 8 << 20, 250)
        );
        for bad in [
            ModParams {
                spool_size: -1,
                ..p.clone()
            },
            ModParams {
                spool_size: 1_000_001,
                ..p.clone()
            },
            ModParams {
                spool_max_age: -5,
                ..p.clone()
            },
            ModParams {
                spool_retry_interval: 9,
                ..p.clone()
            },
            ModParams {
                spool_retry_interval: -1,
                ..p.clone()
            },
            ModParams {
                spool_max_memory: Some("lots".into()),
                ..p.clone()
            },
            ModParams {
                spool_max_memory: Some("200M".into()),
                ..p.clone()
            },
        ] {
            let e = bad.check(shm).unwrap_err();
            assert!(e.starts_with("spool_"), "{e}");
        }
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("1024k"), Some(1 << 20));
        assert_eq!(parse_bytes(" 16M "), Some(16 << 20));
        assert_eq!(parse_bytes("1G"), Some(1 << 30));
        for bad in ["", "M", "-1M", "1.5M", "1T", "99999999999999999999G"] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
    }

    #[test]
    fn subscription_option_overrides_the_modparams() {
        let c = Config {
            default_capacity: 100,
            max_age_ms: 5000,
            budget_bytes: 1 << 20,
            retry_ms: 1000,
        };
        assert_eq!(c.limits(None).map(|l| l.capacity), Some(100));
        let own = c
            .limits(Some(SpoolOption {
                size: 7,
                max_age_s: Some(2),
            }))
            .unwrap();
        assert_eq!(
            (own.capacity, own.max_age_ms, own.retry_ms),
            (7, 2000, 1000)
        );
        let keep_age = c.limits(Some(SpoolOption {
            size: 7,
            max_age_s: None,
        }));
        assert_eq!(keep_age.map(|l| l.max_age_ms), Some(5000));
        assert_eq!(
            c.limits(Some(SpoolOption {
                size: 0,
                max_age_s: None
            })),
            None
        );
        let off = Config {
            default_capacity: 0,
            ..c
        };
        assert_eq!(off.limits(None), None);
        assert!(
            off.limits(Some(SpoolOption {
                size: 3,
                max_age_s: None
            }))
            .is_some()
        );
    }
}
