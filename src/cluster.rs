//! What the nodes of a cluster tell each other (issue 18), in packets of
//! OpenSIPS's bin protocol carried by its `clusterer` module.
//!
//! Every packet travels under one capability, [`CAPABILITY`], and its bin
//! header names its protocol [`VERSION`] and its type: [`HEALTH`] now, a
//! spool's records later.  A packet of another version or of an unknown
//! type is dropped and counted, as is a malformed one; nothing a peer
//! sends can do more than that.
//!
//! A HEALTH packet says that one subscriber of one subscription is failing
//! (since how long) or healthy again.  A subscription is named by its
//! event and its text without its `SPOOL(...)` option (`socket::identity`), so that the same subscription made
//! on each node is the same on the wire; the subscriber by its index.
//! Its fields, in order: event (str), socket (str), index (int), state
//! (int: 0 healthy, 1 failing), age in ms (int, 0 when healthy).

#![forbid(unsafe_code)]

use std::fmt;

use crate::policy::Told;
use crate::socket::MAX_SUBSCRIBERS;

/// The capability every packet of the module travels under.
pub const CAPABILITY: &std::ffi::CStr = c"event_virtual-repl";

/// The protocol version in each packet's bin header.
pub const VERSION: i16 = 1;

/// Packet types, in each packet's bin header.
pub const HEALTH: i32 = 1;

/// One subscriber's health, as one node tells the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health<'a> {
    pub event: &'a [u8],
    /// The subscription's text without its option (`socket::identity`).
    pub socket: &'a [u8],
    pub index: usize,
    pub told: Told,
}

/// A packet as it arrives: its fields, in order.
pub trait Fields<'a> {
    /// None: no such field (malformed, or the end).
    fn str(&mut self) -> Option<&'a [u8]>;
    fn int(&mut self) -> Option<i32>;
    /// Whether every field has been read.
    fn at_end(&mut self) -> bool;
}

/// A packet being built; false when it cannot take a field.
pub trait Builder {
    fn str(&mut self, s: &[u8]) -> bool;
    fn int(&mut self, n: i32) -> bool;
}

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Of a protocol version this node does not speak.
    Version(i16),
    Type(i32),
    /// The field it lacks or has wrong.
    Malformed(&'static str),
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dropped::Version(v) => write!(f, "protocol version {v}, not {VERSION}"),
            Dropped::Type(t) => write!(f, "unknown packet type {t}"),
            Dropped::Malformed(what) => write!(f, "malformed ({what})"),
        }
    }
}

impl Health<'_> {
    /// Write the packet's fields; false when the builder refused one.
    pub fn encode(&self, b: &mut impl Builder) -> bool {
        let (state, age) = match self.told {
            Told::Healthy => (0, 0),
            Told::Failing { age_ms } => (1, i32::try_from(age_ms).unwrap_or(i32::MAX)),
        };
        b.str(self.event)
            && b.str(self.socket)
            && b.int(self.index as i32)
            && b.int(state)
            && b.int(age)
    }
}

