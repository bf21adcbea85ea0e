//! MI responses and parameters, and the handlers a module exports.

use std::ffi::{CStr, c_char, c_int};
use std::marker::PhantomData;
use std::ptr::{null, null_mut};

use super::entry;
use super::str::{self, str_};
use super::sys::{self, mi_export_t, mi_handler, mi_params_t, mi_response_t};

/// An MI response, handed to the core.
pub struct Response(*mut mi_response_t);

/// An add that failed (out of memory); the response is abandoned.
pub struct Full;

/// An item of a response under construction.
pub struct Item(*mut sys::mi_item_t);

fn name(name: &str) -> (*mut c_char, c_int) {
    (name.as_ptr().cast_mut().cast(), name.len() as c_int)
}

fn checked(item: *mut sys::mi_item_t) -> Result<Item, Full> {
    if item.is_null() {
        Err(Full)
    } else {
        Ok(Item(item))
    }
}

impl Item {
    pub fn array(&self, key: &str) -> Result<Item, Full> {
        let (n, l) = name(key);
        // SAFETY: self is a live item of a response under construction.
        checked(unsafe { sys::add_mi_array(self.0, n, l) })
    }

    /// A named object.
    pub fn object(&self, key: &str) -> Result<Item, Full> {
        let (n, l) = name(key);
        // SAFETY: as for array.
        checked(unsafe { sys::add_mi_object(self.0, n, l) })
    }

    /// A nameless object, for an array.
    pub fn element(&self) -> Result<Item, Full> {
        // SAFETY: as for array.
        checked(unsafe { sys::add_mi_object(self.0, null_mut(), 0) })
    }

    pub fn string(&self, key: &str, value: &[u8]) -> Result<(), Full> {
        let (n, l) = name(key);
        let len = c_int::try_from(value.len()).map_err(|_| Full)?;
        // SAFETY: as for array; the core copies the value.
        let rc = unsafe { sys::add_mi_string(self.0, n, l, value.as_ptr().cast_mut().cast(), len) };
        if rc < 0 { Err(Full) } else { Ok(()) }
    }

    pub fn number(&self, key: &str, value: f64) -> Result<(), Full> {
        let (n, l) = name(key);
        // SAFETY: as for array.
        let rc = unsafe { sys::add_mi_number(self.0, n, l, value) };
        if rc < 0 { Err(Full) } else { Ok(()) }
    }
}

impl Response {
    /// A result object built by `build`; Err when it ran out of memory.
    pub fn result(build: impl FnOnce(&Item) -> Result<(), Full>) -> Result<Response, Full> {
        let mut root: *mut sys::mi_item_t = null_mut();
        // SAFETY: builds a new response; root is set to its top object.
        let resp = unsafe { sys::init_mi_result_object(&mut root) };
        if resp.is_null() {
            return Err(Full);
        }
        if build(&Item(root)).is_err() {
            // SAFETY: the response is ours and unsent.
            unsafe { sys::free_mi_response(resp) };
            return Err(Full);
        }
        Ok(Response(resp))
    }

    pub fn error(code: c_int, msg: &str) -> Response {
        let len = c_int::try_from(msg.len()).unwrap_or(0);
        // SAFETY: the core copies msg.
        Response(unsafe { sys::init_mi_error_extra(code, msg.as_ptr().cast(), len, null(), 0) })
    }
}

/// The parameters of an MI call, valid for the call.
#[derive(Clone, Copy)]
pub struct Params<'a>(*const mi_params_t, PhantomData<&'a mi_params_t>);

impl<'a> Params<'a> {
    /// A string parameter; None when missing or not a string.
    pub fn string(self, key: &CStr) -> Option<&'a [u8]> {
        let mut s: *mut c_char = null_mut();
        let mut len: c_int = 0;
        // SAFETY: params are the core's for this call (the handler that
        // asks has this parameter in its recipe); s and len are set to
        // the parameter's bytes, valid for the call.
        let rc =
            unsafe { sys::get_mi_string_param(self.0, key.as_ptr().cast_mut(), &mut s, &mut len) };
        // SAFETY: as above.
        (rc >= 0).then(|| unsafe { str::bytes(&str_ { s, len }) })
    }
}

impl Params<'_> {
    /// An integer parameter; None when missing or not an integer.
    pub fn int(self, key: &CStr) -> Option<i32> {
        let mut n: c_int = 0;
        // SAFETY: as for string; n is set to the parameter's value.
        let rc = unsafe { sys::get_mi_int_param(self.0, key.as_ptr().cast_mut(), &mut n) };
        (rc >= 0).then_some(n)
    }
}

/// One way to call an MI command.
pub trait Handler {
    fn call(params: Params<'_>) -> Response;
}

unsafe extern "C" fn handle<H: Handler>(
    params: *const mi_params_t,
    _async_hdl: *mut mi_handler,
) -> *mut mi_response_t {
    entry("MI command", null_mut(), || {
        H::call(Params(params, PhantomData)).0
    })
}

/// A recipe of an MI command: its handler and named parameters.
pub struct Recipe {
    cmd: sys::mi_recipe_t,
}

impl Recipe {
    pub const fn new<H: Handler>(params: &[&'static CStr]) -> Recipe {
        // SAFETY: an all-zero recipe is the C terminator: no handler, no
        // parameters.
        let mut cmd: sys::mi_recipe_t = unsafe { std::mem::zeroed() };
        cmd.cmd = Some(handle::<H>);
        let mut i = 0;
        while i < params.len() {
            cmd.params[i] = params[i].as_ptr().cast_mut();
            i += 1;
        }
        Recipe { cmd }
    }
}

/// The terminator of a command table.
// SAFETY: an all-zero entry is EMPTY_MI_EXPORT.
pub const END: mi_export_t = unsafe { std::mem::zeroed() };

/// One MI command.  Its fields differ between OpenSIPS releases (aliases,
/// the number of parameters), so unset ones are zero, as in C.
pub const fn command<const R: usize>(
    name: &'static CStr,
    help: &'static CStr,
    recipes: [Recipe; R],
) -> mi_export_t {
    let mut cmd = END;
    cmd.name = name.as_ptr().cast_mut();
    cmd.help = help.as_ptr().cast_mut();
    let mut i = 0;
    while i < R {
        cmd.recipes[i] = recipes[i].cmd;
        i += 1;
    }
    cmd
}
