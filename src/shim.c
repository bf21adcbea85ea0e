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
#include "locking.h"
#include "evi/evi_transport.h"
#include "evi/event_interface.h"

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

static stat_var *evv_stat_vars[EVV_ST_NUM];

const stat_export_t evv_stats[] = {
	{"events", 0, &evv_stat_vars[EVV_ST_EVENTS]},
	{"events_delivered", 0, &evv_stat_vars[EVV_ST_DELIVERED]},
	{"events_failed", 0, &evv_stat_vars[EVV_ST_FAILED]},
	{"events_incomplete", 0, &evv_stat_vars[EVV_ST_INCOMPLETE]},
	{"failovers", 0, &evv_stat_vars[EVV_ST_FAILOVERS]},
	{"events_unkeyed", 0, &evv_stat_vars[EVV_ST_UNKEYED]},
	{0, 0, 0}
};

const mi_export_t evv_mi_cmds[] = {
	{"event_virtual_list", "lists the virtual subscriptions, their "
		"subscribers' health and counters", 0, 0, {
		{evv_rs_mi_list, {0}},
		{evv_rs_mi_list_event, {"event", 0}},
		{EMPTY_MI_RECIPE}}
	},
	{"event_virtual_hash", "where a value of a HASH subscription's "
		"parameter goes now, and the order it would fail over in", 0, 0, {
		{evv_rs_mi_hash_index, {"event", "index", "value", 0}},
		{evv_rs_mi_hash_socket, {"event", "socket", "value", 0}},
		{EMPTY_MI_RECIPE}}
	},
	{EMPTY_MI_EXPORT}
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

void evv_stat_add(int which, unsigned long n)
{
	if (which >= 0 && which < EVV_ST_NUM && evv_stat_vars[which])
		update_stat(evv_stat_vars[which], n);
}

int evv_param_value(const evi_params_t *params, const char *name,
	int name_len, const char **s, int *len, int *n)
{
	evi_param_p p;

	if (!params)
		return EVV_PARAM_NONE;
	for (p = params->first; p; p = p->next) {
		if (!p->name.s || p->name.len != name_len ||
				memcmp(p->name.s, name, name_len))
			continue;
		if (p->flags & EVI_STR_VAL) {
			*s = p->val.s.s;
			*len = p->val.s.len;
			return EVV_PARAM_STR;
		}
		if (p->flags & EVI_INT_VAL) {
			*n = p->val.n;
			return EVV_PARAM_INT;
		}
		return EVV_PARAM_NONE;
	}
	return EVV_PARAM_NONE;
}

/* the core's events; no header declares them */
extern evi_event_t *events;
extern int events_no;
void evi_remove_expired_subs(event_id_t id);

int evv_walk_virtual(const str *filter, evv_visit_f visit, void *arg)
{
	evi_subs_p subs;
	int i, found = 0;

	for (i = 0; i < events_no; i++) {
		if (filter && (filter->len != events[i].name.len ||
				memcmp(filter->s, events[i].name.s, filter->len)))
			continue;
		found = 1;
		/* what has expired is not live: drop it first, as the core's own
		 * subscribers_list does */
		evi_remove_expired_subs(events[i].id);
		lock_get(events[i].lock);
		for (subs = events[i].subscribers; subs; subs = subs->next)
			if (subs->trans_mod == &evv_transport && subs->reply_sock)
				visit(arg, &events[i].name, subs->reply_sock);
		lock_release(events[i].lock);
	}
	return (filter && !found) ? -1 : 0;
}
