/* test-vm_identity.c -- who is behind a connection: vsock CID through
 * libvirt (test driver), the static address table (IPv4 and IPv4-mapped
 * IPv6), unknown peers refused or given a derived identity, per-VM socket
 * names, a destroyed domain's CID no longer resolving, a CID taken over by
 * another domain credited to it, reserved CIDs refused without a libvirt
 * call, and an unknown CID in a connect loop costing a bounded number of
 * rescans. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libvirt/libvirt.h>
#include <linux/vm_sockets.h>
#include <time.h>

#include <linux/vm_sockets.h>
#include <sys/socket.h>

#include "config.h"
#include "daemon.h"
#include "vm_identity.h"

static struct proxy_config cfg;
static struct static_identity statics[2];
static char uri[512];

static void setup_cfg(bool libvirt, enum unknown_peers policy)
{
	memset(&cfg, 0, sizeof(cfg));
	statics[0] = (struct static_identity){ "127.10.0.5", "guest-b", NULL };
	statics[1] = (struct static_identity){ "127.10.0.6", "not-in-libvirt",
					       "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee" };
	snprintf(uri, sizeof(uri), "test://%s", getenv("VMPROXY_TEST_NODE_XML"));
	cfg.identity.libvirt_uri = libvirt ? uri : NULL;
	cfg.identity.statics = libvirt ? statics : statics + 1;
	cfg.identity.n_statics = libvirt ? 2 : 1;
	cfg.identity.unknown_peers = policy;
}

static struct sockaddr_in v4(const char *a)
{
	struct sockaddr_in s = { .sin_family = AF_INET };

	inet_pton(AF_INET, a, &s.sin_addr);
	return s;
}

static void test_cid_resolution(void **state)
{
	struct vm_identity *id;
	struct vm_info vm;
	char err[300];

	setup_cfg(true, UNKNOWN_PEERS_REJECT);
	cfg.identity.libvirt_read_write = true; /* to destroy a domain below */
	if (vm_identity_new(&cfg, &id, err, sizeof(err)) < 0)
		fail_msg("vm_identity_new: %s", err);
	assert_int_equal(vm_identity_by_cid(id, 21, &vm), 0);
	assert_string_equal(vm.name, "guest-a");
	assert_string_equal(vm.uuid, "11111111-2222-4333-8444-555555555501");
	assert_int_equal(vm.cid, 21);
	assert_int_equal(vm_identity_by_cid(id, 22, &vm), 0);
	assert_string_equal(vm.name, "guest-b");
	assert_int_equal(vm_identity_by_cid(id, 99, &vm), -ENOENT);

	/* A domain that is not running does not own its CID. */
	assert_int_equal(vm_identity_destroy_domain(id, "guest-a"), 0);
	assert_int_equal(vm_identity_by_cid(id, 21, &vm), -ENOENT);
	assert_int_equal(vm_identity_by_cid(id, 22, &vm), 0);
	vm_identity_free(id);
}

/* By default the connection is read-only: identities resolve, nothing can
 * be changed through it. */
static void test_read_only_by_default(void **state)
{
	struct vm_identity *id;
	struct vm_info vm;
	char err[300];

	setup_cfg(true, UNKNOWN_PEERS_REJECT);
	if (vm_identity_new(&cfg, &id, err, sizeof(err)) < 0)
		fail_msg("vm_identity_new: %s", err);
	assert_int_equal(vm_identity_by_cid(id, 21, &vm), 0);
	assert_string_equal(vm.name, "guest-a");
	assert_int_equal(vm_identity_destroy_domain(id, "guest-a"), -EIO);
	assert_int_equal(vm_identity_by_cid(id, 21, &vm), 0);
	vm_identity_free(id);
}