/// Read a packet of this `version` and `kind` (its bin header's).
pub fn decode<'a>(version: i16, kind: i32, f: &mut impl Fields<'a>) -> Result<Health<'a>, Dropped> {
    if version != VERSION {
        return Err(Dropped::Version(version));
    }
    if kind != HEALTH {
        return Err(Dropped::Type(kind));
    }
    let bad = Dropped::Malformed;
    let event = f.str().filter(|e| !e.is_empty()).ok_or(bad("event"))?;
    let socket = f.str().filter(|s| !s.is_empty()).ok_or(bad("socket"))?;
    let index = f
        .int()
        .and_then(|i| usize::try_from(i).ok())
        .filter(|&i| i < MAX_SUBSCRIBERS)
        .ok_or(bad("index"))?;
    let told = match (f.int(), f.int()) {
        (Some(0), Some(0)) => Told::Healthy,
        (Some(1), Some(age)) if age >= 0 => Told::Failing { age_ms: age as u64 },
        _ => return Err(bad("state")),
    };
    if !f.at_end() {
        return Err(bad("trailing fields"));
    }
    Ok(Health {
        event,
        socket,
        index,
        told,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet's fields, as the bin protocol would carry them.
    #[derive(Clone, Debug, PartialEq)]
    enum Field {
        Str(Vec<u8>),
        Int(i32),
    }

    impl Builder for Vec<Field> {
        fn str(&mut self, s: &[u8]) -> bool {
            self.push(Field::Str(s.to_vec()));
            true
        }
        fn int(&mut self, n: i32) -> bool {
            self.push(Field::Int(n));
            true
        }
    }

    /// Reads fields in order; a field of the other kind is no field.
    struct Reader<'a>(&'a [Field]);

    impl<'a> Fields<'a> for Reader<'a> {
        fn str(&mut self) -> Option<&'a [u8]> {
            let (first, rest) = self.0.split_first()?;
            self.0 = rest;
            match first {
                Field::Str(s) => Some(s),
                Field::Int(_) => None,
            }
        }
        fn int(&mut self) -> Option<i32> {
            let (first, rest) = self.0.split_first()?;
            self.0 = rest;
            match first {
                Field::Int(n) => Some(*n),
                Field::Str(_) => None,
            }
        }
        fn at_end(&mut self) -> bool {
            self.0.is_empty()
        }
    }

    type Read = Result<(Vec<u8>, Vec<u8>, usize, Told), Dropped>;

    fn read_as(v: i16, t: i32, p: &[Field]) -> Read {
        let h = decode(v, t, &mut Reader(p))?;
        Ok((h.event.to_vec(), h.socket.to_vec(), h.index, h.told))
    }

    fn read(p: &[Field]) -> Read {
        read_as(VERSION, HEALTH, p)
    }

    fn s(b: &str) -> Field {
        Field::Str(b.as_bytes().to_vec())
    }

    #[test]
    fn a_health_packet_reads_back_as_written() {
        for told in [Told::Healthy, Told::Failing { age_ms: 1234 }] {
            let h = Health {
                event: b"E_X",
                socket: b"FAILOVER udp:a:1 udp:b:2",
                index: 1,
                told,
            };
            let mut p = Vec::new();
            assert!(h.encode(&mut p));
            let got = read(&p).unwrap();
            assert_eq!(got, (h.event.to_vec(), h.socket.to_vec(), 1, told));
        }
    }

    #[test]
    fn an_age_too_long_for_the_wire_is_capped() {
        let h = Health {
            event: b"E",
            socket: b"FAILOVER u:x",
            index: 0,
            told: Told::Failing { age_ms: u64::MAX },
        };
        let mut p = Vec::new();
        assert!(h.encode(&mut p));
        let age = i32::MAX as u64;
        assert_eq!(read(&p).unwrap().3, Told::Failing { age_ms: age });
    }

    #[test]
    fn other_versions_and_types_are_dropped() {
        let ok = [
            s("E"),
            s("S u:x"),
            Field::Int(0),
            Field::Int(0),
            Field::Int(0),
        ];
        assert!(read(&ok).is_ok());
        assert_eq!(read_as(2, HEALTH, &ok), Err(Dropped::Version(2)));
        assert_eq!(read_as(VERSION, 7, &ok), Err(Dropped::Type(7)));
    }

    #[test]
    fn malformed_packets_are_dropped_with_the_reason() {
        use Field::Int;
        let m = Dropped::Malformed;
        let cases: Vec<(Vec<Field>, Dropped)> = vec![
            (vec![], m("event")),
            (vec![Int(1)], m("event")),
            (vec![s("")], m("event")),
            (vec![s("E")], m("socket")),
            (vec![s("E"), s("")], m("socket")),
            (vec![s("E"), s("S"), s("1")], m("index")),
            (vec![s("E"), s("S"), Int(-1)], m("index")),
            (
                vec![s("E"), s("S"), Int(MAX_SUBSCRIBERS as i32)],
                m("index"),
            ),
            (vec![s("E"), s("S"), Int(0)], m("state")),
            (vec![s("E"), s("S"), Int(0), Int(2), Int(0)], m("state")),
            (vec![s("E"), s("S"), Int(0), Int(1), Int(-5)], m("state")),
            (vec![s("E"), s("S"), Int(0), Int(0), Int(9)], m("state")),
            (vec![s("E"), s("S"), Int(0), Int(1)], m("state")),
            (
                vec![s("E"), s("S"), Int(0), Int(0), Int(0), Int(0)],
                m("trailing fields"),
            ),
        ];
        for (fs, why) in cases {
            assert_eq!(read(&fs), Err(why), "{fs:?}");
        }
    }
}
