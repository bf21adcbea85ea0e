//! The spool in the module (issue 10): the module-wide block, holding an
//! event in a socket's queue, settling a replayed lease, closing the queues
//! of a subscription that goes, and the replay process.  The decisions are
//! the pure core's (`crate::spool`); this is where its handles become shm
//! blocks, statistics and log lines.

#![forbid(unsafe_code)]

use std::sync::OnceLock;

use super::exports::{self, DELIVERED, DROPPED, REPLAYED, SPOOLED, TRANSPORT};
use super::raise::CoreDriver;
use super::vsock::SockRef;
use crate::opensips::event::{DummyMsg, Event, Msg};
use crate::opensips::log::log;
use crate::opensips::now_ms;
use crate::opensips::spool::{self as held, HeldNodes, futex_wait, futex_wake};
use crate::policy::{self, Progress};
use crate::socket::{self, Policy};
use crate::spool::replay::{self, Attempted, Replayer};
use crate::spool::wake::{self, IDLE_MS, sleep_ms};
use crate::spool::{
    Budget, Config, Doorbell, Enter, Entry, Finish, Handle, Lease, Limits, Queue, Reason, Report,
    Run, SpoolOption,
};

/// What every process shares: the budget, the doorbell of the replay
/// process, the checked modparams.  One shm block, made in mod_init.
pub struct Shared {
    pub budget: Budget,
    pub doorbell: Doorbell,
    pub config: Config,
}

static SHARED: OnceLock<&'static Shared> = OnceLock::new();

/// mod_init: check the modparams and make the shared block.
pub fn init(params: crate::spool::ModParams) -> Result<(), String> {
    let config = params.check(held::shm_total())?;
    let shared = held::leak(Shared {
        budget: Budget::new(config.budget_bytes),
        doorbell: Doorbell::default(),
        config,
    })
    .ok_or("out of shared memory for the spool")?;
    let _ = SHARED.set(shared);
    Ok(())
}

pub fn shared() -> Option<&'static Shared> {
    SHARED.get().copied()
}

/// A new socket's queue bounds; None: no spool.
pub fn limits(option: Option<SpoolOption>) -> Option<Limits> {
    shared()?.config.limits(option)
}

/// Wake the replay process.
pub fn ring() {
    if let Some(sh) = shared() {
        sh.doorbell.ring();
        futex_wake(sh.doorbell.word());
    }
}

fn add(stat: &crate::opensips::module::Stat, n: u64) {
    stat.add(u32::try_from(n).unwrap_or(u32::MAX));
}

fn free_run(run: Run) {
    let mut freed = Vec::new();
    run.drain(&HeldNodes, |h| freed.push(h));
    freed.into_iter().for_each(held::free);
}

fn name(sock: &SockRef) -> String {
    format!("virtual:{}", socket::quote(sock.text()))
}

/// What became of an event offered to a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Held: the replay process delivers it.
    Held,
    /// Behind an emptied queue: deliver it live.
    Empty,
    /// Lost, and counted (dropped, or out of memory).
    Lost,
}

/// Offer `event` to queue `qi` of `sock`.
pub fn push(sock: &SockRef, qi: usize, event: &Event<'_>, enter: Enter) -> Pushed {
    let (Some(sh), Some(queue)) = (shared(), sock.queues().get(qi)) else {
        return Pushed::Lost;
    };
    let now = now_ms();
    let Some(h) = held::hold(event, now) else {
        log!(
            ERR,
            "out of shared memory holding event '{}' of '{}': lost",
            socket::quote(event.name()),
            name(sock)
        );
        return Pushed::Lost;
    };
    let p = queue.push(h, enter, &HeldNodes, &sh.budget, now);
    add(&DROPPED, p.dropped());
    free_run(p.evicted);
    match p.entry {
        Entry::Queued { first } => {
            SPOOLED.add(1);
            if first {
                let who = match sock.policy {
                    Policy::Parallel => format!(
                        "subscriber '{}' of '{}'",
                        socket::quote(sock.token(&sock.subs()[qi])),
                        name(sock)
                    ),
                    _ => format!("every subscriber of '{}'", name(sock)),
                };
                log!(
                    WARN,
                    "{who} failed event '{}': holding events (up to {})",
                    socket::quote(event.name()),
                    queue.limits().capacity
                );
                ring();
            }
            Pushed::Held
        }
        Entry::Dropped(_) => {
            SPOOLED.add(1);
            held::free(h);
            Pushed::Lost
        }
        Entry::Empty => {
            held::free(h);
            Pushed::Empty
        }
    }
}

