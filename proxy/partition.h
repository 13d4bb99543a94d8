/* partition.h -- the partition table: which poll thread owns each VM. All
 * connections of one VM go to the same thread; a new VM goes to the least
 * loaded thread. Used by the acceptor on accept and by poll threads when a
 * connection ends (never per message), under one mutex. */
#pragma once

#include <stdint.h>

struct partition;

/* NTHREADS poll threads, at most MAX_VMS VMs tracked at once. */
int partition_new(unsigned nthreads, uint32_t max_vms, struct partition **out);
void partition_free(struct partition *p);

/* Count one more connection of VM UUID and tell which thread serves it.
 * -EMFILE when the VM already has MAX_PER_VM connections, -ENOSPC when the
 * table is full. */
int partition_assign_conn(struct partition *p, const char *uuid, uint32_t max_per_vm,
			  unsigned *thread);

/* A connection of UUID ended; the entry goes when its last one does. */
void partition_release_conn(struct partition *p, const char *uuid);

/* The thread serving UUID, or -ENOENT. */
int partition_lookup(struct partition *p, const char *uuid, unsigned *thread);

/* Move UUID's entry to THREAD (after its connections were migrated). */
int partition_move_vm(struct partition *p, const char *uuid, unsigned thread);

/* Number of VMs and connections currently assigned to THREAD. */
void partition_thread_load(struct partition *p, unsigned thread, uint32_t *vms, uint32_t *conns);

/* Connections assigned across all threads. */
uint32_t partition_total_conns(struct partition *p);
