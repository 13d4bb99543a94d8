/* test-daemon-vsock_accept.c -- the acceptor's decision for vsock peers, with the
 * whole daemon in-process on libvirt's test driver. vsock connections
 * cannot be made on a machine without a guest, so each "connection" is one
 * end of a socketpair handed to the acceptor with the peer CID it would
 * have had (vmproxy_admit). Shown: reserved CIDs refused without a libvirt
 * call; a connect loop from an unknown CID costs at most one rescan while a
 * known VM is admitted in between from the cache; a CID that moved from
 * one domain to another is credited to the new one; a lifecycle event
 * forgets a CID remembered as unknown. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <libvirt/libvirt.h>
#include <linux/vm_sockets.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "daemon.h"
#include "log.h"
#include "vm_identity.h"

static char dir[] = "/tmp/vmproxy-vsock-accept-XXXXXX";
static char cfgpath[256];
static struct vmproxy *p;
static pthread_t tid;

static void *run(void *arg)
{
	vmproxy_run(arg);
	return NULL;
}

static int start(void **state)
{
	const char *node = getenv("VMPROXY_TEST_NODE_XML");
	struct proxy_config *cfg;
	char err[600];
	FILE *fp;
	int s;

	(void)state;
	/* No vsock transport in this kernel: nothing to test here. */
	s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0)
		return -1;
	close(s);
	assert_non_null(node);
	assert_non_null(mkdtemp(dir));
	snprintf(cfgpath, sizeof(cfgpath), "%s/vmproxyd.json", dir);
	fp = fopen(cfgpath, "w");
	assert_non_null(fp);
	fprintf(fp,
		"{\"listeners\": [{\"type\": \"vsock\", \"port\": %u}],"
		" \"identity\": {\"libvirt_uri\": \"test://%s\", \"libvirt_read_write\": true},"
		" \"threads\": {\"count\": 1},"
		" \"upstream\": {\"host\": \"127.0.0.1\", \"port\": 9,"
		" \"exchange\": \"vm.metrics\","
		" \"auth\": {\"mechanism\": \"PLAIN\", \"user\": \"u\", \"password\": \"p\"}},"
		" \"guest\": {\"allowed_exchanges\": [\"metrics\"],"
		" \"max_connections_per_vm\": 1000}}",
		40000u + (unsigned)getpid() % 20000u, node);
	fclose(fp);
	assert_int_equal(proxy_config_load(cfgpath, &cfg, err, sizeof(err)), 0);
	assert_int_equal(vmproxy_new(cfg, &p), 0);
	if (vmproxy_start(p, err, sizeof(err)) < 0)
		fail_msg("start: %s", err);
	assert_int_equal(pthread_create(&tid, NULL, run, p), 0);
	return 0;
}

static int stop(void **state)
{
	(void)state;
	vmproxy_stop(p);
	pthread_join(tid, NULL);
	vmproxy_free(p);
	unlink(cfgpath);
	rmdir(dir);
	return 0;
}

/* Hand the acceptor a connection from CID; returns vmproxy_admit's result
 * and closes the test's end. */
static int connect_from(uint32_t cid, struct vm_info *vm)
{
	struct sockaddr_storage ss;
	struct sockaddr_vm *svm = (struct sockaddr_vm *)&ss;
	int sv[2], r;

	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	memset(&ss, 0, sizeof(ss));
	svm->svm_family = AF_VSOCK;
	svm->svm_cid = cid;
	svm->svm_port = 1025;
	r = vmproxy_admit(p, 0, sv[0], &ss, sizeof(*svm), vm);
	close(sv[1]);
	return r;
}

static struct vm_identity_stats stats(void)
{
	struct vm_identity_stats st;

	vm_identity_stats(vmproxy_identity(p), &st);
	return st;
}

static uint64_t refused_unknown_peer(void)
{
	struct vmproxy_counters c;
	uint64_t v;

	vmproxy_counters(p, &c);
	v = c.refused_unknown_peer;
	vmproxy_counters_release(&c);
	return v;
}

static void test_reserved_cids(void **state)
{
	static const uint32_t reserved[] = { 0, 1, 2, VMADDR_CID_ANY };
	struct vm_identity_stats before = stats();
	uint64_t refused = refused_unknown_peer();
	struct vm_info vm;

	(void)state;
	for (size_t i = 0; i < 4; i++)
		assert_int_equal(connect_from(reserved[i], &vm), -EPERM);
	assert_int_equal(stats().libvirt_calls, before.libvirt_calls);
	assert_int_equal(refused_unknown_peer(), refused + 4);
	assert_int_equal(connect_from(21, &vm), 0);
	assert_string_equal(vm.name, "guest-a");
}

static uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void test_unknown_cid_loop(void **state)
{
	struct vm_identity_stats before;
	struct vm_info vm;
	uint64_t worst_us = 0;

	(void)state;
	assert_int_equal(connect_from(22, &vm), 0); /* the cache is built */
	before = stats();
	for (int i = 0; i < 1000; i++) {
		assert_int_equal(connect_from(99, &vm), -ENOENT);
		if (i % 100 == 50) {
			struct vm_identity_stats b = stats();
			uint64_t t0 = now_us();

			assert_int_equal(connect_from(22, &vm), 0);
			if (now_us() - t0 > worst_us)
				worst_us = now_us() - t0;
			assert_string_equal(vm.name, "guest-b");
			assert_int_equal(stats().cid_rescans, b.cid_rescans);
			assert_true(stats().libvirt_calls - b.libvirt_calls <= 2);
		}
	}
	assert_true(stats().cid_rescans - before.cid_rescans <= 1);
	print_message("1000 connects from an unknown CID: %llu rescans, %llu libvirt calls; "
		      "a known VM was admitted in at most %llu us meanwhile\n",
		      (unsigned long long)(stats().cid_rescans - before.cid_rescans),
		      (unsigned long long)(stats().libvirt_calls - before.libvirt_calls),
		      (unsigned long long)worst_us);
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

/* guest-a (CID 21) stops, guest-c starts and takes 21, guest-a restarts
 * with 23: a connection from 21 is guest-c's, from 23 guest-a's. */
static void test_cid_reuse(void **state)
{
	virConnectPtr conn = vm_identity_libvirt_conn(vmproxy_identity(p));
	struct vm_info vm;
	virDomainPtr a, c;
	char xml[600];

	(void)state;
	assert_int_equal(connect_from(21, &vm), 0);
	assert_string_equal(vm.name, "guest-a");
	a = virDomainLookupByName(conn, "guest-a");
	assert_non_null(a);
	assert_int_equal(virDomainDestroy(a), 0);
	virDomainFree(a);
	c = virDomainDefineXML(conn, domain_xml("guest-c", "11111111-2222-4333-8444-555555555503",
						21, xml, sizeof(xml)));
	assert_non_null(c);
	assert_int_equal(virDomainCreate(c), 0);
	a = virDomainDefineXML(conn, domain_xml("guest-a", "11111111-2222-4333-8444-555555555501",
						23, xml, sizeof(xml)));
	assert_non_null(a);
	assert_int_equal(virDomainCreate(a), 0);

	assert_int_equal(connect_from(21, &vm), 0);
	assert_string_equal(vm.name, "guest-c");
	assert_string_equal(vm.uuid, "11111111-2222-4333-8444-555555555503");
	assert_int_equal(vm.cid, 21);
	assert_int_equal(connect_from(23, &vm), 0);
	assert_string_equal(vm.name, "guest-a");
	virDomainFree(a);
	virDomainFree(c);
}

/* A CID refused as unknown is remembered for 10 s, but a domain that
 * starts with it is admitted as soon as its lifecycle event is in: the
 * event clears what was remembered. */
static void test_event_clears_unknown_cid(void **state)
{
	virConnectPtr conn = vm_identity_libvirt_conn(vmproxy_identity(p));
	struct vm_info vm;
	virDomainPtr d;
	char xml[600];
	int r = -1;

	(void)state;
	assert_int_equal(connect_from(24, &vm), -ENOENT);
	assert_int_equal(connect_from(24, &vm), -ENOENT);
	d = virDomainDefineXML(conn, domain_xml("guest-d", "11111111-2222-4333-8444-555555555504",
						24, xml, sizeof(xml)));
	assert_non_null(d);
	assert_int_equal(virDomainCreate(d), 0);
	/* The event thread delivers the event; without it the CID would stay
	 * refused for 10 s. Bounded at 5 s. */
	for (uint64_t t0 = now_us(); now_us() - t0 < 5000000u;) {
		struct timespec ts = { 0, 10 * 1000000L };

		r = connect_from(24, &vm);
		if (r == 0)
			break;
		nanosleep(&ts, NULL);
	}
	assert_int_equal(r, 0);
	assert_string_equal(vm.name, "guest-d");
	virDomainFree(d);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_reserved_cids),
		cmocka_unit_test(test_unknown_cid_loop),
		cmocka_unit_test(test_cid_reuse),
		cmocka_unit_test(test_event_clears_unknown_cid),
	};

	log_init("test-daemon-vsock_accept", LOG_LEVEL_ERROR);
	return cmocka_run_group_tests(tests, start, stop);
}
