/* vm_identity.h -- who is behind a guest connection: vsock CID, source
 * address or per-VM socket mapped to a VM (uuid, name) through the static
 * table or libvirt, with a cache kept fresh by libvirt lifecycle events.
 * Thread-safe; lookups may block on libvirt RPCs, so never call them from a
 * poll thread.
 *
 * The libvirt connection has keepalive and a close callback; once it is
 * lost, the event thread reopens it with backoff. Meanwhile lookups serve
 * the CIDs and leased addresses already in the caches as last seen, and
 * return -ENOTCONN for anything else; on reconnect the caches are rebuilt,
 * lifecycle events registered again, and the VMs known before that no
 * longer run are reported gone. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include "config.h"

#define VM_UUID_LEN 36
#define VM_NAME_MAX 128

struct vm_info {
	char uuid[VM_UUID_LEN + 1]; /* canonical lower-case 8-4-4-4-12 */
	char name[VM_NAME_MAX];	    /* libvirt domain name, or the static "vm" */
	uint32_t cid;		    /* vsock CID, 0 when none */
};

struct vm_identity;

/* Build from the config's identity section; opens the libvirt connection
 * when libvirt_uri is set (blocking). Errors name the URI in ERR. */
int vm_identity_new(const struct proxy_config *cfg, struct vm_identity **out, char *err,
		    size_t errlen);
/* Stops the event thread if started. Accepts NULL. */
void vm_identity_free(struct vm_identity *id);

/* CIDs that are never a guest of this host: 0 (hypervisor), 1 (local
 * loopback), 2 (the host, or the outer hypervisor when nested), and
 * VMADDR_CID_ANY. */
bool vm_identity_cid_reserved(uint32_t cid);

/* Resolve a vsock peer CID (a running domain whose
 * /domain/devices/vsock/cid/@address is CID): 0, -EPERM for a reserved CID
 * (no libvirt call), or -ENOENT. A cached answer is proved on every call
 * (the domain id it was read from still runs, with that uuid and CID: two
 * RPCs); a miss rescans the running domains at most once, and at most once
 * a second unless a lifecycle event or a failed proof came first; a CID
 * still unknown after that is refused without libvirt calls for 10 s or
 * until a lifecycle event. Never holds the lock lifecycle events take
 * across an RPC. While libvirt is unreachable: a cached CID unproved, else
 * -ENOTCONN. */
int vm_identity_by_cid(struct vm_identity *id, uint32_t cid, struct vm_info *out);

struct vm_identity_stats {
	uint64_t libvirt_calls; /* RPCs made by lookups */
	uint64_t cid_rescans;	/* rebuilds of the CID cache */
	uint64_t lease_scans;	/* as vm_identity_lease_scans */
	bool libvirt_configured, libvirt_connected;
	uint64_t libvirt_disconnects;        /* connections lost */
	uint64_t libvirt_reconnects;         /* reopened after a loss */
	uint64_t libvirt_reconnect_failures; /* attempts that failed */
	uint64_t served_unreachable;         /* lookups answered from the caches while down */
	uint64_t refused_unreachable;        /* lookups refused (-ENOTCONN) while down */
};

void vm_identity_stats(struct vm_identity *id, struct vm_identity_stats *st);

/* Resolve a TCP peer: the static table first, then libvirt (interface
 * addresses), then unknown_peers=by_address. 0 or -ENOENT; while libvirt is
 * unreachable an address a lease scan gave before is served as then, and
 * one never seen is -ENOTCONN (unless unknown_peers=by_address). */
int vm_identity_by_address(struct vm_identity *id, const struct sockaddr *sa, socklen_t salen,
			   struct vm_info *out);

/* How many DHCP lease scans vm_identity_by_address has made (each costs a
 * libvirt call per running domain); an address without a lease is not
 * scanned again for 10 s, or until a lifecycle event. */
uint64_t vm_identity_lease_scans(struct vm_identity *id);

