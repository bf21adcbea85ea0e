/*
 * event_virtual: the contract between the C shim (src/shim.c) and the Rust
 * side of the module (src/opensips/, the wrapper layer over OpenSIPS).
 *
 * The shim holds only what needs OpenSIPS's macros: the version strings,
 * the LM_* log macros, shm_malloc/shm_free, update_stat and the locked
 * walk over the core's events.  The module's declaration (parameters,
 * statistics, MI commands, process, transport, init and destroy,
 * `exports`) is in Rust (src/module/exports.rs).  C calls nothing in Rust
 * but through the pointers that declaration gives the core.
 */
#ifndef EVENT_VIRTUAL_SHIM_H
#define EVENT_VIRTUAL_SHIM_H

#include <stddef.h>

#include "sr_module.h"
#include "statistics.h"
#include "evi/evi_transport.h"
#include "evi/evi_params.h"

/* ---- defined in C (src/shim.c), used by Rust ---- */

/* ver_info strings, built from the OpenSIPS tree's own definitions */
extern const char evv_full_version[];
extern const char evv_compile_flags[];
extern const char evv_scm_type[];
extern const char evv_scm_rev[];

/* log levels, the values of OpenSIPS's L_* constants */
enum evv_log_level {
	EVV_L_ERR = -1,
	EVV_L_WARN = 1,
	EVV_L_NOTICE = 2,
	EVV_L_INFO = 3,
	EVV_L_DBG = 4,
};

/* one log line through LM_*; msg need not be NUL terminated */
void evv_log(int level, const char *msg, int len);
/* whether a line at this level would be printed now (log_level can change
 * at run time, so this is asked every time) */
int evv_log_enabled(int level);

void *evv_shm_malloc(size_t size);
void evv_shm_free(void *p);

/* update_stat on a registered statistic; var may be NULL (not registered) */
void evv_stat_update(stat_var *var, long n);

/* The parameter after *it (the first when *it is NULL) that has a value:
 * its kind (EVV_PARAM_NONE after the last), its name and its value; *it
 * moves to it. */
int evv_param_next(const evi_params_t *params, const void **it,
	const char **name, int *name_len, const char **s, int *len, int *n);

/* The restart-persistent block stored under key (rpm_key_get): 1 and the
 * one a previous run left, else 0 and a new one of size bytes after its
 * size word; -1 when restart persistency is unavailable (rpm_init_mem
 * failed), -2 when it has no room.  The block starts with an unsigned long,
 * the size of what follows.  mod_init only: rpm_malloc is not crash-safe. */
int evv_rpm_block(char *key, unsigned long size, void **block);
/* restart_persistency_size, in bytes */
unsigned long evv_rpm_size(void);

/* Calls visit once for every live subscription (expired ones are skipped,
 * not removed) through transport trans, of
 * every event or of the one named by filter, while that event's subscriber
 * list is locked: visit must only copy what it needs.  Returns -1 when
 * filter names no event, 0 otherwise. */
typedef void (*evv_visit_f)(void *arg, const str *event,
	evi_reply_sock *sock);
int evv_walk_subscriptions(const str *filter, const evi_export_t *trans,
	evv_visit_f visit, void *arg);

/* The value of the event parameter called name (name_len bytes): returns
 * EVV_PARAM_STR with *s and *len set to the string (the core's, valid for
 * the raise), EVV_PARAM_INT with *n set, or EVV_PARAM_NONE when no
 * parameter has that name (or it has neither kind of value).  The first
 * parameter of that name counts.  Allocates nothing, takes no lock. */
enum evv_param_kind {
	EVV_PARAM_NONE = 0,
	EVV_PARAM_STR = 1,
	EVV_PARAM_INT = 2,
};
int evv_param_value(const evi_params_t *params, const char *name,
	int name_len, const char **s, int *len, int *n);

/* the size of shared memory, and of evi_dup_shm_params' copy */
unsigned long evv_shm_total(void);
size_t evv_params_size(const evi_params_t *params);

#endif
