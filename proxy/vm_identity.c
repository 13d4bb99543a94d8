/* vm_identity.c -- see vm_identity.h. libvirt's errors are turned into
 * -errno and a log line here; nothing else in the daemon sees them.
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
 * handling takes.
 *
 * The connection comes and goes: keepalive (5 s, 3 missed) and a close
 * callback notice a libvirtd that died or hangs; the event thread then
 * reopens it with backoff (250 ms doubling to 10 s). Lookups take a
 * reference on the connection, so a reconnect never frees one under
 * them. While it is down, a CID or address in the caches is served as
 * last known, unproved, and anything else is refused with -ENOTCONN;
 * once it is back, the caches are rebuilt from the running domains, the
 * lifecycle events registered again, and the known VMs that no longer
 * run are reported gone (their stop was missed). */
#include "vm_identity.h"

#include <arpa/inet.h>
#include <errno.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <libxml/parser.h>
#include <libxml/xpath.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backoff.h"
#include "clock.h"
#include "log.h"

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

#define KEEPALIVE_INTERVAL_S 5
#define KEEPALIVE_COUNT      3
#define RECONNECT_BASE_MS    250
#define RECONNECT_MAX_MS     10000
/* A failing reconnect is logged at the first attempt, then at most this
 * often. */
#define RECONNECT_LOG_MS 30000

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

static void silent_error(void *ud, virErrorPtr err)
{
	(void)ud;
	(void)err;
}

static const char *virt_error(void)
{
	virErrorPtr e = virGetLastError();

	return e && e->message ? e->message : "unknown libvirt error";
}

/* A reference on the connection while it is up, else NULL. Dropped with
 * put_conn (an RPC when it is the last one: never under the lock). */
static virConnectPtr get_conn(struct vm_identity *id)
{
	virConnectPtr c = NULL;

	pthread_mutex_lock(&id->lock);
	if (id->conn && atomic_load(&id->connected) && virConnectRef(id->conn) == 0)
		c = id->conn;
	pthread_mutex_unlock(&id->lock);
	return c;
}

static void put_conn(virConnectPtr c)
{
	if (c)
		virConnectClose(c);
}

/* After a failed RPC on C: was it the connection that failed? */
static bool conn_lost(virConnectPtr c)
{
	return virConnectIsAlive(c) != 1;
}

/* Fill VM from DOM: uuid, name, and the vsock CID from its XML. */
static int info_from_domain(struct vm_identity *id, virDomainPtr dom, struct vm_info *vm)
{
	char *xml;
	const char *name = virDomainGetName(dom);

	memset(vm, 0, sizeof(*vm));
	if (virDomainGetUUIDString(dom, vm->uuid) < 0 || !name)
		return -EIO;
	snprintf(vm->name, sizeof(vm->name), "%s", name);
	atomic_fetch_add(&id->libvirt_calls, 1);
	xml = virDomainGetXMLDesc(dom, 0);
	if (xml) {
		xmlDocPtr doc = xmlReadMemory(xml, (int)strlen(xml), "domain.xml", NULL,
					      XML_PARSE_NONET | XML_PARSE_NOERROR |
						      XML_PARSE_NOWARNING);
		if (doc) {
			xmlXPathContextPtr ctx = xmlXPathNewContext(doc);
			xmlXPathObjectPtr r = ctx ? xmlXPathEvalExpression(
							  BAD_CAST "string(/domain/devices/vsock/cid/@address)",
							  ctx)
						  : NULL;
			if (r && r->type == XPATH_STRING && r->stringval && r->stringval[0])
				vm->cid = (uint32_t)strtoul((const char *)r->stringval, NULL, 10);
			xmlXPathFreeObject(r);
			xmlXPathFreeContext(ctx);
			xmlFreeDoc(doc);
		}
		free(xml);
	}
	return 0;
}

/* 0, -ENOENT, or -ENOTCONN when libvirt is unreachable. */
static int lookup_libvirt(struct vm_identity *id, const char *name_or_uuid, struct vm_info *vm)
{
	virConnectPtr c;
	virDomainPtr dom;
	int r;

	if (!id->cfg->identity.libvirt_uri)
		return -ENOENT;
	c = get_conn(id);
	if (!c)
		return -ENOTCONN;
	atomic_fetch_add(&id->libvirt_calls, 1);
	dom = virDomainLookupByName(c, name_or_uuid);
	if (!dom) {
		atomic_fetch_add(&id->libvirt_calls, 1);
		dom = virDomainLookupByUUIDString(c, name_or_uuid);
	}
	if (!dom) {
		r = conn_lost(c) ? -ENOTCONN : -ENOENT;
		put_conn(c);
		return r;
	}
	r = info_from_domain(id, dom, vm);
	virDomainFree(dom);
	put_conn(c);
	return r;
}

static int parse_addr(const char *s, int *family, uint8_t addr[16])
{
	memset(addr, 0, 16);
	if (inet_pton(AF_INET, s, addr) == 1) {
		*family = AF_INET;
		return 0;
	}
	if (inet_pton(AF_INET6, s, addr) == 1) {
		*family = AF_INET6;
		return 0;
	}
	return -EINVAL;
}

