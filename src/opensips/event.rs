//! Events as the core raises them, and copies of them in shared memory
//! that a later report, in any process, raises again.

use std::ffi::{c_int, c_void};
use std::marker::PhantomData;
use std::ptr::{from_ref, null_mut};
use std::sync::atomic::{AtomicI32, Ordering};

use super::shm::{ShmRc, Tail, tail_offset};
use super::str::{self, str_};
use super::sys::{self, evi_params_t, sip_msg};

/// The SIP message an event is raised with: the core's, for the call that
/// gave it, or a dummy one.
#[derive(Clone, Copy)]
pub struct Msg(*mut sip_msg);

impl Msg {
    /// No message, for a report that raises nothing.
    pub fn none() -> Msg {
        Msg(null_mut())
    }
}

/// The core's dummy SIP message, for raises that no SIP message is
/// processed for (an asynchronous report); given back on drop.
pub struct DummyMsg(*mut sip_msg);

impl DummyMsg {
    pub fn new() -> DummyMsg {
        // SAFETY: no preconditions; null when out of memory, which
        // transports take as no message.
        DummyMsg(unsafe { sys::get_dummy_sip_msg() })
    }

    pub fn msg(&self) -> Msg {
        Msg(self.0)
    }
}

impl Drop for DummyMsg {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: ours, from get_dummy_sip_msg, given back once.
            unsafe { sys::release_dummy_sip_msg(self.0) }
        }
    }
}

/// One event as a transport's raise takes it, valid for `'a`.
#[derive(Clone, Copy)]
pub struct Event<'a> {
    msg: *mut sip_msg,
    name: *mut str_,
    params: *mut evi_params_t,
    life: PhantomData<&'a ()>,
}

impl<'a> Event<'a> {
    /// # Safety
    /// The core's raise arguments, each null or valid for `'a`.
    pub unsafe fn from_core(msg: *mut sip_msg, name: *mut str_, params: *mut evi_params_t) -> Self {
        Event {
            msg,
            name,
            params,
            life: PhantomData,
        }
    }

    /// The event kept in `copy`, raised with `msg`.
    pub fn from_copy(msg: Msg, copy: &'a EventCopy) -> Self {
        let head: &Copied = &copy.0;
        Event {
            msg: msg.0,
            // the core's raise takes a mutable pointer, but no transport
            // writes through it
            name: (&raw const head.name).cast_mut(),
            params: head.params,
            life: PhantomData,
        }
    }

    pub fn msg(&self) -> Msg {
        Msg(self.msg)
    }

    pub fn name(&self) -> &'a [u8] {
        // SAFETY: both constructors give a name that is null or valid for 'a.
        unsafe { self.name.as_ref().map(|n| str::bytes(n)) }.unwrap_or_default()
    }

    /// The value of the parameter called `name` (the first of that name):
    /// a string, or an integer; None when the event has no such parameter.
    pub fn param(&self, name: &[u8]) -> Option<ParamValue<'a>> {
        let (mut s, mut len, mut n) = (std::ptr::null(), 0, 0);
        let name_len = c_int::try_from(name.len()).ok()?;
        // SAFETY: the parameters are null or the event's, valid for 'a; the
        // shim only reads them, and points s into them.
        let kind = unsafe {
            sys::evv_param_value(
                self.params,
                name.as_ptr().cast(),
                name_len,
                &mut s,
                &mut len,
                &mut n,
            )
        };
        match kind as u32 {
            sys::evv_param_kind_EVV_PARAM_STR => {
                let value = str_ {
                    s: s.cast_mut(),
                    len,
                };
                // SAFETY: the string is the event's, valid for 'a.
                Some(ParamValue::Str(unsafe { str::bytes(&value) }))
            }
            sys::evv_param_kind_EVV_PARAM_INT => Some(ParamValue::Int(n)),
            _ => None,
        }
    }

    /// Its parameters that have a value, in order.
    pub fn params(&self) -> Params<'a> {
        Params {
            params: self.params,
            at: std::ptr::null(),
            life: PhantomData,
        }
    }

    pub(super) fn parts(&self) -> (*mut sip_msg, *mut str_, *mut evi_params_t) {
        (self.msg, self.name, self.params)
    }
}

/// An event parameter's value.
#[derive(Clone, Copy)]
pub enum ParamValue<'a> {
    Str(&'a [u8]),
    Int(i32),
}

/// An event's parameters: (name, value).
pub struct Params<'a> {
    params: *mut evi_params_t,
    at: *const std::ffi::c_void,
    life: PhantomData<&'a ()>,
}

impl<'a> Iterator for Params<'a> {
    type Item = (&'a [u8], ParamValue<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let (mut name, mut name_len) = (std::ptr::null(), 0);
        let (mut s, mut len, mut n) = (std::ptr::null(), 0, 0);
        // SAFETY: the parameters are null or the event's, valid for 'a;
        // `at` is null or one of them, as the shim left it; the shim only
        // reads them, and points name and s into them.
        let kind = unsafe {
            sys::evv_param_next(
                self.params,
                &mut self.at,
                &mut name,
                &mut name_len,
                &mut s,
                &mut len,
                &mut n,
            )
        };
        let str_of = |s: *const std::ffi::c_char, len| str_ { s: s.cast_mut(), len };
        // SAFETY: the name and the string are the event's, valid for 'a.
        let name = unsafe { str::bytes(&str_of(name, name_len)) };
        match kind as u32 {
            // SAFETY: as the name.
            sys::evv_param_kind_EVV_PARAM_STR => Some((name, ParamValue::Str(unsafe { str::bytes(&str_of(s, len)) }))),
            sys::evv_param_kind_EVV_PARAM_INT => Some((name, ParamValue::Int(n))),
            _ => None,
        }
    }
}

