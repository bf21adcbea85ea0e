//! The cluster (issue 18): shared subscriber health over OpenSIPS's
//! `clusterer`, when `cluster_id` is set.
//!
//! A transition of this node's own (a subscriber starts failing, or
//! recovers) marks the subscriber untold (`policy::Health`) and rings the
//! spool process's doorbell; that process walks the subscriptions and
//! sends one small packet per untold subscriber to the cluster
//! ([`flush`]).  The raise path never sends: a send takes the clusterer's
//! locks and may write to a TCP connection, and a transition may be seen
//! in any process (an asynchronous report, a reactor).  A peer's packet
//! ([`Peers`]) arrives in whatever process the clusterer picks, and only
//! touches the subscriber's atomics.

#![forbid(unsafe_code)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::shared;
use super::vsock;
use crate::cluster::{self, CAPABILITY, Fields, HEALTH, Health, VERSION};
use crate::opensips::cluster::{self as clusterer, Broadcast, Capability, Packet, Received};
use crate::opensips::log::log;
use crate::opensips::module::Stat;
use crate::opensips::now_ms;
use crate::opensips::shm::{self, Tail};
use crate::policy::{self, Told, Transition};
use crate::text::Quoted;

pub static SENT: Stat = Stat::unregistered();
pub static RECEIVED: Stat = Stat::unregistered();
pub static DROPPED: Stat = Stat::unregistered();

/// What every process shares, in shared memory.
struct Shared {
    /// Some subscriber is untold, or a node came up: the spool process
    /// has something to send.
    pending: AtomicBool,
    /// A node came up: tell it every subscriber this node finds failing.
    rejoined: AtomicBool,
}

impl Tail for Shared {}

/// The cluster's id and the shared block; set in mod_init, when on.
static CLUSTER: OnceLock<(i32, &'static Shared)> = OnceLock::new();

/// mod_init, with `cluster_id` set: bind the clusterer and register the
/// capability.
pub fn init(cluster_id: i32) -> Result<(), String> {
    if !clusterer::load() {
        return Err(format!(
            "cluster_id {cluster_id} needs the clusterer module: load clusterer.so (and proto_bin.so) before event_virtual"
        ));
    }
    let block = shm::leak(Shared {
        pending: AtomicBool::new(false),
        rejoined: AtomicBool::new(false),
    })
    .ok_or("out of shared memory for the cluster")?;
    if !clusterer::register::<Peers>(CAPABILITY, cluster_id) {
        return Err(format!(
            "the clusterer refused capability '{}' in cluster {cluster_id}: is the cluster defined (my_node_info, or the clusterer table)?",
            CAPABILITY.to_string_lossy()
        ));
    }
    let _ = CLUSTER.set((cluster_id, block));
    log!(
        NOTICE,
        "sharing subscriber health in cluster {cluster_id} ('{}')",
        CAPABILITY.to_string_lossy()
    );
    Ok(())
}

fn on() -> Option<(i32, &'static Shared)> {
    CLUSTER.get().copied()
}

/// A transition of this node's own was recorded: wake the spool process
/// to tell the cluster.
pub fn announce() {
    if let Some((_, c)) = on() {
        c.pending.store(true, Ordering::Release);
        shared::ring();
    }
}

/// The spool process: send what is untold, one packet per subscriber.
pub fn flush() {
    let Some((id, c)) = on() else { return };
    if !c.pending.swap(false, Ordering::Acquire) {
        return;
    }
    let rejoined = c.rejoined.swap(false, Ordering::Relaxed);
    // copied out while the core's lists are locked, sent after
    let mut socks = Vec::new();
    let _ = vsock::walk(None, |event, sock, _| socks.push((event.to_vec(), sock)));
    let now = now_ms();
    for (event, sock) in &socks {
        let mut text = None;
        for (i, sub) in sock.subs().iter().enumerate() {
            let told = match sub.health.take_untold(now) {
                Some(told) => told,
                // a node came up: what this node found failing itself
                None if rejoined && sub.health.peer().is_none() => match sub.health.told(now) {
                    Told::Healthy => continue,
                    failing => failing,
                },
                None => continue,
            };
            let socket = text.get_or_insert_with(|| sock.identity());
            let h = Health {
                event,
                socket,
                index: i,
                told,
            };
            send(id, &h);
        }
    }
}

fn send(cluster_id: i32, h: &Health<'_>) {
    let Some(mut p) = Packet::new(CAPABILITY, HEALTH, VERSION) else {
        log!(ERR, "out of memory for a cluster packet");
        return;
    };
    if !h.encode(&mut Out(&mut p)) {
        log!(ERR, "cannot build a cluster packet");
        return;
    }
    match p.send_all(cluster_id) {
        Broadcast::Sent => SENT.add(1),
        Broadcast::Down => log!(DBG, "no node of cluster {cluster_id} is reachable"),
        // a node that comes back is told again what fails (Peers::node_up)
        Broadcast::Failed => log!(
            WARN,
            "cannot tell cluster {cluster_id} of a subscriber's health"
        ),
    }
}

struct Out<'p>(&'p mut Packet);

