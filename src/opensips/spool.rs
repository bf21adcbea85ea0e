//! The spool's modparams, as the shim keeps them.

use std::ffi::CStr;

use super::sys;
use crate::spool::ModParams;

/// The spool's modparams, as the core set them (read in mod_init).
pub fn modparams() -> ModParams {
    // SAFETY: the shim's modparam globals, written by the core while it
    // read the configuration, before mod_init; only read afterwards.
    unsafe {
        let mem = sys::evv_spool_max_memory;
        let retry = sys::evv_spool_retry_interval;
        ModParams {
            spool_size: sys::evv_spool_size.into(),
            spool_max_age: sys::evv_spool_max_age.into(),
            spool_max_memory: (!mem.is_null())
                .then(|| CStr::from_ptr(mem).to_string_lossy().into_owned()),
            spool_retry_interval: (retry != -1).then_some(retry.into()),
        }
    }
}
