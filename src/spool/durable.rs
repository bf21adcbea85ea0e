//! Held events that outlive the server (issue 17): records in a region of
//! OpenSIPS's restart-persistent memory, a file mapped at a fixed address
//! that the page cache keeps across a crash of every process.
//!
//! The region is seen as 64-bit words, every one touched through an
//! atomic: another process may die halfway through a record, and what it
//! left is read again at the next start, so nothing here trusts a word it
//! did not check.  Nothing in it is a pointer.
//!
//! ```text
//! [ header: 8 words | bitmap: 1 bit a slot | slots: SLOT_WORDS words each ]
//! record = [ state | slots << 32 ][ seq ][ len ][ sum ][ payload, len bytes ]
//! ```
//!
//! A record takes a run of slots.  It is written `WRITING`, then its
//! payload, length and sum; it becomes `COMMITTED` (with its sequence
//! number) in the queue's critical section, so the numbers are the queue's
//! order; `LEASED` while an attempt may be delivering it; `FREE` once it
//! leaves the queue.  At a start only `COMMITTED` records whose sum holds
//! are kept: a `WRITING` one was torn by a crash, a `LEASED` one may have
//! been delivered (at most once), a wrong sum is corruption.  The sum is
//! keyed with a secret of the region, so that event bytes in a record's
//! payload, where an older record's head once was, never pass for one.
//! The bitmap says which slots are taken; it is rebuilt at every start.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

/// `EVVSPOOL`, little-endian, the first word.
pub const MAGIC: u64 = u64::from_le_bytes(*b"EVVSPOOL");
/// The layout's version, the second word: a region of another is dropped.
pub const VERSION: u64 = 1;
/// Words in a slot (128 bytes).
pub const SLOT_WORDS: usize = 16;
const HEADER: usize = 8;
const HEAD: usize = 4;
// the header's words
const W_MAGIC: usize = 0;
const W_VERSION: usize = 1;
const W_WORDS: usize = 2;
const W_SECRET: usize = 3;
const W_SEQ: usize = 4;

const FREE: u64 = 0;
const WRITING: u64 = 1;
const COMMITTED: u64 = 2;
const LEASED: u64 = 3;

/// A region laid over `words`.
pub struct Region<'a> {
    w: &'a [AtomicU64],
    slots: usize,
    base: usize,
}

/// What a start found in a region.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// The whole records, as (slot, sequence number), oldest first.
    pub records: Vec<(u32, u64)>,
    /// Torn by a crash while being written.
    pub torn: u64,
    /// Being attempted at the stop: perhaps delivered, so dropped.
    pub in_doubt: u64,
    /// Whose sum does not hold.
    pub corrupt: u64,
}

fn mix(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^ (h >> 29)
}

