//! event_virtual: OpenSIPS's virtual event transport, in Rust.
//!
//! One virtual subscriber (`virtual:POLICY SUB1 SUB2 ...`) fans each event
//! out to several real subscribers of other event transports, by one of
//! four policies.  [`socket`] and [`policy`] are safe Rust and run under
//! `cargo test` without OpenSIPS; `ffi` (built only against an OpenSIPS
//! tree) holds every `unsafe` line and the module's boundary.

pub mod boundary;
pub mod policy;
pub mod socket;

// the unit tests never need OpenSIPS, so they do not link the boundary
#[cfg(all(opensips, not(test)))]
mod ffi;
