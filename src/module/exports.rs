//! The module's declaration, in one place: its parameters, statistics, MI
//! commands, process and transport, what `exports` tells the core, mod_init
//! and destroy.

#![forbid(unsafe_code)]

use std::ffi::c_int;
use std::sync::atomic::Ordering;

use super::cluster;
use super::hooks::Virtual;
use super::mi_list::{HashByIndex, HashBySocket, ListAll, ListEvent, Retry};
use super::shared::{
    self, DELIVERED, DROPPED, EVENTS, FAILED, FAILOVERS, INCOMPLETE, REPLAYED, SPOOLED, UNKEYED,
    UNPERSISTED,
};
use crate::opensips::evi::TransportExport;
use crate::opensips::log::log;
use crate::opensips::mi::{self, Recipe};
use crate::opensips::module::{
    Commands, Deps, Exports, Gauge, IntParam, Module, Needed, PARAMS_END, PROC_FLAG_INITCHILD,
    PROCS_END, Params, Process, Procs, STATS_END, Stats, StrParam, Table, gauge_export, process,
};
use crate::opensips::shm_total;
use crate::socket::VIRTUAL_PROTO;
use crate::spool::ModParams;
use crate::spool::config::DEFAULT_RETRY_MS;

/// `failover_timeout` when the configuration does not set it, in seconds.
const DEFAULT_FAILOVER_TIMEOUT_S: c_int = 30;

static FAILOVER_TIMEOUT: IntParam = IntParam::new(DEFAULT_FAILOVER_TIMEOUT_S);
// the spool's (issue 10), checked by `crate::spool::config`
static SPOOL_SIZE: IntParam = IntParam::new(0);
static SPOOL_MAX_AGE: IntParam = IntParam::new(0);
static SPOOL_MAX_MEMORY: StrParam = StrParam::new();
static SPOOL_RETRY_INTERVAL: IntParam = IntParam::new(DEFAULT_RETRY_MS as c_int);
// issue 17's
static RESTART_PERSISTENCY: IntParam = IntParam::new(0);
static RESTART_PERSISTENCY_GRACE: IntParam = IntParam::new(300);
// the cluster's (issue 18): 0, off
static CLUSTER_ID: IntParam = IntParam::new(0);

static PARAMS: Params<9> = Table([
    FAILOVER_TIMEOUT.export(c"failover_timeout"),
    SPOOL_SIZE.export(c"spool_size"),
    SPOOL_MAX_AGE.export(c"spool_max_age"),
    SPOOL_MAX_MEMORY.export(c"spool_max_memory"),
    SPOOL_RETRY_INTERVAL.export(c"spool_retry_interval"),
    RESTART_PERSISTENCY.export(c"restart_persistency"),
    RESTART_PERSISTENCY_GRACE.export(c"restart_persistency_grace"),
    CLUSTER_ID.export(c"cluster_id"),
    PARAMS_END,
]);

/// With `cluster_id` set, the clusterer is initialised first.
struct Clusterer;
impl Needed for Clusterer {
    const MODULE: &'static std::ffi::CStr = c"clusterer";
}
static DEPS: Deps<2> = Deps::when_set::<Clusterer>(c"cluster_id");

/// `spool_held`: events held now, in every queue.
struct SpoolHeld;
impl Gauge for SpoolHeld {
    fn value() -> u64 {
        shared::spool().map_or(0, |s| s.budget.held())
    }
}

/// `spool_memory`: bytes the held events take now.
struct SpoolMemory;
impl Gauge for SpoolMemory {
    fn value() -> u64 {
        shared::spool().map_or(0, |s| s.budget.used())
    }
}

/// Restart persistency's counts (`super::persist::Persist`): since the
/// start, never reset.
macro_rules! persist_gauge {
    ($name:ident, $field:ident) => {
        struct $name;
        impl Gauge for $name {
            fn value() -> u64 {
                let count = |p: &super::persist::Persist| p.$field.load(Ordering::Relaxed);
                super::persist::get().map_or(0, count)
            }
        }
    };
}
persist_gauge!(Restored, restored);
persist_gauge!(RestoreWaiting, waiting);
persist_gauge!(RestoreDropped, dropped);

static STATS: Stats<19> = Table([
    EVENTS.export(c"events"),
    DELIVERED.export(c"events_delivered"),
    FAILED.export(c"events_failed"),
    INCOMPLETE.export(c"events_incomplete"),
    FAILOVERS.export(c"failovers"),
    UNKEYED.export(c"events_unkeyed"),
    SPOOLED.export(c"events_spooled"),
    REPLAYED.export(c"events_replayed"),
    DROPPED.export(c"events_dropped"),
    gauge_export::<SpoolHeld>(c"spool_held"),
    gauge_export::<SpoolMemory>(c"spool_memory"),
    gauge_export::<Restored>(c"events_restored"),
    gauge_export::<RestoreWaiting>(c"restore_waiting"),
    gauge_export::<RestoreDropped>(c"restore_dropped"),
    UNPERSISTED.export(c"events_unpersisted"),
    cluster::SENT.export(c"cluster_sent"),
    cluster::RECEIVED.export(c"cluster_received"),
    cluster::DROPPED.export(c"cluster_dropped"),
    STATS_END,
]);

