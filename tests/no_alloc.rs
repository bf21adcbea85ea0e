//! The synchronous raise path allocates nothing: every policy's delivery,
//! over subscribers that succeed and that fail, is run under an allocator
//! that counts, and must not call it.  (`src/module/deliver.rs` adds only a
//! reference on the socket, the statistics and the calls into the
//! transports around this; its `log!` formats text only for a line that is
//! printed: a lost event, a health change, or at DBG, and formats it on
//! the stack, as the failure path's test below does.  A health change, or
//! a HASH event's missing key, is also recorded for the status event into
//! a fixed ring in shared memory: a reference, a few words, no allocation.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use event_virtual::opensips::line::format_into;
use event_virtual::policy::{
    Attempt, Driver, Health, Progress, Rotation, Rules, Transition, deliver, int_text, seeds,
};
use event_virtual::socket::Policy;
use event_virtual::spool::{Budget, Enter, Fifo, Held, Limits, Meta, Queue};
use event_virtual::text::{Quoted, quote};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

struct Sub(Health);

impl AsRef<Health> for Sub {
    fn as_ref(&self) -> &Health {
        &self.0
    }
}

/// Subscribers up or down by a fixed pattern; nothing stored per attempt.
struct Pattern<'a> {
    up: &'a [bool],
    transitions: u32,
}

impl Driver for Pattern<'_> {
    fn attempt(&mut self, i: usize, _: &event_virtual::policy::Walk) -> Attempt {
        if self.up[i] {
            Attempt::Taken
        } else {
            Attempt::Failed
        }
    }
    fn transition(&mut self, _: usize, _: Transition) {
        self.transitions += 1;
    }
}

#[test]
fn delivering_allocates_nothing() {
    // seeded as a HASH socket's are (the other policies ignore the seeds)
    let tokens: Vec<String> = (0..8)
        .map(|i| format!("udp:127.0.0.1:{}", 9000 + i % 5))
        .collect();
    let tokens: Vec<&[u8]> = tokens.iter().map(|t| t.as_bytes()).collect();
    let subs: Vec<Sub> = seeds(&tokens)
        .into_iter()
        .map(|s| Sub(Health::seeded(s)))
        .collect();
    let rotation = Rotation::default();
    let patterns: [&[bool]; 3] = [
        &[true; 8],
        &[false, true, false, true, true, true, true, true],
        &[false; 8],
    ];
    for rules in [Rules { window_ms: 1000 }, Rules { window_ms: 0 }] {
        for policy in Policy::ALL {
            for up in patterns {
                let mut driver = Pattern { up, transitions: 0 };
                let before = allocations();
                let mut buf = [0u8; 11];
                for now in 0..1000u64 {
                    // HASH: keyed by an integer's text, by a string, and
                    // an event without the parameter
                    let value = match now % 3 {
                        0 => Some(int_text(now as i32 - 500, &mut buf)),
                        1 => Some(&b"call-1@example.com"[..]),
                        _ => None,
                    };
                    let progress =
                        deliver(policy, &rotation, value, &subs, rules, now * 7, &mut driver);
                    assert!(matches!(progress, Progress::Done(_)));
                }
                assert_eq!(
                    allocations() - before,
                    0,
                    "{policy:?} over {up:?} allocated"
                );
            }
        }
    }
}

#[test]
fn a_failure_log_line_allocates_nothing() {
    // the lines a failing subscriber and a lost event log, as `log!` writes
    // them: `Quoted` operator input formatted into a buffer on the stack
    let token = b"unix:/run/nobody\xff.sock";
    let text = [&b"ROUND-ROBIN udp:127.0.0.1:9 "[..], &[b'x'; 200]].concat();
    let (mut a, mut b) = ([0; 2048], [0; 2048]);
    let before = allocations();
    let (sub, text) = (Quoted(token), Quoted(&text));
    let failing = format_into(
        &mut a,
        format_args!("subscriber '{sub}' of 'virtual:{text}' is failing"),
    );
    let event = Quoted(b"E_\x01X");
    let lost = format_into(
        &mut b,
        format_args!("event '{event}' was not delivered by 'virtual:{text}'"),
    );
    // and one too long for its buffer, cut
    let cut = format_into(&mut [0; 64], format_args!("{lost:?} {text}")).ends_with(b"...");
    assert_eq!(
        allocations() - before,
        0,
        "formatting a failure line allocated"
    );
    assert!(cut);
    // the text is what quoting into a String gives
    let text = quote(text.0);
    let expected = format!(
        "subscriber '{}' of 'virtual:{text}' is failing",
        quote(token)
    );
    assert_eq!(failing, expected.as_bytes());
    assert!(expected.contains("nobody\\xff.sock") && expected.ends_with("xxx...' is failing"));
    let expected = format!("event 'E_\\x01X' was not delivered by 'virtual:{text}'");
    assert_eq!(lost, expected.as_bytes());
}

