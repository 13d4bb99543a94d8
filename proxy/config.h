/* config.h -- vmproxyd's configuration: the JSON file's schema as a struct,
 * loaded and validated in one place (docs/configuration.md). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "broker.h"

enum listener_type {
	LISTENER_TCP,
	LISTENER_VSOCK,
	LISTENER_UNIX,
	LISTENER_FIRECRACKER, /* a unix listener on "<uds_path>_<port>" */
};

struct listener_config {
	enum listener_type type;
	char *address; /* tcp: bind address, default "0.0.0.0" */
	uint32_t port; /* tcp, vsock and firecracker; default 5672 */
	char *path;    /* unix: socket path; firecracker: "<uds_path>_<port>" */
	char *uds_path; /* firecracker: the VM's vsock uds_path */
	char *vm;      /* unix, firecracker: the VM (name or uuid) the socket belongs to */
	char *uuid;    /* unix, firecracker: the VM's uuid, taken as is (no lookup) */
	unsigned mode; /* unix, firecracker: socket file mode, default 0660 */
	char *group;   /* unix, firecracker: socket file group (name), default the daemon's */
};

struct static_identity {
	char *address; /* numeric IPv4 or IPv6 source address */
	char *vm;      /* name (or uuid) of the VM */
	char *uuid;    /* optional; required when no libvirt_uri resolves vm */
};

enum unknown_peers {
	UNKNOWN_PEERS_REJECT,
	UNKNOWN_PEERS_BY_ADDRESS, /* identify by the address itself (uuid derived from it) */
};

/* One broker node of upstream.hosts. */
struct upstream_host {
	char *host;
	uint16_t port;	   /* default as upstream.port */
	char *server_name; /* TLS name to verify; NULL: host */
};

struct proxy_config {
	char *file;

	struct listener_config *listeners;
	size_t n_listeners;

	struct {
		char *libvirt_uri; /* NULL: no libvirt */
		bool libvirt_read_write; /* default false: a read-only connection */
		struct static_identity *statics;
		size_t n_statics;
		enum unknown_peers unknown_peers;
	} identity;

	struct {
		unsigned count; /* 0: one per CPU in the affinity mask */
		int *cpus;	/* NULL: the affinity mask's CPUs in order */
		size_t n_cpus;
	} threads;

	struct {
		/* upstream.hosts, or the single host/port as a list of one. A
		 * host's links start on consecutive nodes from one that depends
		 * on the host name; see upstream.c:next_node_delay for failover. */
		struct upstream_host *hosts;
		size_t n_hosts;
		char *host;    /* hosts[0].host */
		uint16_t port; /* default 5671 with tls, 5672 without */
		char *vhost;   /* default "/" */
		bool tls;      /* true when the "tls" object is present */
		char *ca;
		char *cert;
		char *key;
		bool verify_hostname; /* default true */
		enum broker_auth mechanism;
		char *user;
		char *password;
		char *exchange;		     /* required */
		uint16_t heartbeat;	     /* seconds, default 30 */
		uint32_t connect_timeout_ms; /* default 10000 */
		uint32_t stuck_timeout_ms;   /* watchdog: unwritable this long -> shutdown; 30000 */
		uint32_t max_in_flight;	     /* published, unconfirmed messages per link; 256 */
	} upstream;

	struct {
		char **allowed_exchanges; /* NULL-terminated; default { "metrics", NULL } */
		uint64_t max_message_bytes;	/* default 1 MiB, at most 128 MiB */
		uint16_t channel_max;		/* default 64 */
		uint32_t max_connections_per_vm; /* default 16 */
		uint16_t heartbeat;		/* default 60 */
		uint32_t handshake_timeout_ms;	/* default 10000 */
	} guest;

	/* Per-VM inboxes: the broker queue "vm.<uuid>.inbox", bound to
	 * exchange with "<uuid>.#", that a guest consumes as NAME. */
	struct {
		bool enabled;		    /* default true */
		char *name;		    /* the guest's queue name; default "inbox" */
		char *exchange;		    /* default "vm.control" */
		bool quorum;		    /* queue_type "quorum"; default "classic" */
		uint32_t max_length;	    /* messages; default 1000 */
		uint32_t message_ttl_ms;    /* default 86400000 (a day) */
		uint16_t max_prefetch;	    /* per consumer (and for prefetch 0); default 100 */
		uint16_t max_consumers;	    /* per guest connection; default 4 */
		uint64_t max_message_bytes; /* larger deliveries are rejected; default 64 KiB */
	} inbox;

	struct {
		uint64_t unconfirmed_bytes_per_vm;     /* default 8 MiB */
		uint64_t unconfirmed_bytes_per_thread; /* default 64 MiB */
		uint32_t max_connections;	       /* whole daemon, default 65536 */
		uint32_t max_pending_lookups; /* identity lookups waiting on libvirt, default 256 */
	} limits;

	struct {
		char *socket; /* NULL: no admin socket */
		char *group;  /* NULL: root only */
	} admin;

	/* Sections parsed by their own modules (balancer.c, metrics.c), kept as
	 * owned references; NULL when absent. */
	json_t *balancer_raw;
	json_t *metrics_raw;

	uint32_t drain_timeout_ms; /* "drain_timeout_ms", SIGTERM wait for confirms; 10000 */
	char *log_level;	   /* "log_level": error|warn|info|debug, default info */
	char *hostname;		   /* "hostname": x-vmproxy-host; default gethostname() */

	json_t *raw; /* the whole file as loaded, for comparing at a reload */
};

/* Load and validate FILE. On error returns -EINVAL (or -errno) and writes
 * "FILE: key.path: what was expected" into ERR; nothing to free then. */
int proxy_config_load(const char *file, struct proxy_config **out, char *err, size_t errlen);

/* What a reload (SIGHUP) cannot apply: the first top-level key (or
 * "metrics.listen", "identity.static", "guest.max_message_bytes") whose
 * value differs between OLD and NEW and needs a restart, written into KEY;
 * returns true then. Reloadable: log_level, guest (but max_message_bytes),
 * balancer, metrics.per_vm, drain_timeout_ms, and entries appended to
 * identity.static. */
bool proxy_config_restart_key(const struct proxy_config *old, const struct proxy_config *new,
			      char *key, size_t keylen);

/* Accepts NULL. */
void proxy_config_free(struct proxy_config *c);
