//! The virtual transport, built on the safe wrappers of `crate::opensips`
//! and the pure rules of `crate::socket` and `crate::policy`.
//!
//! - `exports`: the module's declaration and its initialisation;
//! - `vsock`: the virtual socket in shared memory and its references;
//! - `hooks`: the five transport hooks the core calls;
//! - `raise`: one event offered to the subscribers, and its accounting;
//! - `chain`: events waiting for an asynchronous transport's report;
//! - `mi_list`: MI `event_virtual_list`;
//! - `spool`: held events, their replay process, MI `event_virtual_retry`.

pub mod chain;
pub mod exports;
pub mod hooks;
pub mod mi_list;
pub mod raise;
pub mod spool;
pub mod vsock;
