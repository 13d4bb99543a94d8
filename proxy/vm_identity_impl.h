/* vm_identity_impl.h -- private to vm_identity.c, vm_identity_cid.c,
 * vm_identity_addr.c and vm_identity_conn.c: struct vm_identity, its
 * caches and the libvirt helpers they share. Everything else uses
 * vm_identity.h. */
#pragma once

#include <libvirt/libvirt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "backoff.h"
#include "vm_identity.h"

#define MAX_CIDS 65536

struct static_entry {
	int family;
	uint8_t addr[16];
	struct vm_info vm;
};

struct cid_entry {
	uint32_t cid;
	unsigned int dom_id; /* the running domain's id: a restart changes it */
	struct vm_info vm;
};

/* CIDs that no running domain had at the last rescan. */
#define NO_CID_SLOTS 256
#define NO_CID_TTL_MS 10000
/* A miss on a cache that no event or failed proof has invalidated waits
 * this long after the previous rescan. */
#define RESCAN_MIN_MS 1000

struct no_cid {
	uint32_t cid;
	uint64_t until_ms;
};

/* Addresses whose lease scan found nothing are not scanned again for a
 * while: every scan costs one libvirt call per running domain on the
 * acceptor thread, and a guest must not be able to make the proxy pay that
 * on every connection attempt. A lifecycle event empties it. */
#define NO_LEASE_SLOTS 256
#define NO_LEASE_TTL_MS 10000

struct no_lease {
	int family;
	uint8_t addr[16];
	uint64_t until_ms;
};

/* Addresses a lease scan credited to a VM: served from here only while
 * libvirt is unreachable. Rebuilt on reconnect; a VM's entries go when it
 * stops. */
#define ADDR_SLOTS 1024

struct addr_known {
	int family; /* 0: empty */
	uint8_t addr[16];
	struct vm_info vm;
};

/* Domains whose devices changed, waiting for their CID to be read. */
#define DEV_PENDING 64


struct vm_identity {
	const struct proxy_config *cfg;
	virConnectPtr conn; /* under lock; lookups take a reference (get_conn) */
	atomic_bool connected;
	pthread_mutex_t lock;      /* conn, the caches below and the static table against
				    * readers other than the acceptor; never held across an RPC */
	pthread_mutex_t scan_lock; /* one CID rescan at a time; events never take it */
	struct no_lease no_lease[NO_LEASE_SLOTS];
	size_t no_lease_next;
	atomic_uint_fast64_t lease_scans, cid_rescans, libvirt_calls;
	struct no_cid no_cid[NO_CID_SLOTS];
	size_t no_cid_next;
	struct cid_entry *cids;
	size_t ncids;
	bool cids_valid;
	uint64_t generation; /* bumped by every lifecycle event */
	uint64_t last_rescan_ms;
	struct static_entry *statics;
	size_t nstatics;
	pthread_t ev_thread;
	bool ev_started;
	atomic_bool ev_stop;
	int ev_callback;
	int ev_timer;
	vm_gone_fn gone;
	void *gone_ud;
	struct addr_known addrs[ADDR_SLOTS];
	size_t addrs_next;
	char dev_pending[DEV_PENDING][VM_UUID_LEN + 1]; /* under lock: domains whose */
	size_t ndev;                                    /* devices changed */
	bool dev_overflow;
	int ev_dev_added, ev_dev_removed;
	/* The connection's life, kept by the event thread. */
	bool close_cb;
	struct backoff backoff;
	uint64_t down_since_ms, next_attempt_ms, last_fail_log_ms;
	unsigned attempts;
	atomic_uint_fast64_t disconnects, reconnects, reconnect_failures, served_down, refused_down;
};

/* vm_identity.c */
/* libvirt's last error message (never NULL). */
const char *vm_identity_virt_error(void);
/* A reference on the connection while it is up, else NULL. Dropped with
 * vm_identity_put_conn (an RPC when it is the last one: never under the
 * lock). Any thread. */
virConnectPtr vm_identity_get_conn(struct vm_identity *id);
/* Accepts NULL. */
void vm_identity_put_conn(virConnectPtr c);
/* After a failed RPC on C: was it the connection that failed? */
bool vm_identity_conn_lost(virConnectPtr c);
/* Fill VM from DOM: uuid, name, and the vsock CID from its XML. 0 or -EIO. */
int vm_identity_info_from_domain(struct vm_identity *id, virDomainPtr dom, struct vm_info *vm);
/* The domain NAME_OR_UUID: 0, -ENOENT, or -ENOTCONN when libvirt is
 * unreachable. */
int vm_identity_lookup_libvirt(struct vm_identity *id, const char *name_or_uuid,
			       struct vm_info *vm);
/* A numeric IPv4 or IPv6 address S as (family, 16 bytes). 0 or -EINVAL. */
int vm_identity_parse_addr(const char *s, int *family, uint8_t addr[16]);

/* vm_identity_cid.c */
/* Rebuild the CID cache from C's running domains. 0 or -errno. */
int vm_identity_rescan(struct vm_identity *id, virConnectPtr c);

/* vm_identity_conn.c */
/* Undo what the connection's setup registered on C (events, close
 * callback). */
void vm_identity_teardown_conn(struct vm_identity *id, virConnectPtr c);
