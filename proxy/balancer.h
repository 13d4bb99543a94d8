/* balancer.h -- deciding which whole VMs to move between poll threads when
 * one thread's load exceeds another's by a configured ratio for a configured
 * time. Pure decisions from sampled loads; the daemon samples (by query
 * mail) and carries out the moves (by migration mail). */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "conf.h"
#include "vm_identity.h"

struct balancer_config {
	bool enabled;		     /* default true */
	uint32_t interval_ms;	     /* sampling period, default 5000 */
	double ratio;		     /* busiest / idlest beyond which to act, default 1.5 */
	uint32_t hold_ms;	     /* imbalance must last this long, default 10000 */
	double min_load;	     /* below this busiest load (msgs/s) nothing moves; 50 */
	uint32_t migrate_timeout_ms; /* quiesce bound before a move is abandoned; 5000 */
};

/* Defaults, then the "balancer" object of the config file (may be NULL). */
int balancer_config_parse(struct conf_ctx *c, json_t *obj, struct balancer_config *out);

struct bal_vm {
	char uuid[VM_UUID_LEN + 1];
	double load; /* messages/s */
};

struct bal_thread {
	unsigned id;
	double load; /* sum of its VMs' loads */
	const struct bal_vm *vms;
	size_t nvms;
};

struct bal_move {
	char uuid[VM_UUID_LEN + 1];
	unsigned from, to;
};

/* One decision over the current loads, ignoring time: at most one move
 * from the busiest thread to the idlest, of the VM that best halves the
 * gap without reversing it. Returns 1 with *MOVE filled, or 0. */
int balancer_plan(const struct balancer_config *cfg, const struct bal_thread *threads, size_t n,
		  struct bal_move *move);

struct balancer {
	struct balancer_config cfg;
	uint64_t imbalanced_since; /* 0: balanced at the last step */
};

void balancer_init(struct balancer *b, const struct balancer_config *cfg);

/* balancer_plan with the hold time applied: a move is returned only when
 * the imbalance has lasted hold_ms at NOW_MS. */
int balancer_step(struct balancer *b, const struct bal_thread *threads, size_t n, uint64_t now_ms,
		  struct bal_move *move);