int vm_identity_new(const struct proxy_config *cfg, struct vm_identity **out, char *err,
		    size_t errlen)
{
	struct vm_identity *id = calloc(1, sizeof(*id));

	if (!id)
		return -ENOMEM;
	id->cfg = cfg;
	id->ev_callback = id->ev_dev_added = id->ev_dev_removed = -1;
	id->ev_timer = -1;
	pthread_mutex_init(&id->lock, NULL);
	pthread_mutex_init(&id->scan_lock, NULL);
	virSetErrorFunc(NULL, silent_error);
	if (cfg->identity.libvirt_uri) {
		/* Events need the default loop registered before the connection. */
		if (virEventRegisterDefaultImpl() < 0) {
			snprintf(err, errlen, "libvirt event loop: %s", virt_error());
			vm_identity_free(id);
			return -EIO;
		}
		/* Reading is all vmproxyd does; a read-write connection (root on
		 * a KVM host) only when asked for, e.g. by tests that destroy a
		 * domain on the daemon's own connection. */
		if (cfg->identity.libvirt_read_write)
			id->conn = virConnectOpen(cfg->identity.libvirt_uri);
		else
			id->conn = virConnectOpenReadOnly(cfg->identity.libvirt_uri);
		if (!id->conn) {
			snprintf(err, errlen, "identity.libvirt_uri \"%s\": %s",
				 cfg->identity.libvirt_uri, virt_error());
			vm_identity_free(id);
			return -EIO;
		}
		atomic_store(&id->connected, true);
	}
	id->statics = calloc(cfg->identity.n_statics + 1, sizeof(*id->statics));
	if (!id->statics) {
		vm_identity_free(id);
		return -ENOMEM;
	}
	for (size_t i = 0; i < cfg->identity.n_statics; i++) {
		const struct static_identity *s = &cfg->identity.statics[i];
		struct static_entry *e = &id->statics[i];

		if (parse_addr(s->address, &e->family, e->addr) < 0) {
			snprintf(err, errlen, "identity.static[%zu].address: \"%s\" is not numeric", i,
				 s->address);
			vm_identity_free(id);
			return -EINVAL;
		}
		if (lookup_libvirt(id, s->vm, &e->vm) < 0) {
			if (!s->uuid) {
				snprintf(err, errlen, "identity.static[%zu].vm: no libvirt domain \"%s\" "
					 "and no uuid given", i, s->vm);
				vm_identity_free(id);
				return -ENOENT;
			}
			snprintf(e->vm.name, sizeof(e->vm.name), "%s", s->vm);
		}
		if (s->uuid)
			snprintf(e->vm.uuid, sizeof(e->vm.uuid), "%s", s->uuid);
		id->nstatics = i + 1;
	}
	*out = id;
	return 0;
}

/* Rebuild the CID cache from the running domains: 1 + N RPCs, made under
 * scan_lock only; the result is swapped in under the cache lock. A
 * lifecycle event during the scan leaves the cache marked stale. */