static MI_COMMANDS: Commands<4> = Table([
    mi::command(
        c"event_virtual_list",
        c"lists the virtual subscriptions, their subscribers' health and counters",
        [
            Recipe::new::<ListAll>(&[]),
            Recipe::new::<ListEvent>(&[c"event"]),
        ],
    ),
    mi::command(
        c"event_virtual_hash",
        c"where a value of a HASH subscription's parameter goes now, and the order it would fail over in",
        [
            Recipe::new::<HashByIndex>(&[c"event", c"index", c"value"]),
            Recipe::new::<HashBySocket>(&[c"event", c"socket", c"value"]),
        ],
    ),
    mi::command(
        c"event_virtual_retry",
        c"retries the spool's held events now (mode: all, the default, or one)",
        [
            Recipe::new::<Retry>(&[]),
            Recipe::new::<Retry>(&[c"event"]),
            Recipe::new::<Retry>(&[c"mode"]),
            Recipe::new::<Retry>(&[c"event", c"mode"]),
        ],
    ),
    mi::END,
]);

/// The transport id flag the C module registers with, kept for drop-in use.
const TRANSPORT_FLAG: u32 = 1 << 24;

static TRANSPORT: TransportExport = TransportExport::new::<Virtual>(VIRTUAL_PROTO, TRANSPORT_FLAG);

/// The spool's replay process.
struct Replay;
impl Process for Replay {
    fn run() {
        super::replay::run()
    }
}

/// One replay process; PROC_FLAG_INITCHILD, since transports open their
/// sockets in child_init.
static PROCS: Procs<2> = Table([
    process::<Replay>(c"event_virtual spool", 1, PROC_FLAG_INITCHILD),
    PROCS_END,
]);

/// What `exports` (in `lib.rs`) holds.
pub const EXPORTS: Exports = Exports::new::<EventVirtual>(
    c"event_virtual",
    &PARAMS.0,
    &STATS.0,
    &MI_COMMANDS.0,
    &PROCS.0,
)
.needing(&DEPS);

pub struct EventVirtual;

impl Module for EventVirtual {
    fn init() -> Result<(), String> {
        let (this, core) = (env!("CARGO_PKG_VERSION"), env!("EVV_OPENSIPS_VERSION"));
        log!(
            NOTICE,
            "event_virtual {this} (Rust), built for OpenSIPS {core}"
        );
        let timeout = FAILOVER_TIMEOUT.get();
        let seconds = u64::try_from(timeout)
            .map_err(|_| format!("failover_timeout must be 0 or more seconds, not {timeout}"))?;
        shared::set_window_ms(seconds * 1000);
        let config = ModParams {
            spool_size: SPOOL_SIZE.get().into(),
            spool_max_age: SPOOL_MAX_AGE.get().into(),
            spool_max_memory: SPOOL_MAX_MEMORY.get(),
            spool_retry_interval: SPOOL_RETRY_INTERVAL.get().into(),
        }
        .check(shm_total())?;
        let budget = config.budget_bytes;
        shared::make_spool(config)?;
        match (
            RESTART_PERSISTENCY.get(),
            u64::try_from(RESTART_PERSISTENCY_GRACE.get()),
        ) {
            (0, Ok(_)) => {}
            (1, Ok(grace)) => super::restore::init(budget, grace * 1000)?,
            (_, Ok(_)) => {
                return Err(format!(
                    "restart_persistency must be 0 (off) or 1, not {}",
                    RESTART_PERSISTENCY.get()
                ));
            }
            (_, Err(_)) => {
                return Err(format!(
                    "restart_persistency_grace must be 0 or more seconds, not {}",
                    RESTART_PERSISTENCY_GRACE.get()
                ));
            }
        }
        super::status::init()?;
        match CLUSTER_ID.get() {
            0 => {}
            id if id < 0 => {
                return Err(format!(
                    "cluster_id must be 0 (off) or a cluster's id, not {id}"
                ));
            }
            id => cluster::init(id)?,
        }
        let registered = TRANSPORT.register();
        registered
            .then_some(())
            .ok_or_else(|| "cannot register the 'virtual' event transport".into())
    }

    fn destroy() {
        super::spool::shutdown()
    }
}
