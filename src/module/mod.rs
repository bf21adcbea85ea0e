//! The virtual transport, built on the safe wrappers of `crate::opensips`
//! and the pure rules of `crate::socket`, `crate::policy` and
//! `crate::spool`.  Each file uses only those listed before it:
//!
//! - `shared`: what every process shares: statistics, rules, the spool's block;
//! - `persist`: held events' records in restart-persistent memory;
//! - `held`: a held event and the spool queue's storage;
//! - `vsock`: the virtual socket in shared memory and its references;
//! - `status`: the module's status event, recorded and raised later;
//! - `spool`: holding events in a socket's queues;
//! - `restore`: what a previous run held, back into its subscription's queues;
//! - `cluster`: subscriber health shared with the other nodes of a cluster;
//! - `deliver`: one event offered to the subscribers, its asynchronous
//!   chains and its accounting;
//! - `replay`: the spool's replay process and MI retry;
//! - `hooks`: the five transport hooks the core calls;
//! - `mi_list`: MI `event_virtual_list`, `event_virtual_hash`, `event_virtual_retry`;
//! - `exports`: the module's declaration and its initialisation.

pub mod cluster;
pub mod deliver;
pub mod exports;
pub mod held;
pub mod hooks;
pub mod mi_list;
pub mod persist;
pub mod replay;
pub mod restore;
pub mod shared;
pub mod spool;
pub mod status;
pub mod vsock;
