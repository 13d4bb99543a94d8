/* vm_identity_addr.c -- identity by source address (vm_identity_impl.h):
 * the static table, then the DHCP leases libvirt knows (one scan of the
 * running domains, remembered both ways: a hit serves while libvirt is
 * unreachable, a miss is not scanned again for a while), then the
 * unknown_peers policy. */
#include "vm_identity_impl.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"

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
					r = vm_identity_info_from_domain(id, doms[i], out);
			virDomainInterfaceFree(ifs[j]);
		}
		free(ifs);
		virDomainFree(doms[i]);
	}
	free(doms);
	return r != 0 && vm_identity_conn_lost(c) ? -ENOTCONN : r;
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
		virConnectPtr c = vm_identity_get_conn(id);
		int r = -ENOTCONN;

		if (c) {
			atomic_fetch_add(&id->lease_scans, 1);
			r = by_leases(id, c, text, out);
			vm_identity_put_conn(c);
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
