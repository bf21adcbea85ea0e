//! OpenSIPS's `clusterer` module through its API (`modules/clusterer/api.h`,
//! bound in mod_init), and the packets of its bin protocol
//! (`bin_interface.h`) that a capability sends and receives.
//!
//! `struct clusterer_binds` is each tree's own (bindgen): 4.0 has more
//! functions ahead of `send_to` than 3.6.

use std::ffi::{CStr, c_int};
use std::marker::PhantomData;
use std::sync::OnceLock;

use super::entry;
use super::str::{self, str_};
use super::sys::{self, bin_packet_t, clusterer_binds};

/// The API, bound in mod_init, before OpenSIPS forks: every process has
/// the same copy.
static API: OnceLock<clusterer_binds> = OnceLock::new();

/// Bind the clusterer's API, as `load_clusterer_api` does; false when the
/// clusterer module is not loaded.
pub fn load() -> bool {
    if API.get().is_some() {
        return true;
    }
    // SAFETY: a lookup by a NUL-terminated name; null when not there.
    let found = unsafe { sys::find_export(c"load_clusterer".as_ptr(), 0) };
    if found.is_none() {
        return false;
    }
    // SAFETY: the clusterer exports its load_clusterer_f under this name,
    // as the generic cmd_function the table holds; api.h casts it back
    // the same way.  Both are one function pointer.
    let load: sys::load_clusterer_f = unsafe { std::mem::transmute(found) };
    let mut binds = clusterer_binds::default();
    // SAFETY: load_clusterer fills the struct it is given; it answers 1,
    // and api.h takes anything but -1 for success.
    let loaded = load.is_some_and(|f| unsafe { f(&mut binds) } != -1);
    loaded && API.set(binds).is_ok()
}

fn api() -> Option<&'static clusterer_binds> {
    API.get()
}

/// A capability's side of the cluster: what it does with what arrives.
/// Called in whatever process the clusterer picks.
pub trait Capability {
    fn packet(p: Received<'_>);
    /// Node `node` of the cluster became reachable.
    fn node_up(_node: i32) {}
}

/// The capability's name as the core's `str`; the clusterer keeps the
/// pointer, so the name must be static.
fn name_str(name: &'static CStr) -> str_ {
    str::of(name.to_bytes()).unwrap_or(str::EMPTY)
}

/// `register_capability` in cluster `cluster_id`, without a sync at
/// start-up: false when the clusterer refuses (no such cluster).
pub fn register<C: Capability>(name: &'static CStr, cluster_id: i32) -> bool {
    let Some(f) = api().and_then(|a| a.register_capability) else {
        return false;
    };
    let mut cap = name_str(name);
    // SAFETY: the name's bytes are static (the clusterer keeps them); the
    // callbacks are functions of this module, which lives as long as the
    // server.
    unsafe {
        f(
            &mut cap,
            Some(packet_cb::<C>),
            Some(event_cb::<C>),
            cluster_id,
            0,
            sys::cl_node_match_op_NODE_CMP_ANY,
        ) == 0
    }
}

unsafe extern "C" fn packet_cb<C: Capability>(packet: *mut bin_packet_t) {
    entry("cluster packet", (), || {
        // SAFETY: the clusterer hands a packet that is valid, and ours,
        // for the call.
        if let Some(p) = unsafe { packet.as_mut() } {
            C::packet(Received(p, PhantomData))
        }
    })
}

unsafe extern "C" fn event_cb<C: Capability>(ev: sys::clusterer_event, node: c_int) {
    entry("cluster event", (), || {
        if ev == sys::clusterer_event_CLUSTER_NODE_UP {
            C::node_up(node)
        }
    })
}

/// What `send_all` made of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broadcast {
    /// Sent to every reachable node (or there was none to send to).
    Sent,
    /// No node of the cluster is reachable, or this one is disabled.
    Down,
    Failed,
}

/// A bin packet being built, in the process's private memory; freed when
/// dropped.
pub struct Packet(bin_packet_t);