impl<'a> Region<'a> {
    fn lay(w: &'a [AtomicU64]) -> Region<'a> {
        // the most slots whose bitmap and slots fit after the header
        let room = w.len().saturating_sub(HEADER);
        let mut slots = room * 64 / (64 * SLOT_WORDS + 1);
        while slots > 0 && slots.div_ceil(64) + slots * SLOT_WORDS > room {
            slots -= 1;
        }
        Region {
            w,
            slots,
            base: HEADER + slots.div_ceil(64),
        }
    }

    /// A new, empty region over `w`.
    pub fn format(w: &'a [AtomicU64], secret: u64) -> Region<'a> {
        for x in w {
            x.store(0, Relaxed);
        }
        let r = Region::lay(w);
        if w.len() >= HEADER {
            w[W_VERSION].store(VERSION, Relaxed);
            w[W_WORDS].store(w.len() as u64, Relaxed);
            w[W_SECRET].store(secret, Relaxed);
            w[W_MAGIC].store(MAGIC, Release);
        }
        r
    }

    /// The region a previous run left in `w`, its whole records kept and
    /// the rest freed.  No process may use it meanwhile.
    /// Err says why it is not one: what its header says.
    pub fn open(w: &'a [AtomicU64]) -> Result<(Region<'a>, Found), String> {
        let word = |i: usize| w.get(i).map_or(0, |x| x.load(Acquire));
        match [word(W_MAGIC), word(W_VERSION), word(W_WORDS)] {
            [MAGIC, VERSION, n] if n == w.len() as u64 => {}
            [MAGIC, VERSION, n] => return Err(format!("its header says {n} words")),
            [MAGIC, v, _] => return Err(format!("it has layout version {v}, not {VERSION}")),
            _ => return Err("it is not one of this module's".into()),
        }
        let r = Region::lay(w);
        for x in &w[HEADER..r.base] {
            x.store(0, Relaxed);
        }
        let mut found = Found::default();
        let mut last_seq = 0;
        let mut i = 0;
        while i < r.slots {
            let head = r.word(i, 0);
            let (state, k) = (head & 0xffff_ffff, (head >> 32) as usize);
            let fits = (1..=r.slots - i).contains(&k);
            let whole = fits && r.sum_holds(i, k);
            match state {
                FREE => {
                    i += 1;
                    continue;
                }
                COMMITTED if whole => {
                    r.mark(i, k, true);
                    let seq = r.word(i, 1);
                    last_seq = last_seq.max(seq);
                    found.records.push((i as u32, seq));
                    i += k;
                    continue;
                }
                LEASED if whole => found.in_doubt += 1,
                WRITING => found.torn += 1,
                _ => found.corrupt += 1,
            }
            let k = if fits { k } else { 1 };
            r.clear(i, k);
            i += k;
        }
        found.records.sort_by_key(|&(_, seq)| seq);
        let seq = &w[W_SEQ];
        seq.store(seq.load(Relaxed).max(last_seq), Relaxed);
        Ok((r, found))
    }

    /// The number of slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    fn word(&self, slot: usize, at: usize) -> u64 {
        self.w[self.base + slot * SLOT_WORDS + at].load(Acquire)
    }

    fn set_word(&self, slot: usize, at: usize, v: u64) {
        self.w[self.base + slot * SLOT_WORDS + at].store(v, Release)
    }

    fn taken(&self, slot: usize) -> bool {
        self.w[HEADER + slot / 64].load(Relaxed) >> (slot % 64) & 1 == 1
    }

    fn mark(&self, slot: usize, k: usize, taken: bool) {
        for s in slot..slot + k {
            let (word, bit) = (&self.w[HEADER + s / 64], 1u64 << (s % 64));
            if taken {
                word.fetch_or(bit, Relaxed);
            } else {
                word.fetch_and(!bit, Relaxed);
            }
        }
    }

    fn sum(&self, slot: usize, len: u64) -> u64 {
        let start = self.base + slot * SLOT_WORDS + HEAD;
        let words = &self.w[start..start + (len as usize).div_ceil(8)];
        let h = mix(mix(self.w[W_SECRET].load(Relaxed), slot as u64), len);
        words.iter().fold(h, |h, x| mix(h, x.load(Relaxed)))
    }

    fn sum_holds(&self, slot: usize, k: usize) -> bool {
        let len = self.word(slot, 2);
        len <= ((k * SLOT_WORDS - HEAD) * 8) as u64 && self.sum(slot, len) == self.word(slot, 3)
    }

    /// Slots a payload of `len` bytes takes.
    pub fn slots_for(len: usize) -> usize {
        (HEAD + len.div_ceil(8)).div_ceil(SLOT_WORDS)
    }

    /// Take a run of slots for a payload of `len` bytes, `WRITING` until
    /// [`Region::commit`].  `cursor` (under the caller's lock, which
    /// serialises reservations) is where the search starts: next fit.
    /// None when no run is free.
    pub fn reserve(&self, cursor: &mut u32, len: usize) -> Option<u32> {
        let k = Region::slots_for(len);
        let slot = self.find(*cursor as usize, k)?;
        self.mark(slot, k, true);
        *cursor = (slot + k) as u32;
        self.set_word(slot, 0, WRITING | (k as u64) << 32);
        Some(slot as u32)
    }

    /// Write a reserved record's payload with `fill`, which puts exactly
    /// `len` bytes (the length it was reserved for).
    pub fn write(&self, slot: u32, len: usize, fill: impl FnOnce(&mut Writer<'_>)) {
        let slot = slot as usize;
        let start = self.base + slot * SLOT_WORDS + HEAD;
        let mut out = Writer {
            w: &self.w[start..start + len.div_ceil(8)],
            at: 0,
            acc: 0,
            n: 0,
        };
        fill(&mut out);
        out.flush();
        self.set_word(slot, 2, len as u64);
        self.set_word(slot, 3, self.sum(slot, len as u64));
    }

    fn find(&self, from: usize, k: usize) -> Option<usize> {
        let run_in = |lo: usize, hi: usize| {
            let (mut i, mut run) = (lo, 0);
            while i < hi {
                if i % 64 == 0 && self.w[HEADER + i / 64].load(Relaxed) == u64::MAX {
                    (i, run) = (i + 64, 0);
                    continue;
                }
                run = if self.taken(i) { 0 } else { run + 1 };
                i += 1;
                if run == k {
                    return Some(i - k);
                }
            }
            None
        };
        let from = if from >= self.slots { 0 } else { from };
        run_in(from, self.slots).or_else(|| run_in(0, (from + k).min(self.slots)))
    }

    /// The record enters its queue: it gets the next sequence number and is
    /// kept from now on.  One a start found keeps its number, so that a
    /// crash in the middle of putting a queue back leaves its order as it
    /// was.
    pub fn commit(&self, slot: u32) {
        let (slot, head) = (slot as usize, self.word(slot as usize, 0));
        let k = head >> 32;
        if head & 0xffff_ffff == COMMITTED {
            return;
        }
        let seq = self.w[W_SEQ].fetch_add(1, Relaxed) + 1;
        self.set_word(slot, 1, seq);
        self.set_word(slot, 0, COMMITTED | k << 32);
    }

    /// An attempt may deliver it (`true`), or has failed (`false`).
    pub fn lease(&self, slot: u32, leased: bool) {
        let k = self.word(slot as usize, 0) >> 32;
        let state = if leased { LEASED } else { COMMITTED };
        self.set_word(slot as usize, 0, state | k << 32);
    }

    /// The record leaves for good; its slots are free (under the caller's
    /// lock, with the bitmap).
    pub fn free(&self, slot: u32) {
        let slot = slot as usize;
        let k = ((self.word(slot, 0) >> 32) as usize).min(self.slots - slot);
        self.clear(slot, k);
        self.mark(slot, k, false);
    }

    /// Every slot of a run starts with FREE (the head first), so that a
    /// start's scan of free slots finds nothing but FREE.
    fn clear(&self, slot: usize, k: usize) {
        for s in slot..slot + k {
            self.set_word(s, 0, FREE);
        }
    }

    /// A record's payload.
    pub fn payload(&self, slot: u32) -> Vec<u8> {
        let slot = slot as usize;
        let len = self.word(slot, 2) as usize;
        let start = self.base + slot * SLOT_WORDS + HEAD;
        let words = &self.w[start..start + len.div_ceil(8)];
        let mut out: Vec<u8> = words
            .iter()
            .flat_map(|x| x.load(Relaxed).to_le_bytes())
            .collect();
        out.truncate(len);
        out
    }
}

/// Puts bytes into a record's payload words.
pub struct Writer<'a> {
    w: &'a [AtomicU64],
    at: usize,
    acc: u64,
    n: usize,
}

impl Writer<'_> {
    fn flush(&mut self) {
        if self.n > 0 {
            if let Some(x) = self.w.get(self.at) {
                x.store(self.acc, Relaxed);
            }
            (self.at, self.acc, self.n) = (self.at + 1, 0, 0);
        }
    }
}

