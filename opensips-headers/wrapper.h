/*
 * What bindgen reads from the OpenSIPS tree named by OPENSIPS_SRC.
 * Only the types and functions the Rust FFI layer touches are kept
 * (see the allowlists in build.rs).
 */
#include "sr_module.h"
#include "evi/evi_transport.h"
#include "evi/event_interface.h"
#include "action.h"
#include "mi/item.h"

#include "../include/event_virtual.h"
