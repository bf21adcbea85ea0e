//! event_virtual: OpenSIPS's virtual event transport, in Rust.
//!
//! One virtual subscriber (`virtual:POLICY SUB1 SUB2 ...`) fans each event
//! out to several real subscribers of other event transports, by one of
//! three policies.  [`socket`], [`policy`] and [`spool`] (the events every
//! subscriber failed, held and replayed; not wired into the module yet) are
//! safe Rust and run under `cargo test` without OpenSIPS; `ffi` (built only
//! against an OpenSIPS tree) holds every `unsafe` line and the module's
//! boundary.

pub mod boundary;
pub mod policy;
pub mod socket;
pub mod spool;

// the unit tests never need OpenSIPS, so they do not link the boundary
#[cfg(all(opensips, not(test)))]
mod ffi;
