/*
 * What bindgen reads from the OpenSIPS tree named by OPENSIPS_SRC.
 * Only the types and functions the wrapper layer (src/opensips/) touches
 * are kept (see the allowlists in build.rs).
 */
#include "sr_module.h"
#include "evi/evi_transport.h"
#include "evi/event_interface.h"
#include "evi/evi_modules.h"
#include "action.h"
#include "mi/mi.h"
#include "mi/item.h"
#include "statistics.h"
/* the clusterer's API and its bin packets (issue 18: src/opensips/cluster.rs) */
#include "bin_interface.h"
#include "modules/clusterer/api.h"

#include "../include/event_virtual.h"