/// The name and parameters of an event, copied into shared memory: what
/// an asynchronous attempt carries, and what the spool holds and replays.
/// Clones share the copy.
#[derive(Clone)]
pub struct EventCopy(ShmRc<Copied>);

struct Copied {
    /// Points at the name's bytes, the block's payload.
    name: str_,
    params: *mut evi_params_t,
    /// When the copy was made, ms on the shared clock.
    born_ms: u64,
    /// The size of the parameters' block.
    params_size: usize,
}

impl Tail for Copied {}

impl Drop for Copied {
    fn drop(&mut self) {
        if !self.params.is_null() {
            // SAFETY: our copy, from evi_dup_shm_params, freed once.
            unsafe { sys::evi_free_shm_params(self.params) }
        }
    }
}

impl EventCopy {
    /// None when out of shared memory.
    pub fn new(event: &Event<'_>) -> Option<EventCopy> {
        Self::born(event, super::now_ms())
    }

    /// A copy of an event made of its parts (what a record kept), born at
    /// `born_ms`; None when out of memory or a part is too long for the core.
    pub fn rebuild(name: &[u8], params: &[(&[u8], ParamValue<'_>)], born_ms: u64) -> Option<Self> {
        let list = PkgParams::build(params)?;
        let mut name = str::of(name)?;
        // SAFETY: the list and the name are valid for the copy, which
        // copies what it needs; the list is freed after it.
        let event = unsafe { Event::from_core(null_mut(), &mut name, list.0) };
        Self::born(&event, born_ms)
    }

    fn born(event: &Event<'_>, born_ms: u64) -> Option<EventCopy> {
        let name = event.name();
        // SAFETY: the event's parameters are null or valid for its life.
        let params_size = unsafe { sys::evv_params_size(event.params) };
        let params = if event.params.is_null() {
            null_mut()
        } else {
            // SAFETY: the event's parameters are valid for its life.
            let dup = unsafe { sys::evi_dup_shm_params(event.params) };
            if dup.is_null() {
                return None;
            }
            dup
        };
        let head = Copied {
            name: str::EMPTY,
            params,
            born_ms,
            params_size,
        };
        let mut copy = ShmRc::new(head, name.len(), |t| t.copy_from_slice(name))?;
        let (head, tail) = copy.get_mut()?;
        head.name = str::of(tail)?;
        Some(EventCopy(copy))
    }

    /// When it was copied, ms on the shared clock.
    pub fn born_ms(&self) -> u64 {
        self.0.born_ms
    }

    /// The sizes of its shared-memory blocks: the copy with the name, and
    /// the parameters (0 without).
    pub fn blocks(&self) -> [usize; 2] {
        [
            tail_offset::<Copied>() + self.0.tail_len(),
            self.0.params_size,
        ]
    }
}

/// An event the module publishes (mod_init) and raises itself: the core
/// hands it to the script's `event_route` and to every subscriber.
pub struct Published(AtomicI32);

/// Parameters built in private memory from (name, value) pairs, borrowing
/// their bytes (the core keeps the pointers); freed when dropped, unless
/// handed to a raise, which frees them.
struct PkgParams<'a>(*mut evi_params_t, PhantomData<&'a ()>);

impl<'a> PkgParams<'a> {
    /// None when out of memory, or a part too long for the core.
    fn build(params: &'a [(&'a [u8], ParamValue<'a>)]) -> Option<Self> {
        // SAFETY: no preconditions; null when out of memory.
        let list = PkgParams(unsafe { sys::evi_get_params() }, PhantomData);
        if list.0.is_null() {
            return None;
        }
        for (pname, value) in params {
            let name = str::of(pname)?;
            let text;
            let (value, flags) = match value {
                ParamValue::Int(n) => (from_ref(n).cast::<c_void>(), sys::EVI_INT_VAL),
                ParamValue::Str(v) => {
                    text = str::of(v)?;
                    (from_ref(&text).cast(), sys::EVI_STR_VAL)
                }
            };
            // SAFETY: our list; the core copies the int and the str (whose
            // bytes, borrowed for 'a, outlive the list).
            if unsafe { sys::evi_param_add(list.0, &name, value, flags as c_int) } != 0 {
                return None;
            }
        }
        Some(list)
    }
}

impl Drop for PkgParams<'_> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: ours, from evi_get_params, never raised, freed once.
            unsafe { sys::evi_free_params(self.0) }
        }
    }
}

impl Published {
    pub const fn new() -> Published {
        Published(AtomicI32::new(-1))
    }

    /// mod_init, before the fork; false when the core refuses the name.
    pub fn publish(&self, name: &'static [u8]) -> bool {
        // SAFETY: the core keeps the name's pointer: it is static.
        let id = str::of(name).map_or(-1, |n| unsafe { sys::evi_publish_event(n) });
        self.0.store(id, Ordering::Relaxed);
        id >= 0
    }

    /// Raise it with `params`; false when not published, out of memory, or
    /// refused.  The core delivers it at once, under the event's lock
    /// (released around each subscriber): never from inside its delivery.
    pub fn raise(&self, params: &[(&[u8], ParamValue<'_>)]) -> bool {
        let id = self.0.load(Ordering::Relaxed);
        let Some(list) = (id >= 0).then(|| PkgParams::build(params)).flatten() else {
            return false;
        };
        let list = std::mem::ManuallyDrop::new(list);
        // SAFETY: a published id and our list, which the raise frees.
        unsafe { sys::evi_raise_event(id, list.0) == 0 }
    }
}
