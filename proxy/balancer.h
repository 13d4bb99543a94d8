/* balancer.h -- deciding which whole VMs to move between poll threads when
 * one thread's load exceeds another's by a configured ratio for a configured
 * time: rates from successive samples of the threads' reports, then pure
 * decisions from those loads. The daemon samples (poll_threads_query) and
 * carries out the moves (poll_thread_migrate). */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "conf.h"
#include "poll_thread.h"
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
	double from_load, to_load; /* the two threads' loads, for the log */
};

/* One decision over the current loads, ignoring time: at most one move
 * from the busiest thread to the idlest, of the VM that best halves the
 * gap without reversing it. Returns 1 with *MOVE filled, or 0. */
int balancer_plan(const struct balancer_config *cfg, const struct bal_thread *threads, size_t n,
		  struct bal_move *move);

/* A VM's messages_in at the previous sample. */
struct bal_prev {
	char uuid[VM_UUID_LEN + 1];
	uint64_t messages_in;
};

struct balancer {
	struct balancer_config cfg;
	uint64_t imbalanced_since; /* 0: balanced at the last step */
	uint64_t last_sample_ms;   /* 0: no sample yet */
	struct bal_prev *prev;	   /* sorted by uuid */
	size_t nprev;
};

void balancer_init(struct balancer *b, const struct balancer_config *cfg);

/* Free what the samples keep. Accepts a balancer never sampled. */
void balancer_free(struct balancer *b);

/* balancer_plan with the hold time applied: a move is returned only when
 * the imbalance has lasted hold_ms at NOW_MS. */
int balancer_step(struct balancer *b, const struct bal_thread *threads, size_t n, uint64_t now_ms,
		  struct bal_move *move);

/* One poll thread's rates between two of its reports (the admin socket's
 * "load"), and its gauges at the newer one. */
struct thread_rates {
	double messages_in_per_s, bytes_in_per_s, messages_out_per_s, bytes_out_per_s;
	double cpu_percent;
	uint64_t connections, held_messages, held_bytes, loop_max_us;
};

/* The rates of the N reports R against PREV (NPREV reports, DT seconds
 * earlier; a thread missing there counts from zero) into OUT[0..N). */
void balancer_thread_rates(const struct poll_report *r, const struct poll_report *prev,
			   unsigned nprev, unsigned n, double dt, struct thread_rates *out);

/* A sample of the N poll threads' REPORTS (thread order, with their VM
 * lists) at NOW_MS: a VM's load is its messages_in per second since the
 * previous sample (0 when it was not in it or its counter went back, as
 * after a move), a thread's the sum of its VMs'; then balancer_step. The
 * first sample only records. Returns 1 with *MOVE filled, 0, or -ENOMEM
 * (the sample is not recorded). */
int balancer_observe(struct balancer *b, const struct poll_report *reports, unsigned n,
		     uint64_t now_ms, struct bal_move *move);
