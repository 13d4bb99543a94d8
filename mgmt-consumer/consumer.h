/* consumer.h -- vmproxy-consumer's configuration, shared by the consume
 * loop (main.c) and the query command (query.c). */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "broker.h"
#include "store.h"

#define MAX_HOSTS  16
#define MAX_SHARDS 1024

struct ccfg {
	struct broker_opts b;
	const char *hosts[MAX_HOSTS];
	uint64_t ports[MAX_HOSTS];
	size_t nhosts;
	const char *queue, *exchange, *binding_key, *dir, *listen, *log_level;
	bool declare, quorum;
	uint64_t prefetch, batch_ms, max_file_bytes, dedup_window, stale_after, max_message_bytes;
	uint64_t max_vms;
	/* sharded: queues SHARD_PREFIX0 .. SHARD_PREFIX(SHARDS-1); this is
	 * instance INSTANCE (1-based) of INSTANCES */
	const char *shard_prefix;
	uint64_t shards, instance, instances, others_after_ms;
	struct store_opts store;
	uint64_t retention_days;
};

/* The defaults of every key. */
void consumer_config_defaults(struct ccfg *c);

/* Read FILE into C (strings point into *ROOT, kept by the caller). On error
 * prints "vmproxy-consumer: FILE: KEY: ..." to stderr and returns -EINVAL. */
int consumer_parse_config(const char *file, struct ccfg *c, json_t **root);

/* The store's options once C->dir is final (the SQLite file defaults to
 * DIR/metrics.db, written into PATHBUF). */
const struct store_opts *consumer_store_options(struct ccfg *c, char *pathbuf, size_t len);
