//! The spool's replay process, and the operator's retry (MI): rounds over
//! the queues that hold events, sleeping on the doorbell in between.

#![forbid(unsafe_code)]

use super::deliver;
use super::held::Queue;
use super::shared::{self, DELIVERED, DROPPED, REPLAYED, add};
use super::spool::{self, Name};
use super::status::{self, Change};
use super::vsock::{self, SockRef};
use crate::opensips::event::EventCopy;
use crate::opensips::futex;
use crate::opensips::log::log;
use crate::opensips::now_ms;
use crate::opensips::shm::ShmList;
use crate::spool::replay::{self, Attempted, Replayer};
use crate::spool::wake::{IDLE_MS, sleep_ms};
use crate::spool::{Lease, Report};

/// The operator's retry (MI): queues of `event` (or all), `all` or one
/// event each; the number of queues woken.
pub fn retry(filter: Option<&[u8]>, all: bool) -> Result<u64, ()> {
    let mut socks = Vec::new();
    vsock::walk(filter, |_, s, _| socks.push(s))?;
    let woken = socks
        .iter()
        .flat_map(|s| s.queues())
        .filter(|q| q.retry_now(all))
        .count() as u64;
    if woken > 0 {
        shared::ring();
    }
    Ok(woken)
}

/// The replay process.  Never returns.
pub fn run() -> ! {
    let Some(sp) = shared::spool() else {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    };
    let mut episodes_open = false;
    loop {
        let seen = sp.doorbell.value();
        if super::restore::waiting() {
            super::restore::sweep();
        }
        status::raise_recorded();
        super::cluster::flush();
        if sp.budget.held() == 0 && !episodes_open {
            futex::wait(sp.doorbell.word(), seen, IDLE_MS);
            continue;
        }
        let mut socks = Vec::new();
        let _ = vsock::walk(None, |_, s, _| {
            if s.queues()
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
        };
        let now = now_ms();
        let t = replay::round(&queues, &sp.budget, &mut r, now, replay::BATCH);
        add(&REPLAYED, t.replayed);
        add(&DELIVERED, t.replayed);
        add(&DROPPED, t.dropped);
        episodes_open = t.episodes_open;
        drop(queues);
        drop(socks);
        let ms = sleep_ms(now_ms(), t.next_ms, IDLE_MS);
        if ms > 0 {
            futex::wait(sp.doorbell.word(), seen, ms);
        }
    }
}

struct Replay<'a> {
    socks: &'a [SockRef],
    map: &'a [(usize, usize)],
}

impl Replay<'_> {
    fn at(&self, q: usize) -> (&SockRef, usize) {
        let (si, qi) = self.map[q];
        (&self.socks[si], qi)
    }
}

impl Replayer<ShmList<super::held::Holding>> for Replay<'_> {
    fn attempt(&mut self, q: usize, lease: &Lease<EventCopy>) -> Attempted {
        let (sock, qi) = self.at(q);
        deliver::replay(sock, qi, lease.event.clone(), lease.token)
    }

    fn eligible_at(&self, q: usize, now_ms: u64) -> u64 {
        let (sock, qi) = self.at(q);
        sock.eligible_at(qi, now_ms, shared::rules().window_ms)
    }

    fn episode(&mut self, q: usize, report: Report) {
        let (sock, qi) = self.at(q);
        log!(WARN, "'{}': {report}", Name(sock));
        status::record(sock, qi, Change::Dropped(report));
    }

    fn drained(&mut self, q: usize) {
        let (sock, qi) = self.at(q);
        spool::log_drained(sock, qi)
    }
}