static void test_static_table(void **state)
{
	struct vm_identity *id;
	struct vm_info vm;
	struct sockaddr_in a = v4("127.10.0.5"), unknown = v4("127.99.0.1");
	struct sockaddr_in6 mapped = { .sin6_family = AF_INET6 };
	char err[300];

	setup_cfg(true, UNKNOWN_PEERS_REJECT);
	if (vm_identity_new(&cfg, &id, err, sizeof(err)) < 0)
		fail_msg("vm_identity_new: %s", err);
	/* vm "guest-b" is a libvirt domain: its uuid and CID come from there. */
	assert_int_equal(vm_identity_by_address(id, (struct sockaddr *)&a, sizeof(a), &vm), 0);
	assert_string_equal(vm.name, "guest-b");
	assert_string_equal(vm.uuid, "11111111-2222-4333-8444-555555555502");
	assert_int_equal(vm.cid, 22);
	inet_pton(AF_INET6, "::ffff:127.10.0.6", &mapped.sin6_addr);
	assert_int_equal(vm_identity_by_address(id, (struct sockaddr *)&mapped, sizeof(mapped), &vm),
			 0);
	assert_string_equal(vm.name, "not-in-libvirt");
	assert_string_equal(vm.uuid, "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee");
	assert_int_equal(vm_identity_by_address(id, (struct sockaddr *)&unknown, sizeof(unknown),
						&vm),
			 -ENOENT);
	assert_int_equal(vm_identity_by_name(id, "guest-a", &vm), 0);
	assert_int_equal(vm.cid, 21);
	assert_int_equal(vm_identity_by_name(id, "11111111-2222-4333-8444-555555555502", &vm), 0);
	assert_string_equal(vm.name, "guest-b");
	assert_int_equal(vm_identity_by_name(id, "nope", &vm), -ENOENT);
	vm_identity_free(id);
}

/* A TCP peer not in the static table is looked up in libvirt's DHCP
 * leases: the test driver reports 192.168.122.3 for guest-a's NIC on the
 * node file's "default" network. */
static void test_dhcp_lease(void **state)
{
	struct vm_identity *id;
	struct vm_info vm;
	struct sockaddr_in leased = v4("192.168.122.3"), other = v4("192.168.122.200");
	uint64_t scans;
	char err[300];

	setup_cfg(true, UNKNOWN_PEERS_REJECT);
	if (vm_identity_new(&cfg, &id, err, sizeof(err)) < 0)
		fail_msg("vm_identity_new: %s", err);
	assert_int_equal(vm_identity_by_address(id, (struct sockaddr *)&leased, sizeof(leased),
						&vm),
			 0);
	assert_string_equal(vm.name, "guest-a");
	assert_string_equal(vm.uuid, "11111111-2222-4333-8444-555555555501");
	assert_int_equal(vm.cid, 21);
	assert_int_equal(vm_identity_by_address(id, (struct sockaddr *)&other, sizeof(other), &vm),
			 -ENOENT);
	/* An address without a lease is not scanned again at once: a guest
	 * retrying from it costs no libvirt calls. */
	scans = vm_identity_lease_scans(id);
	for (int i = 0; i < 100; i++)
		assert_int_equal(vm_identity_by_address(id, (struct sockaddr *)&other,
							sizeof(other), &vm),
				 -ENOENT);
	assert_int_equal(vm_identity_lease_scans(id), scans);
	vm_identity_free(id);
}

static void test_unknown_by_address(void **state)
{
	struct vm_identity *id;
	struct vm_info a1, a2, b;
	struct sockaddr_in x = v4("127.99.0.1"), y = v4("127.99.0.2");
	char err[300];

	setup_cfg(false, UNKNOWN_PEERS_BY_ADDRESS);
	if (vm_identity_new(&cfg, &id, err, sizeof(err)) < 0)
		fail_msg("vm_identity_new: %s", err);
	assert_int_equal(vm_identity_by_address(id, (struct sockaddr *)&x, sizeof(x), &a1), 0);
	assert_int_equal(vm_identity_by_address(id, (struct sockaddr *)&x, sizeof(x), &a2), 0);
	assert_int_equal(vm_identity_by_address(id, (struct sockaddr *)&y, sizeof(y), &b), 0);
	assert_string_equal(a1.name, "addr-127.99.0.1");
	assert_string_equal(a1.uuid, a2.uuid); /* stable */
	assert_string_not_equal(a1.uuid, b.uuid);
	assert_int_equal(strlen(a1.uuid), 36);
	assert_int_equal(a1.uuid[14], '8'); /* version 8: derived */
	/* Without libvirt, CIDs resolve to nothing. */
	assert_int_equal(vm_identity_by_cid(id, 21, &a1), -ENOENT);
	vm_identity_free(id);
}

