/*
 * event_virtual: the thin C side of the module.
 *
 * Only what needs OpenSIPS's macros lives here: the version strings that
 * MODULE_VERSION would expand to (they must equal the core's, so this file
 * is compiled with the tree's own definitions), the modparam table,
 * mod_init/destroy, shm_malloc/shm_free and the LM_* log macros.  The
 * `exports` symbol itself is defined in Rust (src/ffi.rs): rustc only
 * exports Rust-defined symbols from a cdylib.
 */
#include "sr_module.h"
#include "dprint.h"
#include "version.h"
#include "mem/shm_mem.h"
#include "evi/evi_transport.h"

#include "event_virtual.h"

#define EVV_PROTO "virtual"
/* the transport id flag the C module registers with, kept for drop-in use */
#define EVV_FLAG (1 << 24)

const char evv_full_version[] = OPENSIPS_FULL_VERSION;
const char evv_compile_flags[] = OPENSIPS_COMPILE_FLAGS;
const char evv_scm_type[] = VERSIONTYPE;
const char evv_scm_rev[] = THISREVISION;

_Static_assert(EVV_L_ERR == L_ERR && EVV_L_WARN == L_WARN &&
	EVV_L_NOTICE == L_NOTICE && EVV_L_INFO == L_INFO && EVV_L_DBG == L_DBG,
	"include/event_virtual.h log levels differ from dprint.h");

static int failover_timeout = 30;

const param_export_t evv_params[] = {
	{"failover_timeout", INT_PARAM, &failover_timeout},
	{0, 0, 0}
};

static const evi_export_t evv_transport = {
	{EVV_PROTO, sizeof(EVV_PROTO) - 1},
	evv_rs_raise,
	evv_rs_parse,
	evv_rs_match,
	evv_rs_free,
	evv_rs_print,
	EVV_FLAG
};

int evv_mod_init(void)
{
	LM_NOTICE("initializing module ...\n");

	if (failover_timeout < 0) {
		LM_ERR("failover_timeout must be 0 or more seconds, not %d\n",
			failover_timeout);
		return -1;
	}

	if (evv_rs_init((unsigned int)failover_timeout) != 0)
		return -1;

	if (register_event_mod(&evv_transport)) {
		LM_ERR("cannot register the '" EVV_PROTO "' event transport\n");
		return -1;
	}
	return 0;
}

void evv_destroy(void)
{
	/* every virtual socket belongs to a core subscription and is released
	 * through evv_rs_free; nothing module-wide is left to free */
	LM_NOTICE("destroying module ...\n");
}

void evv_log(int level, const char *msg, int len)
{
	switch (level) {
	case EVV_L_ERR:
		LM_ERR("%.*s\n", len, msg);
		break;
	case EVV_L_WARN:
		LM_WARN("%.*s\n", len, msg);
		break;
	case EVV_L_NOTICE:
		LM_NOTICE("%.*s\n", len, msg);
		break;
	case EVV_L_INFO:
		LM_INFO("%.*s\n", len, msg);
		break;
	default:
		LM_DBG("%.*s\n", len, msg);
		break;
	}
}

int evv_log_enabled(int level)
{
	return is_printable(level);
}

void *evv_shm_malloc(size_t size)
{
	return shm_malloc(size);
}

void evv_shm_free(void *p)
{
	shm_free(p);
}
