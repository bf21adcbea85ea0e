//! event_virtual: OpenSIPS's virtual event transport, in Rust.
//!
//! One virtual subscriber (`virtual:POLICY SUB1 SUB2 ...`) fans each event
//! out to several real subscribers of other event transports, by one of
//! four policies.  [`socket`], [`policy`] and [`spool`] (the events every
//! subscriber failed, held and replayed) are safe Rust and run under
//! `cargo test` without OpenSIPS.  Built against an OpenSIPS tree, `opensips`
//! wraps the core in safe types (it and the virtual socket's layout hold
//! every `unsafe` line), and `module` is the transport built on them; see
//! `doc/architecture.md`.

pub mod cluster;
pub mod opensips;
pub mod policy;
pub mod socket;
pub mod spool;
pub mod text;

// the unit tests never need OpenSIPS, so they do not link the core
#[cfg(all(opensips, not(test)))]
mod module;

/// What OpenSIPS looks up by name when it loads the module; declared in
/// `module::exports`.  It is defined here because rustc exports only
/// Rust-defined symbols from a cdylib.
#[cfg(all(opensips, not(test)))]
#[unsafe(no_mangle)]
#[allow(non_upper_case_globals)]
pub static exports: opensips::module::Exports = module::exports::EXPORTS;
