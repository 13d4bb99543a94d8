/* vm_identity_cid.c -- identity by vsock CID (vm_identity_impl.h).
 *
 * The CID cache holds (cid, domain id, uuid) from the running domains. A
 * hit is proved before it is served: the domain with that id must still be
 * running, have that uuid and that CID in its live XML (two RPCs), so a CID
 * that moved to another domain is never credited to the old one, whether
 * or not the lifecycle event has arrived. A miss rescans at most once, and
 * not more often than once a second unless an event or a failed proof
 * says the cache is wrong; a CID that is still unknown is remembered for
 * 10 s (or until a lifecycle event), so a peer in a connect loop costs no
 * libvirt calls. RPCs run without the cache lock, which lifecycle
 * handling takes. While libvirt is unreachable a cached CID is served as
 * last known, unproved, and anything else is refused with -ENOTCONN. */
#include "vm_identity_impl.h"

#include <errno.h>
#include <linux/vm_sockets.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "log.h"

/* Rebuild the CID cache from the running domains: 1 + N RPCs, made under
 * scan_lock only; the result is swapped in under the cache lock. A
 * lifecycle event during the scan leaves the cache marked stale. */
int vm_identity_rescan(struct vm_identity *id, virConnectPtr c)
{
	virDomainPtr *doms = NULL;
	struct cid_entry *cids, *old;
	uint64_t gen;
	size_t k = 0;
	int n;

	pthread_mutex_lock(&id->lock);
	gen = id->generation;
	pthread_mutex_unlock(&id->lock);
	atomic_fetch_add(&id->cid_rescans, 1);
	atomic_fetch_add(&id->libvirt_calls, 1);
	n = virConnectListAllDomains(c, &doms, VIR_CONNECT_LIST_DOMAINS_ACTIVE);
	if (n < 0) {
		log_warn("libvirt: cannot list domains: %s", vm_identity_virt_error());
		pthread_mutex_lock(&id->lock);
		id->last_rescan_ms = clock_mono_ms();
		pthread_mutex_unlock(&id->lock);
		return -EIO;
	}
	cids = calloc((size_t)n + 1, sizeof(*cids));
	for (int i = 0; i < n; i++) {
		struct vm_info vm;

		if (cids && k < MAX_CIDS && vm_identity_info_from_domain(id, doms[i], &vm) == 0 &&
		    vm.cid) {
			cids[k].cid = vm.cid;
			cids[k].dom_id = virDomainGetID(doms[i]);
			cids[k].vm = vm;
			k++;
		}
		virDomainFree(doms[i]);
	}
	free(doms);
	if (vm_identity_conn_lost(c)) {
		/* Half a scan: the cache as it was serves while libvirt is away. */
		free(cids);
		return -EIO;
	}
	pthread_mutex_lock(&id->lock);
	old = id->cids;
	id->cids = cids;
	id->ncids = cids ? k : 0;
	id->cids_valid = cids != NULL && id->generation == gen;
	id->last_rescan_ms = clock_mono_ms();
	pthread_mutex_unlock(&id->lock);
	free(old);
	return cids ? 0 : -ENOMEM;
}

/* Does the running domain DOM_ID still have uuid VM->uuid and CID
 * VM->cid in its live XML? Two RPCs. */
static bool still_owns(struct vm_identity *id, virConnectPtr c, unsigned int dom_id,
		       const struct vm_info *vm)
{
	virDomainPtr dom;
	struct vm_info now;
	bool owns;

	atomic_fetch_add(&id->libvirt_calls, 1);
	dom = virDomainLookupByID(c, (int)dom_id);
	if (!dom)
		return false;
	owns = vm_identity_info_from_domain(id, dom, &now) == 0 &&
	       strcmp(now.uuid, vm->uuid) == 0 && now.cid == vm->cid;
	virDomainFree(dom);
	return owns;
}

/* Look CID up in the cache (locked by the caller): 1 and the entry, 0 on
 * a miss. A cache marked stale is searched only when ANYWAY is set (right
 * after a rescan that an event overtook: its entries are then proved). */
static int cache_find(struct vm_identity *id, uint32_t cid, bool anyway, struct cid_entry *out)
{
	for (size_t i = 0; (id->cids_valid || anyway) && i < id->ncids; i++) {
		if (id->cids[i].cid == cid) {
			*out = id->cids[i];
			return 1;
		}
	}
	return 0;
}

static bool no_cid_known(struct vm_identity *id, uint32_t cid, uint64_t now)
{
	for (size_t i = 0; i < NO_CID_SLOTS; i++)
		if (id->no_cid[i].until_ms > now && id->no_cid[i].cid == cid)
			return true;
	return false;
}

bool vm_identity_cid_reserved(uint32_t cid)
{
	/* 0: the hypervisor, 1: local loopback (any local user), 2: the host
	 * itself, or the outer hypervisor on a nested host; -1: "any". None is
	 * a guest of this host. */
	return cid <= VMADDR_CID_HOST || cid == UINT32_MAX;
}

