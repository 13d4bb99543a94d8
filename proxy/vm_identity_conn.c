/* vm_identity_conn.c -- the libvirt connection's life and its events
 * (vm_identity_impl.h), on the libvirt event thread.
 *
 * The connection comes and goes: keepalive (5 s, 3 missed) and a close
 * callback notice a libvirtd that died or hangs; the event thread then
 * reopens it with backoff (250 ms doubling to 10 s). Lookups take a
 * reference on the connection, so a reconnect never frees one under
 * them. While it is down the caches serve what they know; once it is
 * back, the caches are rebuilt from the running domains, the lifecycle
 * events registered again, and the known VMs that no longer run are
 * reported gone (their stop was missed). Lifecycle and device events
 * invalidate the caches and tell the daemon which VMs stopped, are
 * migrating away or changed their CID. */
#include "vm_identity_impl.h"

#include <errno.h>
#include <libvirt/virterror.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "log.h"

#define KEEPALIVE_INTERVAL_S 5
#define KEEPALIVE_COUNT      3
#define RECONNECT_BASE_MS    250
#define RECONNECT_MAX_MS     10000
/* A failing reconnect is logged at the first attempt, then at most this
 * often. */
#define RECONNECT_LOG_MS 30000

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
	c = vm_identity_get_conn(id);
	for (size_t i = 0; c && i < n; i++) {
		virDomainPtr dom;
		struct vm_info vm;

		atomic_fetch_add(&id->libvirt_calls, 1);
		dom = virDomainLookupByUUIDString(c, pending[i]);
		if (!dom)
			continue;
		if (virDomainIsActive(dom) == 1 &&
		    vm_identity_info_from_domain(id, dom, &vm) == 0) {
			log_info("vm=%s: a device was added or removed: its vsock CID is now %u",
				 vm.name, vm.cid);
			if (id->gone)
				id->gone(id->gone_ud, &vm, VM_CID_CHANGED);
		}
		virDomainFree(dom);
	}
	vm_identity_put_conn(c);
}

int vm_identity_test_event(struct vm_identity *id, const char *name, bool device, int event,
			   int detail)
{
	struct vm_info vm;

	if (vm_identity_lookup_libvirt(id, name, &vm) < 0)
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
		log_debug("libvirt: no keepalive on this connection: %s", vm_identity_virt_error());
	id->close_cb = virConnectRegisterCloseCallback(c, on_close, id, NULL) == 0;
	if (!id->close_cb)
		log_debug("libvirt: no close callback on this connection: %s",
			  vm_identity_virt_error());
	id->ev_callback =
		virConnectDomainEventRegisterAny(c, NULL, VIR_DOMAIN_EVENT_ID_LIFECYCLE,
						 VIR_DOMAIN_EVENT_CALLBACK(on_lifecycle), id, NULL);
	if (id->ev_callback < 0) {
		log_error("libvirt: cannot register lifecycle events: %s",
			  vm_identity_virt_error());
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
			 vm_identity_virt_error());
	return 0;
}

void vm_identity_teardown_conn(struct vm_identity *id, virConnectPtr c)
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

/* One running domain DOM during a rebuild: mark it running in KNOWN (N
 * entries) and add its leased addresses to ADDRS (*NADDRS of ADDR_SLOTS
 * used). */
static void rebuild_domain(struct vm_identity *id, virDomainPtr dom, struct known_vm *known,
			   size_t nknown, struct addr_known *addrs, size_t *naddrs)
{
	virDomainInterfacePtr *ifs = NULL;
	char uuid[VM_UUID_LEN + 1];
	const char *name = virDomainGetName(dom);
	int nif;

	if (virDomainGetUUIDString(dom, uuid) == 0) {
		for (size_t k = 0; k < nknown; k++)
			if (strcmp(known[k].vm.uuid, uuid) == 0)
				known[k].running = true;
	}
	atomic_fetch_add(&id->libvirt_calls, 1);
	nif = virDomainInterfaceAddresses(dom, &ifs, VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0);
	for (int j = 0; j < nif; j++) {
		for (unsigned a = 0; a < ifs[j]->naddrs; a++) {
			struct addr_known *e = &addrs[*naddrs];

			if (*naddrs >= ADDR_SLOTS || !ifs[j]->addrs[a].addr ||
			    vm_identity_parse_addr(ifs[j]->addrs[a].addr, &e->family, e->addr) < 0)
				continue;
			snprintf(e->vm.uuid, sizeof(e->vm.uuid), "%s", uuid);
			snprintf(e->vm.name, sizeof(e->vm.name), "%s", name ? name : "?");
			(*naddrs)++;
		}
		virDomainInterfaceFree(ifs[j]);
	}
	free(ifs);
}

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
	if (vm_identity_rescan(id, c) < 0)
		goto out;
	atomic_fetch_add(&id->libvirt_calls, 1);
	n = virConnectListAllDomains(c, &doms, VIR_CONNECT_LIST_DOMAINS_ACTIVE);
	for (int i = 0; i < n; i++) {
		rebuild_domain(id, doms[i], known, nknown, addrs, &naddrs);
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
		vm_identity_teardown_conn(id, old);
		virConnectClose(old);
	}
	id->attempts++;
	c = id->cfg->identity.libvirt_read_write ? virConnectOpen(uri)
						 : virConnectOpenReadOnly(uri);
	if (c && setup_conn(id, c) < 0) {
		vm_identity_teardown_conn(id, c);
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
				 vm_identity_virt_error(), wait);
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

void vm_identity_test_lose(struct vm_identity *id)
{
	/* As vm_identity_start_events would have set it up. */
	backoff_init(&id->backoff, RECONNECT_BASE_MS, RECONNECT_MAX_MS, 0);
	on_close(NULL, VIR_CONNECT_CLOSE_REASON_EOF, id);
}

int vm_identity_test_reconnect(struct vm_identity *id, uint32_t *wait_ms)
{
	reconnect(id);
	if (atomic_load(&id->connected)) {
		*wait_ms = 0;
		return 0;
	}
	*wait_ms = (uint32_t)(id->next_attempt_ms - clock_mono_ms());
	return -ECONNREFUSED;
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
			log_warn("libvirt event loop: %s", vm_identity_virt_error());
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
