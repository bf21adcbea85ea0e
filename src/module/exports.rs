//! The module's declaration, in one place: its parameters, statistics, MI
//! commands and transport, what `exports` tells the core, and mod_init.

#![forbid(unsafe_code)]

use std::ffi::c_int;

use super::hooks::Virtual;
use super::mi_list::{HashByIndex, HashBySocket, ListAll, ListEvent, Retry};
use super::shared::{
    self, DELIVERED, DROPPED, EVENTS, FAILED, FAILOVERS, INCOMPLETE, REPLAYED, SPOOLED, UNKEYED,
};
use crate::opensips::evi::TransportExport;
use crate::opensips::log::log;
use crate::opensips::mi::{self, Recipe};
use crate::opensips::module::{
    Commands, Exports, Gauge, IntParam, PARAMS_END, ParamExport, Params, STATS_END, Stats, Table,
    gauge_export, spool_params,
};
use crate::opensips::{shm_total, spool};
use crate::socket::VIRTUAL_PROTO;

/// `failover_timeout` when the configuration does not set it, in seconds.
pub const DEFAULT_FAILOVER_TIMEOUT_S: c_int = 30;

static FAILOVER_TIMEOUT: IntParam = IntParam::new(DEFAULT_FAILOVER_TIMEOUT_S);

const SPOOL_PARAMS: [ParamExport; 4] = spool_params();

static PARAMS: Params<6> = Table([
    FAILOVER_TIMEOUT.export(c"failover_timeout"),
    SPOOL_PARAMS[0],
    SPOOL_PARAMS[1],
    SPOOL_PARAMS[2],
    SPOOL_PARAMS[3],
    PARAMS_END,
]);

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

static STATS: Stats<12> = Table([
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

pub static TRANSPORT: TransportExport =
    TransportExport::new::<Virtual>(VIRTUAL_PROTO, TRANSPORT_FLAG);

/// What `exports` (in `lib.rs`) holds.
pub const EXPORTS: Exports = Exports::new(c"event_virtual", &PARAMS, &STATS, &MI_COMMANDS);

/// mod_init, after the shim's log line: 0 on success.
pub fn init() -> c_int {
    crate::opensips::log_panics();
    let timeout = FAILOVER_TIMEOUT.get();
    let Ok(seconds) = u64::try_from(timeout) else {
        log!(
            ERR,
            "failover_timeout must be 0 or more seconds, not {timeout}"
        );
        return -1;
    };
    shared::set_window_ms(seconds * 1000);
    let spool = spool::modparams()
        .check(shm_total())
        .and_then(|config| Ok(shared::make_spool(config)?));
    if let Err(e) = spool {
        log!(ERR, "{e}");
        return -1;
    }
    if !TRANSPORT.register() {
        log!(ERR, "cannot register the 'virtual' event transport");
        return -1;
    }
    0
}