/* libvirt is unreachable: CID as last known, or -ENOTCONN. */
static int by_cid_down(struct vm_identity *id, uint32_t cid, struct vm_info *out)
{
	struct cid_entry e;
	int found;

	pthread_mutex_lock(&id->lock);
	found = cache_find(id, cid, true, &e);
	pthread_mutex_unlock(&id->lock);
	if (!found) {
		atomic_fetch_add(&id->refused_down, 1);
		return -ENOTCONN;
	}
	atomic_fetch_add(&id->served_down, 1);
	*out = e.vm;
	return 0;
}

/* CID was not found, or its proof failed: at most one rescan per lookup,
 * and only one at a time: a lookup that waited for another's rescan uses
 * its result. 1 with *E when found (*FRESH: by this rescan, with no event
 * since), else 0; *LOST: the connection failed during the rescan. */
static int by_cid_rescan(struct vm_identity *id, virConnectPtr c, uint32_t cid,
			 struct cid_entry *e, bool *fresh, bool *lost)
{
	bool scanned = false;
	uint64_t now;
	int found;

	pthread_mutex_lock(&id->scan_lock);
	pthread_mutex_lock(&id->lock);
	now = clock_mono_ms();
	found = cache_find(id, cid, false, e);
	if (!found && (!id->cids_valid || now >= id->last_rescan_ms + RESCAN_MIN_MS)) {
		pthread_mutex_unlock(&id->lock);
		scanned = vm_identity_rescan(id, c) == 0;
		*lost = !scanned && vm_identity_conn_lost(c);
		pthread_mutex_lock(&id->lock);
		found = cache_find(id, cid, true, e);
		*fresh = scanned && id->cids_valid;
	}
	/* Remembered as unknown only on an answer no event has overtaken. */
	if (!found && !*lost && id->cids_valid) {
		struct no_cid *nc = &id->no_cid[id->no_cid_next];

		id->no_cid_next = (id->no_cid_next + 1) % NO_CID_SLOTS;
		nc->cid = cid;
		nc->until_ms = clock_mono_ms() + NO_CID_TTL_MS;
	}
	pthread_mutex_unlock(&id->lock);
	pthread_mutex_unlock(&id->scan_lock);
	return found;
}

int vm_identity_by_cid(struct vm_identity *id, uint32_t cid, struct vm_info *out)
{
	struct cid_entry e;
	virConnectPtr c;
	uint64_t now;
	bool fresh = false, lost = false;
	int found;

	if (vm_identity_cid_reserved(cid))
		return -EPERM;
	if (!id->cfg->identity.libvirt_uri)
		return -ENOENT;
	c = vm_identity_get_conn(id);
	if (!c)
		return by_cid_down(id, cid, out);
	pthread_mutex_lock(&id->lock);
	now = clock_mono_ms();
	if (no_cid_known(id, cid, now)) {
		pthread_mutex_unlock(&id->lock);
		vm_identity_put_conn(c);
		return -ENOENT;
	}
	found = cache_find(id, cid, false, &e);
	pthread_mutex_unlock(&id->lock);
	if (found) {
		if (still_owns(id, c, e.dom_id, &e.vm)) {
			vm_identity_put_conn(c);
			*out = e.vm;
			return 0;
		}
		if (vm_identity_conn_lost(c)) {
			vm_identity_put_conn(c);
			return by_cid_down(id, cid, out);
		}
		/* The domain stopped, restarted or gave the CID up: the cache
		 * is wrong, whatever the events say. */
		pthread_mutex_lock(&id->lock);
		id->cids_valid = false;
		pthread_mutex_unlock(&id->lock);
	}
	found = by_cid_rescan(id, c, cid, &e, &fresh, &lost);
	if (lost) {
		vm_identity_put_conn(c);
		return by_cid_down(id, cid, out);
	}
	if (!found) {
		vm_identity_put_conn(c);
		return -ENOENT;
	}
	/* Fresh from this rescan with no event since: served as read. An
	 * entry from another lookup's rescan is proved like any hit. */
	if (!fresh && !still_owns(id, c, e.dom_id, &e.vm)) {
		lost = vm_identity_conn_lost(c);
		vm_identity_put_conn(c);
		return lost ? by_cid_down(id, cid, out) : -ENOENT;
	}
	vm_identity_put_conn(c);
	*out = e.vm;
	return 0;
}

int vm_identity_by_cid_cached(struct vm_identity *id, uint32_t cid, struct vm_info *out)
{
	bool unknown;

	if (vm_identity_cid_reserved(cid))
		return -EPERM;
	if (!id->cfg->identity.libvirt_uri)
		return -ENOENT;
	if (!atomic_load(&id->connected))
		return by_cid_down(id, cid, out);
	pthread_mutex_lock(&id->lock);
	unknown = no_cid_known(id, cid, clock_mono_ms());
	pthread_mutex_unlock(&id->lock);
	return unknown ? -ENOENT : -EAGAIN;
}