impl Packet {
    /// `bin_init`: an empty packet of `kind` and `version` under capability
    /// `name`; None when out of memory.
    pub fn new(name: &'static CStr, kind: i32, version: i16) -> Option<Packet> {
        let mut p = bin_packet_t::default();
        let mut cap = name_str(name);
        // SAFETY: p is a zeroed packet to initialise; cap is read only.
        let rc = unsafe { sys::_bin_init(&mut p, &mut cap, kind, version, 0, 0) };
        (rc == 0).then_some(Packet(p))
    }

    pub fn push_str(&mut self, s: &[u8]) -> bool {
        let Some(s) = str::of(s) else { return false };
        // SAFETY: an initialised packet; s is valid for the call (copied).
        unsafe { sys::bin_push_str(&mut self.0, &s) >= 0 }
    }

    pub fn push_int(&mut self, n: i32) -> bool {
        // SAFETY: an initialised packet.
        unsafe { sys::bin_push_int(&mut self.0, n) >= 0 }
    }

    /// `send_all`: to every node of `cluster_id` but this one.
    pub fn send_all(&mut self, cluster_id: i32) -> Broadcast {
        let Some(f) = api().and_then(|a| a.send_all) else {
            return Broadcast::Failed;
        };
        // SAFETY: an initialised packet; the clusterer adds its trailer
        // and takes it off again.
        match unsafe { f(&mut self.0, cluster_id) } {
            sys::clusterer_send_ret_CLUSTERER_SEND_SUCCESS => Broadcast::Sent,
            sys::clusterer_send_ret_CLUSTERER_DEST_DOWN
            | sys::clusterer_send_ret_CLUSTERER_CURR_DISABLED => Broadcast::Down,
            _ => Broadcast::Failed,
        }
    }
}

impl Drop for Packet {
    fn drop(&mut self) {
        // SAFETY: initialised by new, freed once.
        unsafe { sys::bin_free_packet(&mut self.0) }
    }
}

/// A packet that arrived, valid for the callback (`'a`): its header, and
/// its fields read in order.
pub struct Received<'a>(&'a mut bin_packet_t, PhantomData<&'a [u8]>);

impl<'a> Received<'a> {
    /// The packet type its sender gave `bin_init`.
    pub fn kind(&self) -> i32 {
        self.0.type_
    }

    /// The node that sent it.
    pub fn source(&self) -> i32 {
        self.0.src_id
    }

    /// The version its sender gave `bin_init` (`get_bin_pkg_version`);
    /// None when the buffer is too short to have one.
    pub fn version(&self) -> Option<i16> {
        let at = (sys::BIN_PACKET_MARKER_SIZE + sys::PKG_LEN_FIELD_SIZE) as usize;
        let len = usize::try_from(self.0.buffer.len).ok()?;
        if self.0.buffer.s.is_null() || len < at + size_of::<i16>() {
            return None;
        }
        // SAFETY: the buffer holds len bytes, more than at + 2.
        Some(unsafe { self.0.buffer.s.add(at).cast::<i16>().read_unaligned() })
    }

    /// The next field, a string; None at the end or when malformed.
    pub fn pop_str(&mut self) -> Option<&'a [u8]> {
        let mut s = str::EMPTY;
        // SAFETY: a received packet; bin_pop_str checks the bounds.
        if unsafe { sys::bin_pop_str(self.0, &mut s) } != 0 {
            return None;
        }
        // SAFETY: s points into the packet's buffer, which is neither
        // changed nor freed before the callback returns ('a).
        Some(unsafe { str::bytes(&s) })
    }

    /// The next field, an integer; None at the end or when malformed.
    pub fn pop_int(&mut self) -> Option<i32> {
        let mut n: c_int = 0;
        // SAFETY: a received packet; bin_pop_int checks the bounds and
        // writes one int.
        let rc = unsafe { sys::bin_pop_int(self.0, (&raw mut n).cast()) };
        (rc == 0).then_some(n)
    }

    /// Every field has been read.
    pub fn at_end(&self) -> bool {
        let p = &*self.0;
        let read = (p.front_pointer as usize).wrapping_sub(p.buffer.s as usize);
        usize::try_from(p.buffer.len).is_ok_and(|len| read >= len) || p.buffer.s.is_null()
    }
}