impl cluster::Builder for Out<'_> {
    fn str(&mut self, s: &[u8]) -> bool {
        self.0.push_str(s)
    }
    fn int(&mut self, n: i32) -> bool {
        self.0.push_int(n)
    }
}

struct In<'a>(Received<'a>);

impl<'a> Fields<'a> for In<'a> {
    fn str(&mut self) -> Option<&'a [u8]> {
        self.0.pop_str()
    }
    fn int(&mut self) -> Option<i32> {
        self.0.pop_int()
    }
    fn at_end(&mut self) -> bool {
        self.0.at_end()
    }
}

/// What the other nodes send.
struct Peers;

impl Capability for Peers {
    fn packet(p: Received<'_>) {
        RECEIVED.add(1);
        let node = p.source();
        let (version, kind) = (p.version().unwrap_or(-1), p.kind());
        let mut fields = In(p);
        let heard = match cluster::decode(version, kind, &mut fields) {
            Ok(h) => h,
            Err(why) => {
                DROPPED.add(1);
                log!(WARN, "dropped a cluster packet from node {node}: {why}");
                return;
            }
        };
        if !hear(&heard, node) {
            DROPPED.add(1);
            let (i, event) = (heard.index, Quoted(heard.event));
            log!(
                DBG,
                "dropped a cluster packet from node {node}: no subscriber {i} of 'virtual:{}' to event '{event}' here",
                Quoted(heard.socket)
            );
        }
    }

    fn node_up(node: i32) {
        if let Some((_, c)) = on() {
            log!(DBG, "node {node} is up: telling it what fails here");
            c.rejoined.store(true, Ordering::Relaxed);
            c.pending.store(true, Ordering::Release);
            shared::ring();
        }
    }
}

/// Apply what `node` told to every subscription it names here; false when
/// none matches.
fn hear(h: &Health<'_>, node: i32) -> bool {
    let mut socks = Vec::new();
    if vsock::walk(Some(h.event), |_, s, _| socks.push(s)).is_err() {
        return false;
    }
    let now = now_ms();
    let node = u32::try_from(node).unwrap_or(0);
    let mut found = false;
    for sock in socks.iter().filter(|s| s.identity() == h.socket) {
        let subs = sock.subs();
        if h.index >= subs.len() {
            continue;
        }
        found = true;
        let t = policy::hear(&sock.rotation, subs, h.index, h.told, node, now);
        let (token, text) = (Quoted(sock.token(&subs[h.index])), Quoted(sock.text()));
        match t {
            Some(Transition::Failing) => log!(
                WARN,
                "subscriber '{token}' of 'virtual:{text}' is failing, node {node} says"
            ),
            Some(Transition::Recovered) => log!(
                NOTICE,
                "subscriber '{token}' of 'virtual:{text}' has recovered, node {node} says"
            ),
            None => {}
        }
    }
    found
}