/* The same answers without waiting on libvirt, for the acceptor: 0 (OUT
 * filled) or a final -errno when the static table, the negative caches, or
 * (while libvirt is unreachable) the caches decide; -EAGAIN when only
 * libvirt can, and the blocking lookup must be made elsewhere. */
int vm_identity_by_cid_cached(struct vm_identity *id, uint32_t cid, struct vm_info *out);
int vm_identity_by_address_cached(struct vm_identity *id, const struct sockaddr *sa,
				  socklen_t salen, struct vm_info *out);
int vm_identity_by_name_cached(struct vm_identity *id, const char *name_or_uuid,
			       struct vm_info *out);

/* Resolve a VM by name or uuid (per-VM Unix sockets, static entries).
 * 0, -ENOENT, or -ENOTCONN when libvirt would be asked and is unreachable. */
int vm_identity_by_name(struct vm_identity *id, const char *name_or_uuid, struct vm_info *out);

/* A reload appended static entries: add CFG's identity.static[FROM..] to
 * the table (resolved like at start: a domain that libvirt does not have
 * needs a uuid). All or nothing; errors name the entry in ERR. Call on the
 * acceptor thread, the one that looks peers up by address and name. */
int vm_identity_add_statics(struct vm_identity *id, const struct proxy_config *cfg, size_t from,
			    char *err, size_t errlen);

/* Every VM this host knows of: the static table's entries, then the
 * running libvirt domains not among them (one libvirt call per domain;
 * admin requests only). *OUT is malloc'd, *N entries. Returns 0, -EIO when
 * libvirt could not list (the static entries are still given), -ENOMEM. */
int vm_identity_list_known(struct vm_identity *id, struct vm_info **out, size_t *n);

/* What happened to a VM, as the event thread reports it. */
enum vm_change {
	VM_STOPPED,        /* stopped, crashed, undefined: its guests are gone */
	VM_MIGRATING_AWAY, /* STOPPED or SUSPENDED with the MIGRATED detail: it runs
			    * elsewhere now or soon; its guests will reconnect there */
	VM_CID_CHANGED,    /* a device was added or removed: its CID is now VM->cid
			    * (0: no vsock device) */
};

/* Called from the event thread: UUID is no longer running here, is
 * leaving, or has another CID. */
typedef void (*vm_gone_fn)(void *userdata, const struct vm_info *vm, enum vm_change how);

/* Start the thread that runs libvirt's event loop and registers lifecycle
 * callbacks. A no-op returning 0 without libvirt. */
int vm_identity_start_events(struct vm_identity *id, vm_gone_fn gone, void *userdata);

/* The libvirt connection (a virConnectPtr, NULL without libvirt), for
 * tests with libvirt's test driver, whose state is private to each
 * connection. */
void *vm_identity_libvirt_conn(struct vm_identity *id);

/* Handle a lifecycle event (EVENT, DETAIL: virDomainEventType and its
 * detail) of the domain NAME as if libvirt had sent it, or (DEVICE) a
 * device added to or removed from it. For tests: libvirt's test driver
 * never sends the MIGRATED detail nor device events. 0 or -ENOENT. */
int vm_identity_test_event(struct vm_identity *id, const char *name, bool device, int event,
			   int detail);

/* For tests, without the event thread running: the libvirt connection is
 * lost as libvirt's close callback reports it (VMs known are then served
 * from the caches, others refused with -ENOTCONN), and one attempt to
 * reopen it now, as the event thread makes once the backoff has passed: 0
 * reconnected (caches rebuilt, events registered again), or -ECONNREFUSED
 * with *WAIT_MS the backoff before the next attempt. */
void vm_identity_test_lose(struct vm_identity *id);
int vm_identity_test_reconnect(struct vm_identity *id, uint32_t *wait_ms);

/* Destroy the running domain NAME on the connection this object holds.
 * For tests with libvirt's test driver, whose state is private to each
 * connection. */
int vm_identity_destroy_domain(struct vm_identity *id, const char *name);