impl Sink for Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.acc |= (b as u64) << (8 * self.n);
            self.n += 1;
            if self.n == 8 {
                self.flush();
            }
        }
    }
}

/// Where an encoded record goes.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

/// Counts what would be put.
#[derive(Default)]
pub struct Len(pub usize);

impl Sink for Len {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

/// An event parameter's value, as a record keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Int(i32),
    Str(&'a [u8]),
}

/// Which queue a record belongs to, after a restart: the event, the
/// subscription's text without its option (`socket::identity`), the
/// queue's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key<'a> {
    pub event: &'a [u8],
    pub text: [&'a [u8]; 2],
    pub queue: u16,
}

/// A record's payload: the key, when the event was raised (wall clock,
/// ms), and the event's parameters.
///
/// ```text
/// queue u16 | born u64 | event, text: u32 length + bytes | (kind u8 | name | i32, or a string)*
/// ```
pub fn encode<'v>(
    out: &mut impl Sink,
    key: &Key<'_>,
    born_ms: u64,
    params: impl Iterator<Item = (&'v [u8], Value<'v>)>,
) {
    out.put(&key.queue.to_le_bytes());
    out.put(&born_ms.to_le_bytes());
    bytes(out, &[key.event]);
    bytes(out, &key.text);
    for (name, value) in params {
        match value {
            Value::Int(n) => {
                out.put(&[1]);
                bytes(out, &[name]);
                out.put(&n.to_le_bytes());
            }
            Value::Str(s) => {
                out.put(&[2]);
                bytes(out, &[name]);
                bytes(out, &[s]);
            }
        }
    }
}