static int rescan(struct vm_identity *id, virConnectPtr c)
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
		log_warn("libvirt: cannot list domains: %s", virt_error());
		pthread_mutex_lock(&id->lock);
		id->last_rescan_ms = clock_mono_ms();
		pthread_mutex_unlock(&id->lock);
		return -EIO;
	}
	cids = calloc((size_t)n + 1, sizeof(*cids));
	for (int i = 0; i < n; i++) {
		struct vm_info vm;

		if (cids && k < MAX_CIDS && info_from_domain(id, doms[i], &vm) == 0 && vm.cid) {
			cids[k].cid = vm.cid;
			cids[k].dom_id = virDomainGetID(doms[i]);
			cids[k].vm = vm;
			k++;
		}
		virDomainFree(doms[i]);
	}
	free(doms);
	if (conn_lost(c)) {
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
	owns = info_from_domain(id, dom, &now) == 0 && strcmp(now.uuid, vm->uuid) == 0 &&
	       now.cid == vm->cid;
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

int vm_identity_by_cid(struct vm_identity *id, uint32_t cid, struct vm_info *out)
{
	struct cid_entry e;
	virConnectPtr c;
	uint64_t now;
	bool scanned = false, fresh = false, lost = false;
	int found;

	if (vm_identity_cid_reserved(cid))
		return -EPERM;
	if (!id->cfg->identity.libvirt_uri)
		return -ENOENT;
	c = get_conn(id);
	if (!c)
		return by_cid_down(id, cid, out);
	pthread_mutex_lock(&id->lock);
	now = clock_mono_ms();
	if (no_cid_known(id, cid, now)) {
		pthread_mutex_unlock(&id->lock);
		put_conn(c);
		return -ENOENT;
	}
	found = cache_find(id, cid, false, &e);
	pthread_mutex_unlock(&id->lock);
	if (found) {
		if (still_owns(id, c, e.dom_id, &e.vm)) {
			put_conn(c);
			*out = e.vm;
			return 0;
		}
		if (conn_lost(c)) {
			put_conn(c);
			return by_cid_down(id, cid, out);
		}
		/* The domain stopped, restarted or gave the CID up: the cache
		 * is wrong, whatever the events say. */
		pthread_mutex_lock(&id->lock);
		id->cids_valid = false;
		pthread_mutex_unlock(&id->lock);
	}
	/* At most one rescan per lookup, and only one at a time: a lookup
	 * that waited for another's rescan uses its result. */
	pthread_mutex_lock(&id->scan_lock);
	pthread_mutex_lock(&id->lock);
	now = clock_mono_ms();
	found = cache_find(id, cid, false, &e);
	if (!found && (!id->cids_valid || now >= id->last_rescan_ms + RESCAN_MIN_MS)) {
		pthread_mutex_unlock(&id->lock);
		scanned = rescan(id, c) == 0;
		lost = !scanned && conn_lost(c);
		pthread_mutex_lock(&id->lock);
		found = cache_find(id, cid, true, &e);
		fresh = scanned && id->cids_valid;
	}
	/* Remembered as unknown only on an answer no event has overtaken. */
	if (!found && !lost && id->cids_valid) {
		struct no_cid *nc = &id->no_cid[id->no_cid_next];

		id->no_cid_next = (id->no_cid_next + 1) % NO_CID_SLOTS;
		nc->cid = cid;
		nc->until_ms = clock_mono_ms() + NO_CID_TTL_MS;
	}
	pthread_mutex_unlock(&id->lock);
	pthread_mutex_unlock(&id->scan_lock);
	if (lost) {
		put_conn(c);
		return by_cid_down(id, cid, out);
	}
	if (!found) {
		put_conn(c);
		return -ENOENT;
	}
	/* Fresh from this rescan with no event since: served as read. An
	 * entry from another lookup's rescan is proved like any hit. */
	if (!fresh && !still_owns(id, c, e.dom_id, &e.vm)) {
		lost = conn_lost(c);
		put_conn(c);
		return lost ? by_cid_down(id, cid, out) : -ENOENT;
	}
	put_conn(c);
	*out = e.vm;
	return 0;
}

void vm_identity_stats(struct vm_identity *id, struct vm_identity_stats *st)
{
	st->libvirt_calls = atomic_load(&id->libvirt_calls);
	st->cid_rescans = atomic_load(&id->cid_rescans);
	st->lease_scans = atomic_load(&id->lease_scans);
	st->libvirt_configured = id->cfg->identity.libvirt_uri != NULL;
	st->libvirt_connected = atomic_load(&id->connected);
	st->libvirt_disconnects = atomic_load(&id->disconnects);
	st->libvirt_reconnects = atomic_load(&id->reconnects);
	st->libvirt_reconnect_failures = atomic_load(&id->reconnect_failures);
	st->served_unreachable = atomic_load(&id->served_down);
	st->refused_unreachable = atomic_load(&id->refused_down);
}

void *vm_identity_libvirt_conn(struct vm_identity *id)
{
	return id->conn;
}

/* A stable uuid derived from TEXT (SHA-256, version 8 / RFC 4122 variant). */
static void derive_uuid(const char *text, char out[VM_UUID_LEN + 1])
{
	unsigned char md[32];
	unsigned int mdlen = 0;

	EVP_Digest(text, strlen(text), md, &mdlen, EVP_sha256(), NULL);
	md[6] = (unsigned char)((md[6] & 0x0f) | 0x80);
	md[8] = (unsigned char)((md[8] & 0x3f) | 0x80);
	snprintf(out, VM_UUID_LEN + 1,
		 "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", md[0],
		 md[1], md[2], md[3], md[4], md[5], md[6], md[7], md[8], md[9], md[10], md[11],
		 md[12], md[13], md[14], md[15]);
}

/* 0, -ENOENT, or -ENOTCONN when the connection failed during the scan. */
static int by_leases(struct vm_identity *id, virConnectPtr c, const char *text, struct vm_info *out)
{
	virDomainPtr *doms = NULL;
	int n, r = -ENOENT;

	atomic_fetch_add(&id->libvirt_calls, 1);
	n = virConnectListAllDomains(c, &doms, VIR_CONNECT_LIST_DOMAINS_ACTIVE);
	for (int i = 0; i < n; i++) {
		virDomainInterfacePtr *ifs = NULL;
		int nif = r == 0 ? -1
				 : virDomainInterfaceAddresses(doms[i], &ifs,
							       VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0);
		for (int j = 0; j < nif; j++) {
			for (unsigned a = 0; r != 0 && a < ifs[j]->naddrs; a++)
				if (ifs[j]->addrs[a].addr && strcmp(ifs[j]->addrs[a].addr, text) == 0)
					r = info_from_domain(id, doms[i], out);
			virDomainInterfaceFree(ifs[j]);
		}
		free(ifs);
		virDomainFree(doms[i]);
	}
	free(doms);
	return r != 0 && conn_lost(c) ? -ENOTCONN : r;
}

/* Remember that a lease scan credited FAMILY/ADDR to VM. */
static void addr_add(struct vm_identity *id, int family, const uint8_t *addr,
		     const struct vm_info *vm)
{
	struct addr_known *e = NULL;

	pthread_mutex_lock(&id->lock);
	for (size_t i = 0; i < ADDR_SLOTS && !e; i++)
		if (id->addrs[i].family == family && memcmp(id->addrs[i].addr, addr, 16) == 0)
			e = &id->addrs[i];
	if (!e) {
		e = &id->addrs[id->addrs_next];
		id->addrs_next = (id->addrs_next + 1) % ADDR_SLOTS;
	}
	e->family = family;
	memcpy(e->addr, addr, 16);
	e->vm = *vm;
	pthread_mutex_unlock(&id->lock);
}

static bool addr_find(struct vm_identity *id, int family, const uint8_t *addr, struct vm_info *out)
{
	bool hit = false;

	pthread_mutex_lock(&id->lock);
	for (size_t i = 0; i < ADDR_SLOTS && !hit; i++) {
		if (id->addrs[i].family == family && memcmp(id->addrs[i].addr, addr, 16) == 0) {
			*out = id->addrs[i].vm;
			hit = true;
		}
	}
	pthread_mutex_unlock(&id->lock);
	return hit;
}

static bool no_lease_known(struct vm_identity *id, int family, const uint8_t *addr)
{
	uint64_t now = clock_mono_ms();
	bool hit = false;

	pthread_mutex_lock(&id->lock);
	for (size_t i = 0; i < NO_LEASE_SLOTS && !hit; i++) {
		const struct no_lease *e = &id->no_lease[i];
		hit = e->until_ms > now && e->family == family &&
		      memcmp(e->addr, addr, family == AF_INET ? 4 : 16) == 0;
	}
	pthread_mutex_unlock(&id->lock);
	return hit;
}

static void no_lease_add(struct vm_identity *id, int family, const uint8_t *addr)
{
	struct no_lease *e;

	pthread_mutex_lock(&id->lock);
	e = &id->no_lease[id->no_lease_next];
	id->no_lease_next = (id->no_lease_next + 1) % NO_LEASE_SLOTS;
	e->family = family;
	memcpy(e->addr, addr, 16);
	e->until_ms = clock_mono_ms() + NO_LEASE_TTL_MS;
	pthread_mutex_unlock(&id->lock);
}

uint64_t vm_identity_lease_scans(struct vm_identity *id)
{
	return atomic_load(&id->lease_scans);
}

/* The address of SA as (family, 16 bytes), v4-mapped v6 as v4. */
static int sockaddr_key(const struct sockaddr *sa, socklen_t salen, int *family, uint8_t addr[16])
{
	memset(addr, 0, 16);
	if (sa->sa_family == AF_INET && salen >= sizeof(struct sockaddr_in)) {
		*family = AF_INET;
		memcpy(addr, &((const struct sockaddr_in *)sa)->sin_addr, 4);
	} else if (sa->sa_family == AF_INET6 && salen >= sizeof(struct sockaddr_in6)) {
		const struct in6_addr *a6 = &((const struct sockaddr_in6 *)sa)->sin6_addr;
		if (IN6_IS_ADDR_V4MAPPED(a6)) {
			*family = AF_INET;
			memcpy(addr, a6->s6_addr + 12, 4);
		} else {
			*family = AF_INET6;
			memcpy(addr, a6->s6_addr, 16);
		}
	} else {
		return -ENOENT;
	}
	return 0;
}

/* The static table (a reload may grow it on the acceptor meanwhile). */
static bool static_by_addr(struct vm_identity *id, int family, const uint8_t *addr,
			   struct vm_info *out)
{
	bool hit = false;

	pthread_mutex_lock(&id->lock);
	for (size_t i = 0; i < id->nstatics && !hit; i++) {
		if (id->statics[i].family == family &&
		    memcmp(id->statics[i].addr, addr, family == AF_INET ? 4 : 16) == 0) {
			*out = id->statics[i].vm;
			hit = true;
		}
	}
	pthread_mutex_unlock(&id->lock);
	return hit;
}

/* No VM found for the address: unknown_peers decides. */
static int by_policy(struct vm_identity *id, int family, const uint8_t *addr, struct vm_info *out)
{
	char text[INET6_ADDRSTRLEN];

	if (id->cfg->identity.unknown_peers != UNKNOWN_PEERS_BY_ADDRESS)
		return -ENOENT;
	inet_ntop(family, addr, text, sizeof(text));
	memset(out, 0, sizeof(*out));
	snprintf(out->name, sizeof(out->name), "addr-%s", text);
	derive_uuid(text, out->uuid);
	return 0;
}

/* libvirt is unreachable: the address as a lease scan last gave it. */
static int by_address_down(struct vm_identity *id, int family, const uint8_t *addr,
			   struct vm_info *out)
{
	if (addr_find(id, family, addr, out)) {
		atomic_fetch_add(&id->served_down, 1);
		return 0;
	}
	if (by_policy(id, family, addr, out) == 0)
		return 0;
	atomic_fetch_add(&id->refused_down, 1);
	return -ENOTCONN;
}

int vm_identity_by_address(struct vm_identity *id, const struct sockaddr *sa, socklen_t salen,
			   struct vm_info *out)
{
	uint8_t addr[16];
	int family;
	char text[INET6_ADDRSTRLEN];

	if (sockaddr_key(sa, salen, &family, addr) < 0)
		return -ENOENT;
	if (static_by_addr(id, family, addr, out))
		return 0;
	inet_ntop(family, addr, text, sizeof(text));
	if (id->cfg->identity.libvirt_uri && !no_lease_known(id, family, addr)) {
		virConnectPtr c = get_conn(id);
		int r = -ENOTCONN;

		if (c) {
			atomic_fetch_add(&id->lease_scans, 1);
			r = by_leases(id, c, text, out);
			put_conn(c);
		}
		if (r == 0) {
			addr_add(id, family, addr, out);
			return 0;
		}
		if (r == -ENOTCONN)
			return by_address_down(id, family, addr, out);
		no_lease_add(id, family, addr);
	}
	return by_policy(id, family, addr, out);
}

int vm_identity_by_address_cached(struct vm_identity *id, const struct sockaddr *sa,
				  socklen_t salen, struct vm_info *out)
{
	uint8_t addr[16];
	int family;

	if (sockaddr_key(sa, salen, &family, addr) < 0)
		return -ENOENT;
	if (static_by_addr(id, family, addr, out))
		return 0;
	if (!id->cfg->identity.libvirt_uri || no_lease_known(id, family, addr))
		return by_policy(id, family, addr, out);
	if (!atomic_load(&id->connected))
		return by_address_down(id, family, addr, out);
	return -EAGAIN;
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

/* The static table by VM name or uuid. */
static bool static_by_name(struct vm_identity *id, const char *name_or_uuid, struct vm_info *out)
{
	bool hit = false;

	pthread_mutex_lock(&id->lock);
	for (size_t i = 0; i < id->nstatics && !hit; i++) {
		const struct vm_info *vm = &id->statics[i].vm;
		if (strcmp(vm->name, name_or_uuid) == 0 || strcasecmp(vm->uuid, name_or_uuid) == 0) {
			*out = *vm;
			hit = true;
		}
	}
	pthread_mutex_unlock(&id->lock);
	return hit;
}

int vm_identity_by_name_cached(struct vm_identity *id, const char *name_or_uuid,
			       struct vm_info *out)
{
	if (static_by_name(id, name_or_uuid, out))
		return 0;
	if (!id->cfg->identity.libvirt_uri)
		return -ENOENT;
	if (!atomic_load(&id->connected))
		return -ENOTCONN;
	return -EAGAIN;
}

int vm_identity_by_name(struct vm_identity *id, const char *name_or_uuid, struct vm_info *out)
{
	if (static_by_name(id, name_or_uuid, out))
		return 0;
	return lookup_libvirt(id, name_or_uuid, out);
}

int vm_identity_add_statics(struct vm_identity *id, const struct proxy_config *cfg, size_t from,
			    char *err, size_t errlen)
{
	size_t n = cfg->identity.n_statics, k = 0;
	struct static_entry *add, *grown;

	if (from >= n)
		return 0;
	add = calloc(n - from, sizeof(*add));
	if (!add)
		return -ENOMEM;
	/* Resolve every new entry first: all or nothing. */
	for (size_t i = from; i < n; i++, k++) {
		const struct static_identity *s = &cfg->identity.statics[i];
		struct static_entry *e = &add[k];

		if (parse_addr(s->address, &e->family, e->addr) < 0) {
			snprintf(err, errlen, "identity.static[%zu].address: \"%s\" is not numeric", i,
				 s->address);
			free(add);
			return -EINVAL;
		}
		if (lookup_libvirt(id, s->vm, &e->vm) < 0) {
			if (!s->uuid) {
				snprintf(err, errlen, "identity.static[%zu].vm: no libvirt domain \"%s\" "
					 "and no uuid given", i, s->vm);
				free(add);
				return -ENOENT;
			}
			snprintf(e->vm.name, sizeof(e->vm.name), "%s", s->vm);
		}
		if (s->uuid)
			snprintf(e->vm.uuid, sizeof(e->vm.uuid), "%s", s->uuid);
	}
	pthread_mutex_lock(&id->lock);
	grown = realloc(id->statics, (id->nstatics + k + 1) * sizeof(*grown));
	if (grown) {
		memcpy(grown + id->nstatics, add, k * sizeof(*add));
		id->statics = grown;
		id->nstatics += k;
	}
	pthread_mutex_unlock(&id->lock);
	free(add);
	return grown ? 0 : -ENOMEM;
}

int vm_identity_list_known(struct vm_identity *id, struct vm_info **out, size_t *n)
{
	virDomainPtr *doms = NULL;
	struct vm_info *vms;
	int nd = 0, r = 0;
	size_t k = 0;
	virConnectPtr c = get_conn(id);

	if (c) {
		nd = virConnectListAllDomains(c, &doms, VIR_CONNECT_LIST_DOMAINS_ACTIVE);
		if (nd < 0) {
			log_warn("libvirt: cannot list domains: %s", virt_error());
			nd = 0;
			r = -EIO;
		}
	} else if (id->cfg->identity.libvirt_uri) {
		r = -EIO;
	}
	/* A reload may grow the static table meanwhile (on the acceptor). */
	pthread_mutex_lock(&id->lock);
	vms = calloc(id->nstatics + (size_t)nd + 1, sizeof(*vms));
	for (size_t i = 0; vms && i < id->nstatics; i++)
		vms[k++] = id->statics[i].vm;
	pthread_mutex_unlock(&id->lock);
	for (int i = 0; i < nd; i++) {
		struct vm_info vm;
		bool dup = false;

		if (vms && info_from_domain(id, doms[i], &vm) == 0) {
			for (size_t j = 0; j < k && !dup; j++)
				dup = strcmp(vms[j].uuid, vm.uuid) == 0;
			if (!dup)
				vms[k++] = vm;
		}
		virDomainFree(doms[i]);
	}
	free(doms);
	put_conn(c);
	if (!vms)
		return -ENOMEM;
	*out = vms;
	*n = k;
	return r;
}

/* The VM stopped: its leases are no longer its own. Under the lock. */
static void addr_forget_locked(struct vm_identity *id, const char *uuid)
{
	for (size_t i = 0; i < ADDR_SLOTS; i++)
		if (id->addrs[i].family && strcmp(id->addrs[i].vm.uuid, uuid) == 0)
			id->addrs[i].family = 0;
}

/* What an event means for the VM's guests; false: nothing for them. */
static bool event_change(int event, int detail, enum vm_change *how)
{
	switch (event) {
	case VIR_DOMAIN_EVENT_STOPPED:
		*how = detail == VIR_DOMAIN_EVENT_STOPPED_MIGRATED ? VM_MIGRATING_AWAY : VM_STOPPED;
		return true;
	case VIR_DOMAIN_EVENT_UNDEFINED:
		*how = VM_STOPPED;
		return true;
	case VIR_DOMAIN_EVENT_SUSPENDED:
		/* Paused for the last part of a live migration. */
		*how = VM_MIGRATING_AWAY;
		return detail == VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED;
	}
	return false;
}

static const char *change_text(int event, enum vm_change how)
{
	if (how == VM_MIGRATING_AWAY)
		return event == VIR_DOMAIN_EVENT_STOPPED ? "stopped: migrated to another host"
							 : "paused to migrate to another host";
	return event == VIR_DOMAIN_EVENT_STOPPED ? "stopped" : "undefined";
}

/* Any event: the caches may be wrong now. A VM that stopped loses its
 * leases (a new domain may hold them). */
static void invalidate(struct vm_identity *id, const char *gone_uuid)
{
	pthread_mutex_lock(&id->lock);
	id->cids_valid = false; /* rescan on the next lookup */
	id->generation++;
	memset(id->no_lease, 0, sizeof(id->no_lease)); /* a new domain may hold the lease */
	memset(id->no_cid, 0, sizeof(id->no_cid));     /* or the CID */
	if (gone_uuid)
		addr_forget_locked(id, gone_uuid);
	pthread_mutex_unlock(&id->lock);
}

static void lifecycle(struct vm_identity *id, const struct vm_info *vm, int event, int detail)
{
	enum vm_change how = VM_STOPPED;
	bool change = event_change(event, detail, &how);

	invalidate(id, change ? vm->uuid : NULL);
	if (!change)
		return;
	log_info("vm=%s: libvirt reports it %s", vm->name, change_text(event, how));
	if (id->gone)
		id->gone(id->gone_ud, vm, how);
}

static int on_lifecycle(virConnectPtr conn, virDomainPtr dom, int event, int detail, void *ud)
{
	struct vm_info vm;
	const char *name = virDomainGetName(dom);

	(void)conn;
	memset(&vm, 0, sizeof(vm));
	virDomainGetUUIDString(dom, vm.uuid);
	snprintf(vm.name, sizeof(vm.name), "%s", name ? name : "?");
	lifecycle(ud, &vm, event, detail);
	return 0;
}

/* A device came or went: the domain's CID is read again between two
 * dispatches (device_check), not in the callback. */
static void device_changed(struct vm_identity *id, const char *uuid)
{
	bool dup = false;

	pthread_mutex_lock(&id->lock);
	for (size_t i = 0; i < id->ndev && !dup; i++)
		dup = strcmp(id->dev_pending[i], uuid) == 0;
	if (!dup && id->ndev < DEV_PENDING)
		snprintf(id->dev_pending[id->ndev++], VM_UUID_LEN + 1, "%s", uuid);
	else if (!dup)
		id->dev_overflow = true;
	pthread_mutex_unlock(&id->lock);
}

static void on_device(virConnectPtr conn, virDomainPtr dom, const char *alias, void *ud)
{
	char uuid[VM_UUID_LEN + 1];

	(void)conn;
	(void)alias;
	if (virDomainGetUUIDString(dom, uuid) == 0)
		device_changed(ud, uuid);
}

/* The domains whose devices changed: their CID as it is now goes to the
 * daemon, which closes connections made from another one. */
static void device_check(struct vm_identity *id)
{
	char pending[DEV_PENDING][VM_UUID_LEN + 1];
	size_t n;
	bool overflow;
	virConnectPtr c;

	pthread_mutex_lock(&id->lock);
	n = id->ndev;
	memcpy(pending, id->dev_pending, n * sizeof(pending[0]));
	id->ndev = 0;
	overflow = id->dev_overflow;
	id->dev_overflow = false;
	pthread_mutex_unlock(&id->lock);
	if (overflow)
		log_warn("libvirt: more than %d domains changed devices at once: the CIDs of the "
			 "others are proved at their next connection only",
			 DEV_PENDING);
	invalidate(id, NULL);
	c = get_conn(id);
	for (size_t i = 0; c && i < n; i++) {
		virDomainPtr dom;
		struct vm_info vm;

		atomic_fetch_add(&id->libvirt_calls, 1);
		dom = virDomainLookupByUUIDString(c, pending[i]);
		if (!dom)
			continue;
		if (virDomainIsActive(dom) == 1 && info_from_domain(id, dom, &vm) == 0) {
			log_info("vm=%s: a device was added or removed: its vsock CID is now %u",
				 vm.name, vm.cid);
			if (id->gone)
				id->gone(id->gone_ud, &vm, VM_CID_CHANGED);
		}
		virDomainFree(dom);
	}
	put_conn(c);
}

int vm_identity_test_event(struct vm_identity *id, const char *name, bool device, int event,
			   int detail)
{
	struct vm_info vm;

	if (lookup_libvirt(id, name, &vm) < 0)
		return -ENOENT;
	if (device)
		device_changed(id, vm.uuid);
	else
		lifecycle(id, &vm, event, detail);
	return 0;
}

static const char *close_reason(int reason)
{
	switch (reason) {
	case VIR_CONNECT_CLOSE_REASON_ERROR:
		return "socket error";
	case VIR_CONNECT_CLOSE_REASON_EOF:
		return "libvirtd closed it";
	case VIR_CONNECT_CLOSE_REASON_KEEPALIVE:
		return "keepalive timeout: libvirtd does not answer";
	case VIR_CONNECT_CLOSE_REASON_CLIENT:
		return "closed here";
	}
	return "unknown reason";
}

/* libvirt's close callback, on the event thread. */
static void on_close(virConnectPtr conn, int reason, void *ud)
{
	struct vm_identity *id = ud;
	uint64_t now = clock_mono_ms();

	(void)conn;
	if (!atomic_exchange(&id->connected, false))
		return;
	atomic_fetch_add(&id->disconnects, 1);
	id->down_since_ms = now;
	id->attempts = 0;
	id->last_fail_log_ms = 0;
	backoff_reset(&id->backoff);
	id->next_attempt_ms = now + backoff_next(&id->backoff);
	log_warn("libvirt: connection to %s lost (%s); VMs already known are served as last "
		 "seen, peers not known yet are refused until it is back; reconnecting",
		 id->cfg->identity.libvirt_uri, close_reason(reason));
}

/* Keepalive, the close callback and the lifecycle events on C (the event
 * thread, or before it starts). */
static int setup_conn(struct vm_identity *id, virConnectPtr c)
{
	if (virConnectSetKeepAlive(c, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) != 0)
		log_debug("libvirt: no keepalive on this connection: %s", virt_error());
	id->close_cb = virConnectRegisterCloseCallback(c, on_close, id, NULL) == 0;
	if (!id->close_cb)
		log_debug("libvirt: no close callback on this connection: %s", virt_error());
	id->ev_callback =
		virConnectDomainEventRegisterAny(c, NULL, VIR_DOMAIN_EVENT_ID_LIFECYCLE,
						 VIR_DOMAIN_EVENT_CALLBACK(on_lifecycle), id, NULL);
	if (id->ev_callback < 0) {
		log_error("libvirt: cannot register lifecycle events: %s", virt_error());
		return -EIO;
	}
	/* A vsock device attached or detached while the domain runs. */
	id->ev_dev_added =
		virConnectDomainEventRegisterAny(c, NULL, VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
						 VIR_DOMAIN_EVENT_CALLBACK(on_device), id, NULL);
	id->ev_dev_removed =
		virConnectDomainEventRegisterAny(c, NULL, VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
						 VIR_DOMAIN_EVENT_CALLBACK(on_device), id, NULL);
	if (id->ev_dev_added < 0 || id->ev_dev_removed < 0)
		log_warn("libvirt: no device events (%s): a changed vsock CID is noticed at the "
			 "next connection only",
			 virt_error());
	return 0;
}

static void teardown_conn(struct vm_identity *id, virConnectPtr c)
{
	if (id->ev_callback >= 0)
		virConnectDomainEventDeregisterAny(c, id->ev_callback);
	if (id->ev_dev_added >= 0)
		virConnectDomainEventDeregisterAny(c, id->ev_dev_added);
	if (id->ev_dev_removed >= 0)
		virConnectDomainEventDeregisterAny(c, id->ev_dev_removed);
	id->ev_callback = id->ev_dev_added = id->ev_dev_removed = -1;
	if (id->close_cb)
		virConnectUnregisterCloseCallback(c, on_close);
	id->close_cb = false;
}

struct known_vm {
	struct vm_info vm;
	bool running;
};

/* After a reconnect: both caches anew from C's running domains (CIDs,
 * leases), and the VMs known before that no longer run are reported gone,
 * since their stop may have happened while nobody listened. */
static void rebuild(struct vm_identity *id, virConnectPtr c)
{
	virDomainPtr *doms = NULL;
	struct known_vm *known;
	struct addr_known *addrs;
	size_t nknown = 0, naddrs = 0, ncids = 0;
	int n;

	addrs = calloc(ADDR_SLOTS, sizeof(*addrs));
	pthread_mutex_lock(&id->lock);
	known = calloc(id->ncids + ADDR_SLOTS + 1, sizeof(*known));
	for (size_t i = 0; known && i < id->ncids; i++)
		known[nknown++].vm = id->cids[i].vm;
	for (size_t i = 0; known && i < ADDR_SLOTS; i++)
		if (id->addrs[i].family)
			known[nknown++].vm = id->addrs[i].vm;
	pthread_mutex_unlock(&id->lock);
	if (!known || !addrs) {
		log_error("libvirt: out of memory rebuilding the identity caches: they are "
			  "rebuilt lookup by lookup");
		goto out;
	}
	if (rescan(id, c) < 0)
		goto out;
	atomic_fetch_add(&id->libvirt_calls, 1);
	n = virConnectListAllDomains(c, &doms, VIR_CONNECT_LIST_DOMAINS_ACTIVE);
	for (int i = 0; i < n; i++) {
		virDomainInterfacePtr *ifs = NULL;
		char uuid[VM_UUID_LEN + 1];
		const char *name = virDomainGetName(doms[i]);
		int nif;

		if (virDomainGetUUIDString(doms[i], uuid) == 0) {
			for (size_t k = 0; k < nknown; k++)
				if (strcmp(known[k].vm.uuid, uuid) == 0)
					known[k].running = true;
		}
		atomic_fetch_add(&id->libvirt_calls, 1);
		nif = virDomainInterfaceAddresses(doms[i], &ifs,
						  VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0);
		for (int j = 0; j < nif; j++) {
			for (unsigned a = 0; a < ifs[j]->naddrs; a++) {
				struct addr_known *e = &addrs[naddrs];

				if (naddrs >= ADDR_SLOTS || !ifs[j]->addrs[a].addr ||
				    parse_addr(ifs[j]->addrs[a].addr, &e->family, e->addr) < 0)
					continue;
				snprintf(e->vm.uuid, sizeof(e->vm.uuid), "%s", uuid);
				snprintf(e->vm.name, sizeof(e->vm.name), "%s", name ? name : "?");
				naddrs++;
			}
			virDomainInterfaceFree(ifs[j]);
		}
		free(ifs);
		virDomainFree(doms[i]);
	}
	free(doms);
	if (n < 0)
		goto out;
	pthread_mutex_lock(&id->lock);
	memcpy(id->addrs, addrs, ADDR_SLOTS * sizeof(*addrs));
	id->addrs_next = naddrs % ADDR_SLOTS;
	ncids = id->ncids;
	pthread_mutex_unlock(&id->lock);
	for (size_t k = 0; k < nknown; k++) {
		bool dup = false;

		for (size_t j = 0; j < k && !dup; j++)
			dup = strcmp(known[j].vm.uuid, known[k].vm.uuid) == 0;
		if (known[k].running || dup)
			continue;
		log_info("vm=%s: no longer running after libvirt came back", known[k].vm.name);
		if (id->gone)
			id->gone(id->gone_ud, &known[k].vm, VM_STOPPED);
	}
	log_info("libvirt: identity caches rebuilt: %zu running domains, %zu with a vsock CID, "
		 "%zu leased addresses",
		 (size_t)n, ncids, naddrs);
out:
	free(known);
	free(addrs);
}

/* On the event thread, while disconnected and the backoff has passed. */
static void reconnect(struct vm_identity *id)
{
	const char *uri = id->cfg->identity.libvirt_uri;
	virConnectPtr old, c;
	uint64_t now;

	pthread_mutex_lock(&id->lock);
	old = id->conn;
	id->conn = NULL;
	pthread_mutex_unlock(&id->lock);
	if (old) {
		teardown_conn(id, old);
		virConnectClose(old);
	}
	id->attempts++;
	c = id->cfg->identity.libvirt_read_write ? virConnectOpen(uri)
						 : virConnectOpenReadOnly(uri);
	if (c && setup_conn(id, c) < 0) {
		teardown_conn(id, c);
		virConnectClose(c);
		c = NULL;
	}
	now = clock_mono_ms();
	if (!c) {
		uint32_t wait = backoff_next(&id->backoff);

		atomic_fetch_add(&id->reconnect_failures, 1);
		if (!id->last_fail_log_ms || now >= id->last_fail_log_ms + RECONNECT_LOG_MS) {
			log_warn("libvirt: cannot reconnect to %s (attempt %u, down %.1f s): %s; "
				 "next attempt in %u ms",
				 uri, id->attempts, (double)(now - id->down_since_ms) / 1000.0,
				 virt_error(), wait);
			id->last_fail_log_ms = now;
		}
		id->next_attempt_ms = now + wait;
		return;
	}
	pthread_mutex_lock(&id->lock);
	id->conn = c;
	id->cids_valid = false;
	id->generation++;
	memset(id->no_lease, 0, sizeof(id->no_lease));
	memset(id->no_cid, 0, sizeof(id->no_cid));
	pthread_mutex_unlock(&id->lock);
	/* Lookups meanwhile still see it down and serve the old caches. */
	rebuild(id, c);
	atomic_store(&id->connected, true);
	atomic_fetch_add(&id->reconnects, 1);
	backoff_reset(&id->backoff);
	log_info("libvirt: reconnected to %s after %.1f s (%u attempts); new peers are "
		 "identified again",
		 uri, (double)(now - id->down_since_ms) / 1000.0, id->attempts);
}

static bool dev_pending(struct vm_identity *id)
{
	bool any;

	pthread_mutex_lock(&id->lock);
	any = id->ndev > 0 || id->dev_overflow;
	pthread_mutex_unlock(&id->lock);
	return any;
}

static void on_tick(int timer, void *ud)
{
	(void)timer;
	(void)ud;
}

static void *event_main(void *arg)
{
	struct vm_identity *id = arg;

	pthread_setname_np(pthread_self(), "vmproxy-libvirt");
	while (!atomic_load(&id->ev_stop)) {
		/* Between dispatches, never inside a callback. */
		if (!atomic_load(&id->connected) && clock_mono_ms() >= id->next_attempt_ms)
			reconnect(id);
		if (atomic_load(&id->connected) && dev_pending(id))
			device_check(id);
		if (virEventRunDefaultImpl() < 0)
			log_warn("libvirt event loop: %s", virt_error());
	}
	return NULL;
}

int vm_identity_start_events(struct vm_identity *id, vm_gone_fn gone, void *userdata)
{
	int r;

	if (!id->conn)
		return 0;
	id->gone = gone;
	id->gone_ud = userdata;
	backoff_init(&id->backoff, RECONNECT_BASE_MS, RECONNECT_MAX_MS, 0);
	r = setup_conn(id, id->conn);
	if (r < 0)
		return r;
	/* Wakes the loop so that a stop request, and a reconnect attempt, are
	 * seen within 200 ms. */
	id->ev_timer = virEventAddTimeout(200, on_tick, NULL, NULL);
	r = pthread_create(&id->ev_thread, NULL, event_main, id);
	if (r)
		return -r;
	id->ev_started = true;
	return 0;
}

int vm_identity_destroy_domain(struct vm_identity *id, const char *name)
{
	virConnectPtr c = get_conn(id);
	virDomainPtr dom;
	int r = 0;

	if (!c)
		return -ENOENT;
	dom = virDomainLookupByName(c, name);
	if (!dom) {
		put_conn(c);
		return -ENOENT;
	}
	if (virDomainDestroy(dom) < 0) {
		log_warn("libvirt: cannot destroy \"%s\": %s", name, virt_error());
		r = -EIO;
	}
	virDomainFree(dom);
	put_conn(c);
	return r;
}

void vm_identity_free(struct vm_identity *id)
{
	if (!id)
		return;
	if (id->ev_started) {
		atomic_store(&id->ev_stop, true);
		pthread_join(id->ev_thread, NULL);
	}
	if (id->ev_timer >= 0)
		virEventRemoveTimeout(id->ev_timer);
	if (id->conn) {
		teardown_conn(id, id->conn);
		virConnectClose(id->conn);
	}
	free(id->cids);
	free(id->statics);
	pthread_mutex_destroy(&id->scan_lock);
	pthread_mutex_destroy(&id->lock);
	free(id);
}