static uint64_t calls(struct vm_identity *id)
{
	struct vm_identity_stats st;

	vm_identity_stats(id, &st);
	return st.libvirt_calls;
}

static uint64_t rescans(struct vm_identity *id)
{
	struct vm_identity_stats st;

	vm_identity_stats(id, &st);
	return st.cid_rescans;
}

/* 0 (hypervisor), 1 (loopback: any local user), 2 (the host, or the outer
 * hypervisor when nested) and VMADDR_CID_ANY are never a guest: refused
 * before any libvirt call, even with an empty cache. */
static void test_reserved_cids(void **state)
{
	static const uint32_t reserved[] = { 0, 1, 2, VMADDR_CID_ANY };
	struct vm_identity *id;
	struct vm_info vm;
	uint64_t c0;
	char err[300];

	setup_cfg(true, UNKNOWN_PEERS_REJECT);
	if (vm_identity_new(&cfg, &id, err, sizeof(err)) < 0)
		fail_msg("vm_identity_new: %s", err);
	c0 = calls(id); /* the static table's domains were looked up */
	for (size_t i = 0; i < sizeof(reserved) / sizeof(reserved[0]); i++) {
		assert_int_not_equal(vm_identity_by_cid(id, reserved[i], &vm), 0);
		assert_int_equal(calls(id), c0);
	}
	assert_true(vm_identity_cid_reserved(2));
	assert_false(vm_identity_cid_reserved(3));
	assert_int_equal(vm_identity_by_cid(id, 21, &vm), 0);
	assert_true(calls(id) > c0);
	vm_identity_free(id);
}

/* The acceptor's side (no RPC ever): what the static table and the
 * negative caches decide, or -EAGAIN for a lookup thread. */
static void test_cached_answers(void **state)
{
	struct vm_identity *id;
	struct vm_info vm;
	struct sockaddr_in st = v4("127.10.0.5"), leased = v4("192.168.122.3"),
			   none = v4("192.168.122.200");
	uint64_t c0;
	char err[300];

	(void)state;
	setup_cfg(true, UNKNOWN_PEERS_REJECT);
	if (vm_identity_new(&cfg, &id, err, sizeof(err)) < 0)
		fail_msg("vm_identity_new: %s", err);
	c0 = calls(id);
	assert_int_equal(vm_identity_by_cid_cached(id, 2, &vm), -EPERM);
	assert_int_equal(vm_identity_by_cid_cached(id, 21, &vm), -EAGAIN);
	assert_int_equal(vm_identity_by_address_cached(id, (struct sockaddr *)&st, sizeof(st), &vm),
			 0);
	assert_string_equal(vm.name, "guest-b");
	assert_int_equal(
		vm_identity_by_address_cached(id, (struct sockaddr *)&leased, sizeof(leased), &vm),
		-EAGAIN);
	assert_int_equal(vm_identity_by_name_cached(id, "guest-b", &vm), 0);
	assert_int_equal(vm_identity_by_name_cached(id, "guest-a", &vm), -EAGAIN);
	assert_int_equal(calls(id), c0);
	/* Found unknown by a lookup: the acceptor refuses them itself. */
	assert_int_equal(vm_identity_by_cid(id, 99, &vm), -ENOENT);
	assert_int_equal(vm_identity_by_address(id, (struct sockaddr *)&none, sizeof(none), &vm),
			 -ENOENT);
	c0 = calls(id);
	assert_int_equal(vm_identity_by_cid_cached(id, 99, &vm), -ENOENT);
	assert_int_equal(
		vm_identity_by_address_cached(id, (struct sockaddr *)&none, sizeof(none), &vm),
		-ENOENT);
	assert_int_equal(calls(id), c0);
	vm_identity_free(id);
}

static uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* 1000 connects from a CID no domain has cost one rescan (then the CID is
 * remembered as unknown), and a known VM connecting in between is served
 * from the cache with the two RPCs of its proof, no rescan. */
static void test_unknown_cid_loop(void **state)
{
	struct vm_identity *id;
	struct vm_info vm;
	uint64_t before, r0, worst_us = 0;
	char err[300];

	setup_cfg(true, UNKNOWN_PEERS_REJECT);
	if (vm_identity_new(&cfg, &id, err, sizeof(err)) < 0)
		fail_msg("vm_identity_new: %s", err);
	assert_int_equal(vm_identity_by_cid(id, 21, &vm), 0);
	r0 = rescans(id);
	for (int i = 0; i < 1000; i++) {
		assert_int_equal(vm_identity_by_cid(id, 99, &vm), -ENOENT);
		if (i % 100 == 50) {
			uint64_t t0 = now_us(), c0 = calls(id);

			assert_int_equal(vm_identity_by_cid(id, 22, &vm), 0);
			assert_string_equal(vm.name, "guest-b");
			assert_true(calls(id) - c0 <= 2);
			if (now_us() - t0 > worst_us)
				worst_us = now_us() - t0;
		}
	}
	assert_true(rescans(id) - r0 <= 1);
	print_message("known VM among 1000 unknown connects: slowest lookup %llu us\n",
		      (unsigned long long)worst_us);

	/* 1000 different unknown CIDs: rescans are spaced a second apart. */
	before = rescans(id);
	{
		uint64_t t0 = now_us(), elapsed_s;

		for (uint32_t c = 1000; c < 2000; c++)
			assert_int_equal(vm_identity_by_cid(id, c, &vm), -ENOENT);
		elapsed_s = (now_us() - t0) / 1000000u;
		assert_true(rescans(id) - before <= elapsed_s + 2);
	}
	vm_identity_free(id);
}

static const char *domain_xml(const char *name, const char *uuid, unsigned cid, char *buf,
			      size_t len)
{
	snprintf(buf, len,
		 "<domain type='test'><name>%s</name><uuid>%s</uuid><memory>131072</memory>"
		 "<vcpu>1</vcpu><os><type>hvm</type></os><devices><vsock model='virtio'>"
		 "<cid auto='no' address='%u'/></vsock></devices></domain>",
		 name, uuid, cid);
	return buf;
}

/* libvirt gives auto CIDs as the first free one: guest-a has 21 and
 * stops, guest-c starts and takes 21, guest-a restarts with 23. Without
 * any lifecycle event processed, guest-c's connection is guest-c's and
 * guest-a is found on its new CID. */