/// A length (u32) and the bytes of `parts`, one after the other.
fn bytes(out: &mut impl Sink, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.put(&(len as u32).to_le_bytes());
    parts.iter().for_each(|p| out.put(p));
}

/// A decoded payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub event: &'a [u8],
    pub text: &'a [u8],
    pub queue: u16,
    pub born_ms: u64,
    pub params: Vec<(&'a [u8], Value<'a>)>,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = u32::from_le_bytes(self.array()?);
        self.take(n as usize)
    }
}

/// None: not what [`encode`] writes.
pub fn decode(payload: &[u8]) -> Option<Decoded<'_>> {
    let mut r = Reader(payload);
    let queue = u16::from_le_bytes(r.array()?);
    let born_ms = u64::from_le_bytes(r.array()?);
    let event = r.bytes()?;
    let text = r.bytes()?;
    let mut params = Vec::new();
    while !r.0.is_empty() {
        let [kind] = r.array()?;
        let name = r.bytes()?;
        let value = match kind {
            1 => Value::Int(i32::from_le_bytes(r.array()?)),
            2 => Value::Str(r.bytes()?),
            _ => return None,
        };
        params.push((name, value));
    }
    Some(Decoded {
        event,
        text,
        queue,
        born_ms,
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    const KEY: Key<'static> = Key {
        event: b"E_TEST",
        text: [b"FAILOVER", b" unix:/a unix:/b"],
        queue: 0,
    };

    fn record(r: &Region<'_>, cursor: &mut u32, n: i32, pad: usize) -> Option<u32> {
        let big = vec![b'x'; pad];
        let params = || [(&b"n"[..], Value::Int(n)), (&b"s"[..], Value::Str(&big))].into_iter();
        let mut len = Len::default();
        encode(&mut len, &KEY, 7, params());
        let slot = r.reserve(cursor, len.0)?;
        r.write(slot, len.0, |w| encode(w, &KEY, 7, params()));
        Some(slot)
    }

    fn n_of(r: &Region<'_>, slot: u32) -> i32 {
        let p = r.payload(slot);
        match decode(&p).unwrap().params[0] {
            (b"n", Value::Int(n)) => n,
            _ => panic!("no n"),
        }
    }

    #[test]
    fn a_payload_round_trips() {
        let mut len = Len::default();
        let params = [(&b"a"[..], Value::Int(-5)), (&b""[..], Value::Str(b"v w"))];
        encode(&mut len, &KEY, 99, params.into_iter());
        let mut out = Vec::new();
        struct V<'a>(&'a mut Vec<u8>);
        impl Sink for V<'_> {
            fn put(&mut self, b: &[u8]) {
                self.0.extend_from_slice(b)
            }
        }
        encode(&mut V(&mut out), &KEY, 99, params.into_iter());
        assert_eq!(out.len(), len.0);
        let d = decode(&out).unwrap();
        assert_eq!(d.event, b"E_TEST");
        assert_eq!(d.text, b"FAILOVER unix:/a unix:/b");
        assert_eq!((d.queue, d.born_ms), (0, 99));
        assert_eq!(d.params, params.to_vec());
        // every cut is refused, never a panic
        for cut in 0..out.len() {
            let d = decode(&out[..cut]);
            assert!(d.is_none_or(|d| d.params.len() < 2), "cut {cut}");
        }
    }

    #[test]
    fn committed_records_survive_a_reopen_in_order() {
        let w = words(4096);
        let r = Region::format(&w, 42);
        let mut cursor = 0;
        let slots: Vec<u32> = (0..5)
            .map(|n| record(&r, &mut cursor, n, 300).unwrap())
            .collect();
        // they enter their queue in another order than they were written
        for &s in [&slots[2], &slots[0], &slots[1], &slots[4]] {
            r.commit(s);
        }
        r.free(slots[1]);
        // slots[3] was being written (never committed)
        let (r, found) = Region::open(&w).unwrap();
        let order: Vec<i32> = found.records.iter().map(|&(s, _)| n_of(&r, s)).collect();
        assert_eq!(order, [2, 0, 4]);
        assert_eq!((found.torn, found.in_doubt, found.corrupt), (1, 0, 0));
        // the torn record's slots are free again, the kept ones are not
        let mut cursor = 0;
        let again: Vec<u32> = (0..3)
            .map(|n| record(&r, &mut cursor, n, 300).unwrap())
            .collect();
        for s in again {
            assert!(!found.records.iter().any(|&(k, _)| k == s));
        }
    }

    #[test]
    fn a_found_record_keeps_its_number() {
        let w = words(4096);
        let r = Region::format(&w, 42);
        let mut cursor = 0;
        let old: Vec<u32> = (0..3)
            .map(|n| record(&r, &mut cursor, n, 10).unwrap())
            .collect();
        old.iter().for_each(|&s| r.commit(s));
        let (r, found) = Region::open(&w).unwrap();
        // the first is put back into its queue, a new event follows, and
        // the server dies before the other two are put back
        r.commit(found.records[0].0);
        let new = record(&r, &mut cursor, 9, 10).unwrap();
        r.commit(new);
        let (r, found) = Region::open(&w).unwrap();
        let order: Vec<i32> = found.records.iter().map(|&(s, _)| n_of(&r, s)).collect();
        assert_eq!(order, [0, 1, 2, 9]);
    }

    #[test]
    fn a_leased_record_is_dropped_a_corrupt_one_counted() {
        let w = words(2048);
        let r = Region::format(&w, 1);
        let mut cursor = 0;
        let a = record(&r, &mut cursor, 1, 10).unwrap();
        let b = record(&r, &mut cursor, 2, 10).unwrap();
        let c = record(&r, &mut cursor, 3, 10).unwrap();
        for s in [a, b, c] {
            r.commit(s);
        }
        r.lease(a, true);
        r.lease(c, true);
        r.lease(c, false);
        // a flipped payload byte
        let at = r.base + b as usize * SLOT_WORDS + HEAD + 1;
        w[at].fetch_xor(1 << 9, Relaxed);
        let (r, found) = Region::open(&w).unwrap();
        assert_eq!((found.in_doubt, found.corrupt), (1, 1));
        assert_eq!(found.records.len(), 1);
        assert_eq!(n_of(&r, found.records[0].0), 3);
    }

    #[test]
    fn another_layout_is_refused() {
        let w = words(1024);
        Region::format(&w, 1);
        w[W_VERSION].store(2, Relaxed);
        let why = Region::open(&w).err();
        assert_eq!(why.as_deref(), Some("it has layout version 2, not 1"));
        w[W_MAGIC].store(3, Relaxed);
        assert!(Region::open(&w).is_err());
        let rnd = words(1024);
        for (i, x) in rnd.iter().enumerate() {
            x.store((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15), Relaxed);
        }
        assert!(Region::open(&rnd).is_err());
        // a header of the right magic over random slots: nothing passes
        rnd[W_MAGIC].store(MAGIC, Relaxed);
        rnd[W_VERSION].store(VERSION, Relaxed);
        rnd[W_WORDS].store(1024, Relaxed);
        let (_, found) = Region::open(&rnd).unwrap();
        assert!(found.records.is_empty());
    }

    #[test]
    fn a_full_region_refuses_then_takes_again() {
        let w = words(HEADER + 1 + 8 * SLOT_WORDS);
        let r = Region::format(&w, 5);
        assert_eq!(r.slots(), 8);
        let mut cursor = 0;
        let taken: Vec<u32> = std::iter::from_fn(|| record(&r, &mut cursor, 0, 100)).collect();
        assert_eq!(taken.len(), 4); // 2 slots each
        assert!(record(&r, &mut cursor, 0, 10).is_none());
        r.free(taken[1]);
        // next fit wraps around to the freed run
        assert_eq!(record(&r, &mut cursor, 0, 100), Some(taken[1]));
        assert!(record(&r, &mut cursor, 0, 2000).is_none());
    }
}