/// A lease the replay process gave an asynchronous chain: its report
/// settles it, in whatever process.
pub fn finish(sock: &SockRef, qi: usize, token: u64, delivered: bool) {
    let (Some(sh), Some(queue)) = (shared(), sock.queues().get(qi)) else {
        return;
    };
    match queue.finish(token, delivered, &HeldNodes, &sh.budget, now_ms()) {
        Finish::Delivered { free, drained } => {
            held::free(free);
            REPLAYED.add(1);
            DELIVERED.add(1);
            if drained {
                log_drained(sock);
            }
        }
        Finish::Dropped { free, .. } => {
            held::free(free);
            DROPPED.add(1);
        }
        Finish::Retry { .. } | Finish::Stale => {}
    }
    // the next head is due now, or the retry time moved
    ring();
}

fn log_drained(sock: &SockRef) {
    log!(
        NOTICE,
        "replayed the held events of '{}'; its queue is empty",
        name(sock)
    );
}

/// The subscription goes (unsubscribe, expiry): drop what its queues hold.
pub fn close(sock: &SockRef) {
    let Some(sh) = shared() else { return };
    let now = now_ms();
    let (mut dropped, mut in_flight) = (0u64, false);
    for q in sock.queues() {
        let c = q.close(Reason::Unsubscribed, &HeldNodes, &sh.budget, now);
        dropped += u64::from(c.evicted.len());
        in_flight |= c.in_flight;
        free_run(c.evicted);
        if let Some(r) = q.episodes().take(now) {
            log!(WARN, "'{}': {r}", name(sock));
        }
    }
    add(&DROPPED, dropped);
    if dropped > 0 || in_flight {
        log!(
            WARN,
            "'{}' unsubscribed with {dropped} held events: dropped{}",
            name(sock),
            if in_flight {
                "; 1 in flight, dropped or delivered when its attempt ends"
            } else {
                ""
            }
        );
    }
}

/// destroy: what was still held is lost with the server.
pub fn shutdown() {
    if let Some(sh) = shared() {
        let held = sh.budget.held();
        if held > 0 {
            add(&DROPPED, held);
            log!(WARN, "shutdown: {held} held events dropped");
        }
    }
}

/// The operator's retry (MI): queues of `event` (or all), `all` or one
/// event each; the number of queues woken.
pub fn retry(filter: Option<&[u8]>, all: bool) -> Result<u64, ()> {
    let mut socks = Vec::new();
    TRANSPORT.walk_subscriptions(filter, |_, sock, _| {
        if let Some(s) = SockRef::of(sock) {
            socks.push(s);
        }
    })?;
    let woken = socks
        .iter()
        .flat_map(|s| s.queues())
        .filter(|q| q.retry_now(all))
        .count() as u64;
    if woken > 0 {
        ring();
    }
    Ok(woken)
}