static void test_cid_reuse(void **state)
{
	struct vm_identity *id;
	struct vm_info vm;
	virConnectPtr conn;
	virDomainPtr a, c;
	char err[300], xml[600];

	setup_cfg(true, UNKNOWN_PEERS_REJECT);
	cfg.identity.libvirt_read_write = true;
	if (vm_identity_new(&cfg, &id, err, sizeof(err)) < 0)
		fail_msg("vm_identity_new: %s", err);
	conn = vm_identity_libvirt_conn(id);
	assert_int_equal(vm_identity_by_cid(id, 21, &vm), 0);
	assert_string_equal(vm.name, "guest-a");

	a = virDomainLookupByName(conn, "guest-a");
	assert_non_null(a);
	assert_int_equal(virDomainDestroy(a), 0);
	c = virDomainDefineXML(conn, domain_xml("guest-c", "11111111-2222-4333-8444-555555555503",
						21, xml, sizeof(xml)));
	assert_non_null(c);
	assert_int_equal(virDomainCreate(c), 0);
	virDomainFree(a);
	a = virDomainDefineXML(conn, domain_xml("guest-a", "11111111-2222-4333-8444-555555555501",
						23, xml, sizeof(xml)));
	assert_non_null(a);
	assert_int_equal(virDomainCreate(a), 0);

	assert_int_equal(vm_identity_by_cid(id, 21, &vm), 0);
	assert_string_equal(vm.name, "guest-c");
	assert_string_equal(vm.uuid, "11111111-2222-4333-8444-555555555503");
	assert_int_equal(vm_identity_by_cid(id, 23, &vm), 0);
	assert_string_equal(vm.name, "guest-a");
	assert_int_equal(vm.cid, 23);

	/* guest-c stops and guest-a's CID moves back to 21 in one go: the
	 * cached (21, guest-c) fails its proof. */
	assert_int_equal(virDomainDestroy(c), 0);
	assert_int_equal(virDomainDestroy(a), 0);
	virDomainFree(a);
	a = virDomainDefineXML(conn, domain_xml("guest-a", "11111111-2222-4333-8444-555555555501",
						21, xml, sizeof(xml)));
	assert_non_null(a);
	assert_int_equal(virDomainCreate(a), 0);
	assert_int_equal(vm_identity_by_cid(id, 21, &vm), 0);
	assert_string_equal(vm.name, "guest-a");
	assert_int_equal(vm_identity_by_cid(id, 23, &vm), -ENOENT);
	virDomainFree(a);
	virDomainFree(c);
	vm_identity_free(id);
}

static void test_bad_uri(void **state)
{
	struct vm_identity *id = NULL;
	char err[300];

	setup_cfg(true, UNKNOWN_PEERS_REJECT);
	cfg.identity.libvirt_uri = "test:///nonexistent/node.xml";
	assert_true(vm_identity_new(&cfg, &id, err, sizeof(err)) < 0);
	assert_non_null(strstr(err, "identity.libvirt_uri \"test:///nonexistent/node.xml\""));
	assert_null(id);
}

/* The accept boundary of a vsock listener: the peer address accept() gives
 * (made up here: vsock loopback does not work everywhere) is looked up by
 * its CID; the host itself and unknown CIDs are refused, and so is an
 * address that is not a vsock one. */
static void test_vsock_accept_boundary(void **state)
{
	struct listener_config lc = { .type = LISTENER_VSOCK, .port = 5672 };
	struct sockaddr_storage ss;
	struct sockaddr_vm *svm = (struct sockaddr_vm *)&ss;
	struct sockaddr_in in = v4("127.10.0.5");
	struct vm_identity *id;
	struct vm_info vm;
	char err[300];

	setup_cfg(true, UNKNOWN_PEERS_REJECT);
	if (vm_identity_new(&cfg, &id, err, sizeof(err)) < 0)
		fail_msg("vm_identity_new: %s", err);
	memset(&ss, 0, sizeof(ss));
	svm->svm_family = AF_VSOCK;
	svm->svm_port = 1234;
	svm->svm_cid = 21;
	assert_int_equal(vmproxy_identify_peer(id, &lc, &ss, sizeof(*svm), &vm), 0);
	assert_string_equal(vm.name, "guest-a");
	assert_int_equal(vm.cid, 21);
	svm->svm_cid = VMADDR_CID_HOST;
	assert_true(vmproxy_identify_peer(id, &lc, &ss, sizeof(*svm), &vm) < 0);
	svm->svm_cid = 1; /* the local CID: vsock loopback */
	assert_true(vmproxy_identify_peer(id, &lc, &ss, sizeof(*svm), &vm) < 0);
	svm->svm_cid = 99;
	assert_true(vmproxy_identify_peer(id, &lc, &ss, sizeof(*svm), &vm) < 0);
	/* A TCP peer's address handed to a vsock listener is nobody. */
	memset(&ss, 0, sizeof(ss));
	memcpy(&ss, &in, sizeof(in));
	assert_true(vmproxy_identify_peer(id, &lc, &ss, sizeof(in), &vm) < 0);
	vm_identity_free(id);
}

