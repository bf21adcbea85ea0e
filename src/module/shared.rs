//! What every process of the module shares, set before the fork: the
//! statistics, the delivery rules and the spool's module-wide block.

#![forbid(unsafe_code)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::opensips::futex;
use crate::opensips::module::Stat;
use crate::opensips::shm::{self, Tail};
use crate::policy::Rules;
use crate::spool::{Budget, Config, Doorbell};

pub static EVENTS: Stat = Stat::unregistered();
pub static DELIVERED: Stat = Stat::unregistered();
pub static FAILED: Stat = Stat::unregistered();
pub static INCOMPLETE: Stat = Stat::unregistered();
pub static FAILOVERS: Stat = Stat::unregistered();
pub static UNKEYED: Stat = Stat::unregistered();
pub static SPOOLED: Stat = Stat::unregistered();
pub static REPLAYED: Stat = Stat::unregistered();
pub static DROPPED: Stat = Stat::unregistered();
pub static UNPERSISTED: Stat = Stat::unregistered();

/// Milliseconds of the wall clock: what outlives a restart.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Add a count that may not fit a statistic's update.
pub fn add(stat: &Stat, n: u64) {
    stat.add(u32::try_from(n).unwrap_or(u32::MAX));
}

/// `failover_timeout` in ms.  Set in mod_init, before OpenSIPS forks, and
/// only read afterwards: every process has the same value.
static WINDOW_MS: AtomicU64 = AtomicU64::new(0);

pub fn set_window_ms(ms: u64) {
    WINDOW_MS.store(ms, Ordering::Relaxed);
}

pub fn rules() -> Rules {
    Rules {
        window_ms: WINDOW_MS.load(Ordering::Relaxed),
    }
}

/// The spool's block: the budget, the doorbell of the replay process, the
/// checked modparams.  Made in mod_init.
pub struct Spool {
    pub budget: Budget,
    pub doorbell: Doorbell,
    pub config: Config,
}

impl Tail for Spool {}

static SPOOL: OnceLock<&'static Spool> = OnceLock::new();

/// mod_init: make the spool's block; Err when out of shared memory.
pub fn make_spool(config: Config) -> Result<(), &'static str> {
    let block = shm::leak(Spool {
        budget: Budget::new(config.budget_bytes),
        doorbell: Doorbell::default(),
        config,
    })
    .ok_or("out of shared memory for the spool")?;
    let _ = SPOOL.set(block);
    Ok(())
}

pub fn spool() -> Option<&'static Spool> {
    SPOOL.get().copied()
}

/// Wake the replay process.
pub fn ring() {
    if let Some(sp) = spool() {
        sp.doorbell.ring();
        futex::wake(sp.doorbell.word());
    }
}

/// A new socket's queue bounds; None: no spool.
pub fn limits(option: Option<crate::spool::SpoolOption>) -> Option<crate::spool::Limits> {
    spool()?.config.limits(option)
}