/// The replay process: rounds over the queues that hold events, sleeping
/// on the doorbell in between.  Never returns.
pub fn run() -> ! {
    let Some(sh) = shared() else {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    };
    let mut episodes_open = false;
    loop {
        let seen = sh.doorbell.value();
        if sh.budget.held() == 0 && !episodes_open {
            futex_wait(sh.doorbell.word(), seen, IDLE_MS);
            continue;
        }
        let mut socks = Vec::new();
        let _ = TRANSPORT.walk_subscriptions(None, |_, sock, _| {
            if let Some(s) = SockRef::of(sock)
                && s.queues()
                    .iter()
                    .any(|q| q.held() > 0 || q.episodes().is_open())
            {
                socks.push(s);
            }
        });
        let mut map = Vec::new();
        let mut queues: Vec<&Queue> = Vec::new();
        for (si, s) in socks.iter().enumerate() {
            for (qi, q) in s.queues().iter().enumerate() {
                queues.push(q);
                map.push((si, qi));
            }
        }
        let mut r = Replay {
            socks: &socks,
            map: &map,
            nodes: HeldNodes,
        };
        let now = now_ms();
        let t = replay::round(&queues, &sh.budget, &mut r, now, replay::BATCH);
        add(&REPLAYED, t.replayed);
        add(&DELIVERED, t.replayed);
        add(&DROPPED, t.dropped);
        episodes_open = t.episodes_open;
        drop(queues);
        drop(socks);
        let ms = sleep_ms(now_ms(), t.next_ms, IDLE_MS);
        if ms > 0 {
            futex_wait(sh.doorbell.word(), seen, ms);
        }
    }
}

struct Replay<'a> {
    socks: &'a [SockRef],
    map: &'a [(usize, usize)],
    nodes: HeldNodes,
}

impl Replay<'_> {
    fn at(&self, q: usize) -> (&SockRef, usize) {
        let (si, qi) = self.map[q];
        (&self.socks[si], qi)
    }
}

impl Replayer for Replay<'_> {
    type Nodes = HeldNodes;

    fn nodes(&self) -> &HeldNodes {
        &self.nodes
    }

    fn attempt(&mut self, q: usize, lease: &Lease) -> Attempted {
        let (sock, qi) = self.at(q);
        // a replay is no SIP message's processing: the core's dummy one
        let dummy = DummyMsg::new();
        let event = held::event(lease.handle, dummy.msg());
        let (rules, now) = (exports::rules(), now_ms());
        if sock.policy == Policy::Parallel {
            // the queue's own subscriber only
            if sock.subs()[qi].sock.asynchronous() {
                match super::chain::replay_probe(sock, qi, &event, lease.token) {
                    Attempted::Pending => return Attempted::Pending,
                    _ => {
                        let mut driver = CoreDriver::new(sock, None, None, Msg::none());
                        policy::record(sock.subs(), qi, false, now, &mut driver);
                        return Attempted::Failed;
                    }
                }
            }
            let ok = sock.subs()[qi].sock.raise(&event) == 0;
            let mut driver = CoreDriver::new(sock, None, None, Msg::none());
            policy::record(sock.subs(), qi, ok, now, &mut driver);
            return if ok {
                Attempted::Delivered
            } else {
                Attempted::Failed
            };
        }
        // HASH: placed by the held event's own parameter, as when raised
        let mut int_text = [0u8; 11];
        let value = super::raise::placement_value(sock, &event, &mut int_text);
        let mut driver = CoreDriver::replaying(sock, event, (qi, lease.token));
        match policy::deliver(
            sock.policy,
            &sock.rotation,
            value,
            sock.subs(),
            rules,
            now,
            &mut driver,
        ) {
            Progress::Pending => Attempted::Pending,
            Progress::Done(out) if out.delivered() => Attempted::Delivered,
            Progress::Done(_) => Attempted::Failed,
        }
    }

    fn free(&mut self, h: Handle) {
        held::free(h)
    }

    fn eligible_at(&self, q: usize, now_ms: u64) -> u64 {
        let (sock, qi) = self.at(q);
        let window = exports::rules().window_ms;
        match sock.policy {
            Policy::Parallel => {
                wake::eligible_at(now_ms, [sock.subs()[qi].health.state(now_ms, window)])
            }
            _ => wake::eligible_at(
                now_ms,
                sock.subs().iter().map(|s| s.health.state(now_ms, window)),
            ),
        }
    }

    fn episode(&mut self, q: usize, report: Report) {
        let (sock, _) = self.at(q);
        log!(WARN, "'{}': {report}", name(sock));
    }

    fn drained(&mut self, q: usize) {
        log_drained(self.at(q).0)
    }
}