/* What the event thread reported, for test_event_handling. */
static struct {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	unsigned calls;
	struct vm_info vm;
	enum vm_change how;
} seen = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, { "", "", 0 }, VM_STOPPED };

static void on_change(void *ud, const struct vm_info *vm, enum vm_change how)
{
	(void)ud;
	pthread_mutex_lock(&seen.lock);
	seen.calls++;
	seen.vm = *vm;
	seen.how = how;
	pthread_cond_broadcast(&seen.cond);
	pthread_mutex_unlock(&seen.lock);
}

/* Wait (10 s at most) for the report number N. */
static void wait_call(unsigned n)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += 10;
	pthread_mutex_lock(&seen.lock);
	while (seen.calls < n)
		if (pthread_cond_timedwait(&seen.cond, &seen.lock, &ts) != 0)
			break;
	pthread_mutex_unlock(&seen.lock);
	assert_int_equal(seen.calls, n);
}

/* Lifecycle events as a live migration sends them (libvirt's test driver
 * cannot): STOPPED and SUSPENDED with the MIGRATED detail are the VM
 * leaving, other stops are stops, other pauses nothing; a device added or
 * removed reports the domain's CID as it is now. */
static void test_event_handling(void **state)
{
	struct vm_identity *id;
	char err[256];
	static const struct {
		int event, detail;
		bool reported;
		enum vm_change how;
	} cases[] = {
		{ VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_STOPPED_MIGRATED, true, VM_MIGRATING_AWAY },
		{ VIR_DOMAIN_EVENT_SUSPENDED, VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED, true,
		  VM_MIGRATING_AWAY },
		{ VIR_DOMAIN_EVENT_SUSPENDED, VIR_DOMAIN_EVENT_SUSPENDED_PAUSED, false, VM_STOPPED },
		{ VIR_DOMAIN_EVENT_RESUMED, VIR_DOMAIN_EVENT_RESUMED_MIGRATED, false, VM_STOPPED },
		{ VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_STOPPED_DESTROYED, true, VM_STOPPED },
		{ VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_STOPPED_CRASHED, true, VM_STOPPED },
		{ VIR_DOMAIN_EVENT_UNDEFINED, VIR_DOMAIN_EVENT_UNDEFINED_REMOVED, true, VM_STOPPED },
	};
	unsigned n = 0;

	(void)state;
	setup_cfg(true, UNKNOWN_PEERS_REJECT);
	assert_int_equal(vm_identity_new(&cfg, &id, err, sizeof(err)), 0);
	assert_int_equal(vm_identity_start_events(id, on_change, NULL), 0);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		assert_int_equal(vm_identity_test_event(id, "guest-a", false, cases[i].event,
							cases[i].detail),
				 0);
		if (!cases[i].reported) {
			assert_int_equal(seen.calls, n);
			continue;
		}
		assert_int_equal(seen.calls, ++n);
		assert_int_equal(seen.how, cases[i].how);
		assert_string_equal(seen.vm.uuid, "11111111-2222-4333-8444-555555555501");
	}
	/* A device event is handled by the event thread: the CID read anew. */
	assert_int_equal(vm_identity_test_event(id, "guest-b", true, 0, 0), 0);
	wait_call(++n);
	assert_int_equal(seen.how, VM_CID_CHANGED);
	assert_string_equal(seen.vm.name, "guest-b");
	assert_int_equal(seen.vm.cid, 22);
	assert_int_equal(vm_identity_test_event(id, "no-such-domain", false, 0, 0), -ENOENT);
	vm_identity_free(id);
}

