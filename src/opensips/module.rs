//! What a module declares to the core: `exports`, its parameters and its
//! statistics (MI commands are in [`super::mi`]).

use std::cell::UnsafeCell;
use std::ffi::{CStr, c_char, c_int, c_uint};
use std::ptr::null_mut;

use super::log::log;
use super::sys::{self, mi_export_t, param_export_t, proc_export_t, stat_export_t, stat_var};

/// `struct module_exports`, read by the core when it loads the module.
#[repr(transparent)]
pub struct Exports(sys::module_exports);

// SAFETY: never written after load; the pointers are to static data.
unsafe impl Sync for Exports {}

/// A module's life as the core drives it.
pub trait Module {
    /// mod_init: the modparams are set, the server has not forked yet; an
    /// error is logged and refuses to start.
    fn init() -> Result<(), String>;
    fn destroy();
}

unsafe extern "C" fn init<M: Module>() -> c_int {
    log!(NOTICE, "initializing module ...");
    super::log_panics();
    let init = || M::init().inspect_err(|e| log!(ERR, "{e}")).map_or(-1, |()| 0);
    super::entry("mod_init", -1, init)
}

unsafe extern "C" fn destroy<M: Module>() {
    log!(NOTICE, "destroying module ...");
    super::entry("destroy", (), M::destroy)
}

impl Exports {
    /// The version strings come from the C shim, compiled with the core's
    /// own definitions.
    pub const fn new<M: Module>(
        name: &'static CStr,
        params: &'static [param_export_t],
        stats: &'static [stat_export_t],
        mi: &'static [mi_export_t],
        procs: &'static [proc_export_t],
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
            params: params.as_ptr(),
            stats: stats.as_ptr(),
            mi_cmds: mi.as_ptr(),
            procs: procs.as_ptr(),
            init_f: Some(init::<M>),
            destroy_f: Some(destroy::<M>),
            // SAFETY: all-zero is "none" for the other fields (null
            // pointers, no functions, no flags).
            ..unsafe { std::mem::zeroed() }
        })
    }
}

impl Exports {
    /// The modules this one needs (`deps`), that the core initialises first.
    pub const fn needing<const N: usize>(mut self, deps: &'static Deps<N>) -> Exports {
        self.0.deps = (deps as *const Deps<N>).cast();
        self
    }
}

/// `dep_export_t` with its modparam dependencies in place: the C type ends
/// in a flexible array, which a Rust static cannot hold.
#[repr(C)]
pub struct Deps<const N: usize> {
    md: [sys::module_dependency_t; sys::MAX_MOD_DEPS as usize],
    mpd: [sys::modparam_dependency_t; N],
}

const _: () = assert!(
    std::mem::offset_of!(Deps<2>, mpd) == std::mem::offset_of!(sys::dep_export_t, mpd)
);

// SAFETY: never written after load; it points at static data and functions.
unsafe impl<const N: usize> Sync for Deps<N> {}

/// The module an integer modparam names a need of.
pub trait Needed {
    const MODULE: &'static CStr;
}

impl Deps<2> {
    /// `M::MODULE` is needed when the integer modparam `param` is above 0,
    /// as the clusterer's own `get_deps_clusterer` says, but with a warning
    /// where it aborts: mod_init then says what is missing.
    pub const fn when_set<M: Needed>(param: &'static CStr) -> Deps<2> {
        Deps {
            // SAFETY: all-zero is no module dependency (MOD_TYPE_NULL).
            md: unsafe { std::mem::zeroed() },
            mpd: [
                sys::modparam_dependency_t {
                    script_param: param.as_ptr().cast_mut(),
                    get_deps_f: Some(needed_when_set::<M>),
                },
                // SAFETY: all-zero is the terminator the core expects.
                unsafe { std::mem::zeroed() },
            ],
        }
    }
}

unsafe extern "C" fn needed_when_set<M: Needed>(
    param: *const param_export_t,
) -> *mut sys::module_dependency_t {
    super::entry("module dependencies", null_mut(), || {
        // SAFETY: the core passes the export of an INT_PARAM of ours, whose
        // pointer is its int, set by the configuration.
        let set = unsafe { param.as_ref().is_some_and(|p| *p.param_pointer.cast::<c_int>() > 0) };
        if !set {
            return null_mut();
        }
        let name = M::MODULE.as_ptr().cast_mut();
        // SAFETY: the core copies nothing but keeps the static name.
        unsafe { sys::alloc_module_dep(sys::module_type_MOD_TYPE_DEFAULT, name, sys::DEP_WARN) }
    })
}

/// A table of what the module exports (parameters, statistics, MI
/// commands), whose last entry is the terminator the core expects.
pub struct Table<T, const N: usize>(pub [T; N]);

// SAFETY: never written after load; it points at static data and functions.
unsafe impl<T, const N: usize> Sync for Table<T, N> {}

pub type Params<const N: usize> = Table<param_export_t, N>;
pub type Stats<const N: usize> = Table<stat_export_t, N>;
pub type Commands<const N: usize> = Table<mi_export_t, N>;
pub type Procs<const N: usize> = Table<proc_export_t, N>;

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

/// A string modparam: the core points it at its copy of the text (or
/// leaves it null, not set), before mod_init and before it forks.
pub struct StrParam(UnsafeCell<*mut c_char>);

// SAFETY: as IntParam's.
unsafe impl Sync for StrParam {}

impl StrParam {
    pub const fn new() -> Self {
        StrParam(UnsafeCell::new(null_mut()))
    }

    /// The text as set (not UTF-8 is replaced), or None.
    pub fn get(&self) -> Option<String> {
        // SAFETY: see the type; the core never frees the text it set.
        let text = unsafe { (*self.0.get()).as_ref().map(|p| CStr::from_ptr(p)) };
        text.map(|t| t.to_string_lossy().into_owned())
    }

    pub const fn export(&'static self, name: &'static CStr) -> param_export_t {
        param_export_t {
            name: name.as_ptr(),
            type_: sys::STR_PARAM,
            param_pointer: self.0.get().cast(),
        }
    }
}

// SAFETY: all-zero is the terminator the core expects (no name).
pub const PARAMS_END: param_export_t = unsafe { std::mem::zeroed() };

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

/// A process the module adds to the server's; `run` is its life.
pub trait Process {
    fn run();
}

unsafe extern "C" fn run<P: Process>(_rank: c_int) {
    super::entry("process", (), P::run)
}

pub const PROC_FLAG_INITCHILD: c_uint = sys::PROC_FLAG_INITCHILD;

/// `no` processes running `P`; with [`PROC_FLAG_INITCHILD`] they run
/// child_init (the transports open their sockets there) first.
pub const fn process<P: Process>(name: &'static CStr, no: c_uint, flags: c_uint) -> proc_export_t {
    proc_export_t {
        name: name.as_ptr(),
        function: Some(run::<P>),
        no,
        flags,
        // SAFETY: all-zero is no pre- or post-fork function.
        ..unsafe { std::mem::zeroed() }
    }
}

// SAFETY: all-zero is the terminator the core expects (no name).
pub const PROCS_END: proc_export_t = unsafe { std::mem::zeroed() };

// SAFETY: all-zero is the terminator the core expects (no name).
pub const STATS_END: stat_export_t = unsafe { std::mem::zeroed() };
