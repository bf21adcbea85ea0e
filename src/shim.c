/*
 * event_virtual: the thin C side of the module.
 *
 * Only what needs OpenSIPS's macros lives here: the version strings that
 * MODULE_VERSION would expand to (they must equal the core's, so this file
 * is compiled with the tree's own definitions), the LM_* log macros,
 * shm_malloc/shm_free, update_stat and the locks of the core's events.
 * The module's declaration is in Rust (src/module/exports.rs): rustc only
 * exports Rust-defined symbols from a cdylib.
 */
#include <time.h>

#include "sr_module.h"
#include "dprint.h"
#include "version.h"
#include "mem/shm_mem.h"
#include "mem/rpm_mem.h"
#include "locking.h"
#include "evi/evi_transport.h"
#include "evi/event_interface.h"
#include "evi/evi_params.h"
#include "globals.h"

#include "event_virtual.h"

const char evv_full_version[] = OPENSIPS_FULL_VERSION;
const char evv_compile_flags[] = OPENSIPS_COMPILE_FLAGS;
const char evv_scm_type[] = VERSIONTYPE;
const char evv_scm_rev[] = THISREVISION;

_Static_assert(EVV_L_ERR == L_ERR && EVV_L_WARN == L_WARN &&
	EVV_L_NOTICE == L_NOTICE && EVV_L_INFO == L_INFO && EVV_L_DBG == L_DBG,
	"include/event_virtual.h log levels differ from dprint.h");

unsigned long evv_shm_total(void)
{
	return shm_mem_size;
}

/* what evi_dup_shm_params allocates for these parameters */
size_t evv_params_size(const evi_params_t *params)
{
	const evi_param_t *p;
	size_t size = sizeof(evi_params_t);

	if (!params)
		return 0;
	for (p = params->first; p; p = p->next) {
		size += sizeof(evi_param_t) + p->name.len;
		if (p->flags & EVI_STR_VAL)
			size += p->val.s.len;
	}
	return size;
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

void evv_stat_update(stat_var *var, long n)
{
	if (var)
		update_stat(var, n);
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

int evv_param_next(const evi_params_t *params, const void **it,
	const char **name, int *name_len, const char **s, int *len, int *n)
{
	const evi_param_t *p;

	if (!params)
		return EVV_PARAM_NONE;
	for (p = *it ? ((const evi_param_t *)*it)->next : params->first; p;
			p = p->next) {
		if (!(p->flags & (EVI_STR_VAL|EVI_INT_VAL)))
			continue;
		*it = p;
		*name = p->name.s;
		*name_len = p->name.len;
		if (p->flags & EVI_STR_VAL) {
			*s = p->val.s.s;
			*len = p->val.s.len;
			return EVV_PARAM_STR;
		}
		*n = p->val.n;
		return EVV_PARAM_INT;
	}
	return EVV_PARAM_NONE;
}

int evv_rpm_block(char *key, unsigned long size, void **block)
{
	unsigned long *b;

	if (rpm_init_mem() < 0)
		return -1;
	b = rpm_key_get(key);
	if (b) {
		*block = b;
		return 1;
	}
	b = rpm_malloc(sizeof *b + size);
	if (!b)
		return -2;
	b[0] = size;
	if (rpm_key_set(key, b) < 0) {
		rpm_free(b);
		return -2;
	}
	*block = b;
	return 0;
}

unsigned long evv_rpm_size(void)
{
	return rpm_mem_size;
}

/* the core's events; no header declares them */
extern evi_event_t *events;
extern int events_no;

/* the core's test for a subscription it will remove at its next walk */
static int evv_expired(const evi_reply_sock *sock, long now)
{
	return !(sock->flags & EVI_PENDING) && (sock->flags & EVI_EXPIRE) &&
		sock->subscription_time + sock->expire < now;
}

int evv_walk_subscriptions(const str *filter, const evi_export_t *trans,
	evv_visit_f visit, void *arg)
{
	evi_subs_p subs;
	int i, found = 0;
	long now = time(NULL);

	for (i = 0; i < events_no; i++) {
		if (filter && (filter->len != events[i].name.len ||
				memcmp(filter->s, events[i].name.s, filter->len)))
			continue;
		found = 1;
		/* what has expired is not live, so it is not listed; it is left
		 * for the core to remove (its raise does), since the core's own
		 * removal walk (evi_remove_expired_subs) cuts live subscribers
		 * out of the list on 3.4 */
		lock_get(events[i].lock);
		for (subs = events[i].subscribers; subs; subs = subs->next)
			if (subs->trans_mod == trans && subs->reply_sock &&
					!evv_expired(subs->reply_sock, now))
				visit(arg, &events[i].name, subs->reply_sock);
		lock_release(events[i].lock);
	}
	return (filter && !found) ? -1 : 0;
}