#[test]
fn the_counter_sees_allocations() {
    // the check above could not fail if the counter missed them
    let before = allocations();
    let v = std::hint::black_box(vec![1u8; 16]);
    drop(v);
    assert!(allocations() > before);
}

/// The module's held events and their FIFO, faked without allocating: a
/// ring of up to 16 ids.
#[derive(Clone, Copy, Default)]
struct Ev(u64);

impl Held for Ev {
    type Event = Ev;
    fn event(&self) -> Ev {
        *self
    }
    fn meta(&self) -> Meta {
        Meta {
            bytes: 100,
            born_ms: self.0,
        }
    }
}

#[derive(Default)]
struct Ring {
    at: [Ev; 16],
    first: usize,
    len: usize,
}

impl Fifo for Ring {
    type Item = Ev;
    fn push_back(&mut self, e: Ev) {
        self.at[(self.first + self.len) % 16] = e;
        self.len += 1;
    }
    fn get(&self, i: usize) -> Option<&Ev> {
        (i < self.len).then(|| &self.at[(self.first + i) % 16])
    }
    fn remove(&mut self, i: usize) -> Option<Ev> {
        if i >= self.len {
            return None;
        }
        let e = self.at[(self.first + i) % 16];
        if i == 1 {
            self.at[(self.first + 1) % 16] = self.at[self.first % 16];
        }
        self.first += 1;
        self.len -= 1;
        Some(e)
    }
    fn len(&self) -> usize {
        self.len
    }
}

#[test]
fn the_spool_allocates_nothing() {
    let budget = Budget::new(2000);
    let q: Queue<Ring> = Queue::new(Limits {
        capacity: 10,
        max_age_ms: 50,
        retry_ms: 1000,
    });
    let before = allocations();
    // the raise path with the queue empty: one load
    assert_eq!(q.held(), 0);
    // filling past the capacity, the age and the budget, leasing,
    // retrying, delivering: the operations done under the queue's lock
    let mut freed = 0;
    for i in 1..=60u64 {
        let p = q.push(Ev(i), Enter::Failed, &budget, i);
        freed += p.evicted.len();
        if i % 7 == 0 {
            let b = q.begin(&budget, i);
            freed += b.expired.len();
            if let Some(l) = b.lease {
                let ok = i % 2 == 0;
                let _ = q.finish(l.token, ok, &budget, i);
            }
        }
    }
    let _ = q.view(61);
    freed += q.close(&budget, 62).evicted.len();
    assert_eq!(allocations() - before, 0, "the spool allocated");
    assert!(freed > 0);
}

#[test]
fn a_durable_record_allocates_nothing() {
    // restart persistency (issue 17): writing a held event's record, its
    // commit, lease and free touch only the region's words
    use event_virtual::spool::durable::{Key, Len, Region, Value, encode};
    use std::sync::atomic::AtomicU64;
    let words: Vec<AtomicU64> = (0..8192).map(|_| AtomicU64::new(0)).collect();
    let region = Region::format(&words, 7);
    let key = Key {
        event: b"E_ACC_CDR",
        text: [b"FAILOVER", b" unix:/run/a unix:/run/b"],
        queue: 0,
    };
    let value = [b'v'; 300];
    let params = || {
        [
            (&b"callid"[..], Value::Str(&value)),
            (&b"n"[..], Value::Int(1)),
        ]
        .into_iter()
    };
    let mut cursor = 0;
    let before = allocations();
    for born in 0..1000 {
        let mut len = Len::default();
        encode(&mut len, &key, born, params());
        let slot = region.reserve(&mut cursor, len.0).expect("room");
        region.write(slot, len.0, |w| encode(w, &key, born, params()));
        region.commit(slot);
        region.lease(slot, true);
        region.lease(slot, false);
        region.free(slot);
    }
    assert_eq!(allocations() - before, 0, "a durable record allocated");
}
