/*
 * event_virtual: the contract between the C shim (src/shim.c) and the Rust
 * side of the module.
 *
 * The shim owns everything that needs OpenSIPS's macros: the module's
 * version and compile flags, the modparam table, shm_malloc/shm_free and
 * the LM_* log macros.  Rust owns the transport hooks and all the logic.
 * Both sides include nothing else from each other.
 */
#ifndef EVENT_VIRTUAL_SHIM_H
#define EVENT_VIRTUAL_SHIM_H

#include <stddef.h>

#include "sr_module.h"
#include "statistics.h"
#include "mi/mi.h"
#include "evi/evi_transport.h"

/* ---- defined in C (src/shim.c), used by Rust ---- */

/* ver_info strings, built from the OpenSIPS tree's own definitions */
extern const char evv_full_version[];
extern const char evv_compile_flags[];
extern const char evv_scm_type[];
extern const char evv_scm_rev[];

extern const param_export_t evv_params[];
extern const stat_export_t evv_stats[];
extern const mi_export_t evv_mi_cmds[];

int evv_mod_init(void);
void evv_destroy(void);

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

/* the module's statistics, in the order of evv_stats */
enum evv_stat {
	EVV_ST_EVENTS,
	EVV_ST_DELIVERED,
	EVV_ST_FAILED,
	EVV_ST_INCOMPLETE,
	EVV_ST_FAILOVERS,
	EVV_ST_UNKEYED,
	EVV_ST_NUM
};
void evv_stat_add(int which, unsigned long n);

/* Calls visit once for every live virtual subscription, of every event or
 * of the one named by filter, while that event's subscriber list is locked:
 * visit must only copy what it needs.  Returns -1 when filter names no
 * event, 0 otherwise. */
typedef void (*evv_visit_f)(void *arg, const str *event,
	evi_reply_sock *sock);
int evv_walk_virtual(const str *filter, evv_visit_f visit, void *arg);

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

/* ---- defined in Rust (src/ffi.rs), used by C ---- */

/* called from mod_init with the validated modparams; 0 on success */
int evv_rs_init(unsigned int failover_timeout_s);

evi_reply_sock *evv_rs_parse(str socket);
str evv_rs_print(evi_reply_sock *sock);
int evv_rs_match(evi_reply_sock *a, evi_reply_sock *b);
void evv_rs_free(evi_reply_sock *sock);
int evv_rs_raise(struct sip_msg *msg, str *ev_name, evi_reply_sock *sock,
	evi_params_t *params, evi_async_ctx_t *async_ctx);

/* MI event_virtual_list, without and with the "event" parameter */
mi_response_t *evv_rs_mi_list(const mi_params_t *params,
	struct mi_handler *async_hdl);
mi_response_t *evv_rs_mi_list_event(const mi_params_t *params,
	struct mi_handler *async_hdl);

/* MI event_virtual_hash: the subscription by its index among the event's
 * virtual subscriptions, or by its printed socket */
mi_response_t *evv_rs_mi_hash_index(const mi_params_t *params,
	struct mi_handler *async_hdl);
mi_response_t *evv_rs_mi_hash_socket(const mi_params_t *params,
	struct mi_handler *async_hdl);

#endif