/* The libvirt connection's life: lost, VMs known before are served from
 * the caches as last seen and others refused with -ENOTCONN (both
 * counted); reopening fails while libvirt cannot be reached, each wait
 * longer than the one before; once it opens again the caches are rebuilt
 * from the new connection (a domain destroyed on the old one runs again in
 * the test driver's fresh copy) and new peers resolve. */
static void test_reconnect_state_machine(void **state)
{
	struct vm_identity *id;
	struct vm_identity_stats st;
	struct vm_info vm;
	uint32_t wait1, wait2, wait3, wait;
	char err[300];

	(void)state;
	setup_cfg(true, UNKNOWN_PEERS_REJECT);
	cfg.identity.libvirt_read_write = true; /* to destroy a domain below */
	if (vm_identity_new(&cfg, &id, err, sizeof(err)) < 0)
		fail_msg("vm_identity_new: %s", err);
	assert_int_equal(vm_identity_by_cid(id, 22, &vm), 0); /* guest-b known */
	assert_int_equal(vm_identity_destroy_domain(id, "guest-a"), 0);
	assert_int_equal(vm_identity_by_cid(id, 21, &vm), -ENOENT);
	vm_identity_stats(id, &st);
	assert_true(st.libvirt_connected);

	vm_identity_test_lose(id);
	vm_identity_stats(id, &st);
	assert_false(st.libvirt_connected);
	assert_int_equal(st.libvirt_disconnects, 1);
	assert_int_equal(vm_identity_by_cid(id, 22, &vm), 0);
	assert_string_equal(vm.name, "guest-b");
	assert_int_equal(vm_identity_by_cid(id, 23, &vm), -ENOTCONN); /* never seen */
	vm_identity_stats(id, &st);
	assert_int_equal(st.served_unreachable, 1);
	assert_int_equal(st.refused_unreachable, 1);

	/* libvirt cannot be reached: attempts fail, backing off. */
	cfg.identity.libvirt_uri = "test:///nonexistent/vmproxy-node.xml";
	assert_int_equal(vm_identity_test_reconnect(id, &wait1), -ECONNREFUSED);
	assert_int_equal(vm_identity_test_reconnect(id, &wait2), -ECONNREFUSED);
	assert_int_equal(vm_identity_test_reconnect(id, &wait3), -ECONNREFUSED);
	/* 250 ms doubling (with jitter down to half): the third wait is
	 * longer than the first could be. */
	if (!(wait1 <= 500 && wait3 > 900 && wait3 <= 2000))
		fail_msg("waits %u, %u, %u ms", wait1, wait2, wait3);
	vm_identity_stats(id, &st);
	assert_false(st.libvirt_connected);
	assert_int_equal(st.libvirt_reconnect_failures, 3);
	assert_int_equal(vm_identity_by_cid(id, 22, &vm), 0); /* still served */

	/* Back: connected, counted, caches from the new connection. */
	cfg.identity.libvirt_uri = uri;
	assert_int_equal(vm_identity_test_reconnect(id, &wait), 0);
	vm_identity_stats(id, &st);
	assert_true(st.libvirt_connected);
	assert_int_equal(st.libvirt_reconnects, 1);
	assert_int_equal(vm_identity_by_cid(id, 21, &vm), 0);
	assert_string_equal(vm.name, "guest-a");
	assert_int_equal(vm_identity_by_cid(id, 23, &vm), -ENOENT); /* asked again: unknown */
	vm_identity_free(id);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_cid_resolution),
		cmocka_unit_test(test_vsock_accept_boundary),
		cmocka_unit_test(test_read_only_by_default),
		cmocka_unit_test(test_static_table),
		cmocka_unit_test(test_dhcp_lease),
		cmocka_unit_test(test_unknown_by_address),
		cmocka_unit_test(test_reserved_cids),
		cmocka_unit_test(test_unknown_cid_loop),
		cmocka_unit_test(test_cid_reuse),
		cmocka_unit_test(test_bad_uri),
		cmocka_unit_test(test_event_handling),
		cmocka_unit_test(test_cached_answers),
		cmocka_unit_test(test_reconnect_state_machine),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
