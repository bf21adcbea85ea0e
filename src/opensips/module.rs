//! What a module declares to the core: `exports`, its parameters and its
//! statistics (MI commands are in [`super::mi`]).

use std::cell::UnsafeCell;
use std::ffi::{CStr, c_char, c_int};
use std::ptr::{null, null_mut};

use super::sys::{self, mi_export_t, param_export_t, stat_export_t, stat_var};

/// `struct module_exports`, read by the core when it loads the module.
#[repr(transparent)]
pub struct Exports(sys::module_exports);

// SAFETY: never written after load; the pointers are to static data.
unsafe impl Sync for Exports {}

impl Exports {
    /// The version strings come from the C shim, compiled with the core's
    /// own definitions, and so do init and destroy (they log the core's
    /// usual lines).
    pub const fn new<const P: usize, const S: usize, const M: usize>(
        name: &'static CStr,
        params: &'static Params<P>,
        stats: &'static Stats<S>,
        mi: &'static Commands<M>,
    ) -> Exports {
        Exports(sys::module_exports {
            name: name.as_ptr(),
            type_: sys::module_type_MOD_TYPE_DEFAULT,
            ver_info: sys::module_exports__bindgen_ty_1 {
                version: (&raw const sys::evv_full_version).cast::<c_char>(),
                compile_flags: (&raw const sys::evv_compile_flags).cast::<c_char>(),
                scm: sys::scm_version {
                    type_: (&raw const sys::evv_scm_type).cast::<c_char>(),
                    rev: (&raw const sys::evv_scm_rev).cast::<c_char>(),
                },
            },
            dlflags: 0,
            load_f: None,
            deps: null(),
            cmds: null(),
            acmds: null(),
            params: params.0.as_ptr(),
            stats: stats.0.as_ptr(),
            mi_cmds: mi.0.as_ptr(),
            items: null(),
            trans: null(),
            procs: (&raw const sys::evv_procs).cast(),
            preinit_f: None,
            init_f: Some(sys::evv_mod_init),
            response_f: None,
            destroy_f: Some(sys::evv_destroy),
            init_child_f: None,
            reload_ack_f: None,
        })
    }
}

/// A table of what the module exports (parameters, statistics, MI
/// commands), whose last entry is the terminator the core expects.
pub struct Table<T, const N: usize>(pub [T; N]);

// SAFETY: never written after load; it points at static data and functions.
unsafe impl<T, const N: usize> Sync for Table<T, N> {}

pub type Params<const N: usize> = Table<param_export_t, N>;
pub type ParamExport = param_export_t;
pub type Stats<const N: usize> = Table<stat_export_t, N>;
pub type Commands<const N: usize> = Table<mi_export_t, N>;

/// An integer modparam.  The core writes it while it reads the
/// configuration, before mod_init and before it forks; after that every
/// process only reads it.
pub struct IntParam(UnsafeCell<c_int>);

// SAFETY: see above: written once, by the core, before any reader runs.
unsafe impl Sync for IntParam {}

impl IntParam {
    pub const fn new(default: c_int) -> Self {
        IntParam(UnsafeCell::new(default))
    }

    pub fn get(&self) -> c_int {
        // SAFETY: see the type: no write after the configuration is read.
        unsafe { *self.0.get() }
    }

    pub const fn export(&'static self, name: &'static CStr) -> param_export_t {
        param_export_t {
            name: name.as_ptr(),
            type_: sys::INT_PARAM,
            param_pointer: self.0.get().cast(),
        }
    }
}

/// The spool's modparams (issue 10), which live in the shim:
/// `spool_size`, `spool_max_age`, `spool_max_memory` (a string),
/// `spool_retry_interval`.  See [`super::spool::modparams`].
pub const fn spool_params() -> [param_export_t; 4] {
    [
        param_export_t {
            name: c"spool_size".as_ptr(),
            type_: sys::INT_PARAM,
            param_pointer: (&raw mut sys::evv_spool_size).cast(),
        },
        param_export_t {
            name: c"spool_max_age".as_ptr(),
            type_: sys::INT_PARAM,
            param_pointer: (&raw mut sys::evv_spool_max_age).cast(),
        },
        param_export_t {
            name: c"spool_max_memory".as_ptr(),
            type_: sys::STR_PARAM,
            param_pointer: (&raw mut sys::evv_spool_max_memory).cast(),
        },
        param_export_t {
            name: c"spool_retry_interval".as_ptr(),
            type_: sys::INT_PARAM,
            param_pointer: (&raw mut sys::evv_spool_retry_interval).cast(),
        },
    ]
}

pub const PARAMS_END: param_export_t = param_export_t {
    name: null(),
    type_: 0,
    param_pointer: null_mut(),
};

/// A module statistic.  The core registers it (in shared memory) at load,
/// before it forks; updates are atomic in the core.
pub struct Stat(UnsafeCell<*mut stat_var>);

// SAFETY: the pointer is written once, by the core, before any reader.
unsafe impl Sync for Stat {}

impl Stat {
    /// Not registered yet: updates do nothing until the core registers it.
    pub const fn unregistered() -> Self {
        Stat(UnsafeCell::new(null_mut()))
    }

    pub fn add(&self, n: u32) {
        if n > 0 {
            // SAFETY: the registered statistic (or null, which the shim
            // skips); update_stat is safe from any process.
            unsafe { sys::evv_stat_update(*self.0.get(), n.into()) }
        }
    }

    pub const fn export(&'static self, name: &'static CStr) -> stat_export_t {
        stat_export_t {
            name: name.as_ptr().cast_mut(),
            flags: 0,
            stat_pointer: self.0.get(),
        }
    }
}

/// A statistic computed when read (`STAT_IS_FUNC`, never reset).
pub trait Gauge {
    fn value() -> u64;
}

unsafe extern "C" fn gauge<G: Gauge>(_: *mut std::ffi::c_void) -> std::ffi::c_ulong {
    super::entry("statistic", 0, || G::value() as std::ffi::c_ulong)
}

pub const fn gauge_export<G: Gauge>(name: &'static CStr) -> stat_export_t {
    let f: unsafe extern "C" fn(*mut std::ffi::c_void) -> std::ffi::c_ulong = gauge::<G>;
    stat_export_t {
        name: name.as_ptr().cast_mut(),
        flags: (sys::STAT_IS_FUNC | sys::STAT_NO_RESET) as _,
        // the core reads a function statistic's pointer as its function
        stat_pointer: f as *mut *mut stat_var,
    }
}

pub const STATS_END: stat_export_t = stat_export_t {
    name: null_mut(),
    flags: 0,
    stat_pointer: null_mut(),
};
