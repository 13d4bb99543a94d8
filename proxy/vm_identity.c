/* vm_identity.c -- see vm_identity.h. libvirt's errors are turned into
 * -errno and a log line in vm_identity*.c; nothing else in the daemon sees
 * them. This file holds the object (open, stats, free), the libvirt
 * helpers the others share, and the static table and lookups by name.
 * The CID cache is in vm_identity_cid.c, addresses and leases in
 * vm_identity_addr.c, the connection's life and its events in
 * vm_identity_conn.c; vm_identity_impl.h is what they share. */
#include "vm_identity_impl.h"

#include <arpa/inet.h>
#include <errno.h>
#include <libvirt/virterror.h>
#include <libxml/parser.h>
#include <libxml/xpath.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"

static void silent_error(void *ud, virErrorPtr err)
{
	(void)ud;
	(void)err;
}

const char *vm_identity_virt_error(void)
{
	virErrorPtr e = virGetLastError();

	return e && e->message ? e->message : "unknown libvirt error";
}

virConnectPtr vm_identity_get_conn(struct vm_identity *id)
{
	virConnectPtr c = NULL;

	pthread_mutex_lock(&id->lock);
	if (id->conn && atomic_load(&id->connected) && virConnectRef(id->conn) == 0)
		c = id->conn;
	pthread_mutex_unlock(&id->lock);
	return c;
}

void vm_identity_put_conn(virConnectPtr c)
{
	if (c)
		virConnectClose(c);
}

bool vm_identity_conn_lost(virConnectPtr c)
{
	return virConnectIsAlive(c) != 1;
}

int vm_identity_info_from_domain(struct vm_identity *id, virDomainPtr dom, struct vm_info *vm)
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

int vm_identity_lookup_libvirt(struct vm_identity *id, const char *name_or_uuid, struct vm_info *vm)
{
	virConnectPtr c;
	virDomainPtr dom;
	int r;

	if (!id->cfg->identity.libvirt_uri)
		return -ENOENT;
	c = vm_identity_get_conn(id);
	if (!c)
		return -ENOTCONN;
	atomic_fetch_add(&id->libvirt_calls, 1);
	dom = virDomainLookupByName(c, name_or_uuid);
	if (!dom) {
		atomic_fetch_add(&id->libvirt_calls, 1);
		dom = virDomainLookupByUUIDString(c, name_or_uuid);
	}
	if (!dom) {
		r = vm_identity_conn_lost(c) ? -ENOTCONN : -ENOENT;
		vm_identity_put_conn(c);
		return r;
	}
	r = vm_identity_info_from_domain(id, dom, vm);
	virDomainFree(dom);
	vm_identity_put_conn(c);
	return r;
}

int vm_identity_parse_addr(const char *s, int *family, uint8_t addr[16])
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
			snprintf(err, errlen, "libvirt event loop: %s", vm_identity_virt_error());
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
				 cfg->identity.libvirt_uri, vm_identity_virt_error());
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

		if (vm_identity_parse_addr(s->address, &e->family, e->addr) < 0) {
			snprintf(err, errlen, "identity.static[%zu].address: \"%s\" is not numeric", i,
				 s->address);
			vm_identity_free(id);
			return -EINVAL;
		}
		if (vm_identity_lookup_libvirt(id, s->vm, &e->vm) < 0) {
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
	return vm_identity_lookup_libvirt(id, name_or_uuid, out);
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

		if (vm_identity_parse_addr(s->address, &e->family, e->addr) < 0) {
			snprintf(err, errlen, "identity.static[%zu].address: \"%s\" is not numeric", i,
				 s->address);
			free(add);
			return -EINVAL;
		}
		if (vm_identity_lookup_libvirt(id, s->vm, &e->vm) < 0) {
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
	virConnectPtr c = vm_identity_get_conn(id);

	if (c) {
		nd = virConnectListAllDomains(c, &doms, VIR_CONNECT_LIST_DOMAINS_ACTIVE);
		if (nd < 0) {
			log_warn("libvirt: cannot list domains: %s", vm_identity_virt_error());
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

		if (vms && vm_identity_info_from_domain(id, doms[i], &vm) == 0) {
			for (size_t j = 0; j < k && !dup; j++)
				dup = strcmp(vms[j].uuid, vm.uuid) == 0;
			if (!dup)
				vms[k++] = vm;
		}
		virDomainFree(doms[i]);
	}
	free(doms);
	vm_identity_put_conn(c);
	if (!vms)
		return -ENOMEM;
	*out = vms;
	*n = k;
	return r;
}

int vm_identity_destroy_domain(struct vm_identity *id, const char *name)
{
	virConnectPtr c = vm_identity_get_conn(id);
	virDomainPtr dom;
	int r = 0;

	if (!c)
		return -ENOENT;
	dom = virDomainLookupByName(c, name);
	if (!dom) {
		vm_identity_put_conn(c);
		return -ENOENT;
	}
	if (virDomainDestroy(dom) < 0) {
		log_warn("libvirt: cannot destroy \"%s\": %s", name, vm_identity_virt_error());
		r = -EIO;
	}
	virDomainFree(dom);
	vm_identity_put_conn(c);
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
		vm_identity_teardown_conn(id, id->conn);
		virConnectClose(id->conn);
	}
	free(id->cids);
	free(id->statics);
	pthread_mutex_destroy(&id->scan_lock);
	pthread_mutex_destroy(&id->lock);
	free(id);
}
