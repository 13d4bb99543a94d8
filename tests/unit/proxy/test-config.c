/* test-config.c -- vmproxyd's configuration: the shipped example loads with
 * the values it shows, defaults apply, and every bad file is refused with
 * the file, the key path and what was expected. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"

static char dir[] = "/tmp/vmproxy-config-XXXXXX";
static char path[300], ca[300];

static int setup(void **state)
{
	FILE *f;

	if (!mkdtemp(dir))
		return -1;
	snprintf(path, sizeof(path), "%s/vmproxyd.json", dir);
	snprintf(ca, sizeof(ca), "%s/ca.pem", dir);
	f = fopen(ca, "w");
	fputs("not checked here\n", f);
	fclose(f);
	return 0;
}

static int teardown(void **state)
{
	unlink(path);
	unlink(ca);
	rmdir(dir);
	return 0;
}

static void write_cfg(const char *text)
{
	FILE *f = fopen(path, "w");

	assert_non_null(f);
	fputs(text, f);
	fclose(f);
}

/* Load TEXT where "@CA@" stands for a readable file; expect ERR_SUBSTR in
 * the error (NULL: expect success, returned in *OUT). */
static void load(const char *text, const char *err_substr, struct proxy_config **out)
{
	char buf[8192], err[600];
	const char *p;
	size_t n = 0;
	struct proxy_config *c = NULL;
	int r;

	for (p = text; *p && n < sizeof(buf) - 300;) {
		if (strncmp(p, "@CA@", 4) == 0) {
			n += (size_t)snprintf(buf + n, sizeof(buf) - n, "%s", ca);
			p += 4;
		} else {
			buf[n++] = *p++;
		}
	}
	buf[n] = '\0';
	write_cfg(buf);
	r = proxy_config_load(path, &c, err, sizeof(err));
	if (!err_substr) {
		if (r < 0)
			fail_msg("unexpected error: %s", err);
		*out = c;
		return;
	}
	assert_true(r < 0);
	assert_null(c);
	if (!strstr(err, path) || !strstr(err, err_substr))
		fail_msg("error \"%s\" lacks the file or \"%s\"", err, err_substr);
}

#define MINIMAL_UP                                                                                 \
	"\"upstream\": {\"host\": \"b\", \"exchange\": \"x\", \"auth\": {\"mechanism\": \"PLAIN\","  \
	"\"user\": \"u\", \"password\": \"p\"}}"
#define LISTEN "\"listeners\": [{\"type\": \"tcp\", \"port\": 5672}]"

static void test_example_loads(void **state)
{
	char *text = NULL, *src = getenv("VMPROXY_EXAMPLE_CONFIG");
	struct proxy_config *c;
	FILE *f = src ? fopen(src, "r") : NULL;
	size_t len = 0;
	char *pos;

	assert_non_null(f);
	assert_int_equal(getdelim(&text, &len, '\0', f) > 0, 1);
	fclose(f);
	/* The example's certificate paths exist on a deployed host, not here. */
	while ((pos = strstr(text, "/etc/vmproxy/tls/"))) {
		const char *end = strchr(pos, '"');
		memmove(pos + 4, end, strlen(end) + 1);
		memcpy(pos, "@CA@", 4);
	}
	load(text, NULL, &c);
	free(text);
	assert_int_equal(c->n_listeners, 3);
	assert_int_equal(c->listeners[0].type, LISTENER_VSOCK);
	assert_int_equal(c->listeners[2].type, LISTENER_UNIX);
	assert_string_equal(c->listeners[2].vm, "fc-guest-7");
	assert_string_equal(c->identity.libvirt_uri, "qemu:///system");
	assert_int_equal(c->identity.n_statics, 1);
	assert_int_equal(c->upstream.n_hosts, 3);
	assert_string_equal(c->upstream.hosts[1].host, "mgmt-rabbit-2.example.net");
	assert_string_equal(c->upstream.host, "mgmt-rabbit-1.example.net");
	assert_int_equal(c->upstream.port, 5671);
	assert_int_equal(c->upstream.mechanism, BROKER_AUTH_EXTERNAL);
	assert_true(c->upstream.tls);
	assert_string_equal(c->guest.allowed_exchanges[1], "events");
	assert_null(c->guest.allowed_exchanges[2]);
	assert_int_equal(c->limits.unconfirmed_bytes_per_vm, 8388608);
	assert_non_null(c->balancer_raw);
	assert_non_null(c->metrics_raw);
	proxy_config_free(c);
}

static void test_defaults(void **state)
{
	struct proxy_config *c;

	load("{" LISTEN ", " MINIMAL_UP "}", NULL, &c);
	assert_int_equal(c->upstream.port, 5672);
	assert_string_equal(c->upstream.vhost, "/");
	assert_int_equal(c->upstream.heartbeat, 30);
	assert_string_equal(c->guest.allowed_exchanges[0], "metrics");
	assert_int_equal(c->guest.max_message_bytes, 1048576);
	assert_int_equal(c->guest.channel_max, 64);
	assert_int_equal(c->guest.max_connections_per_vm, 16);
	assert_int_equal(c->limits.unconfirmed_bytes_per_thread, 64u << 20);
	assert_int_equal(c->identity.unknown_peers, UNKNOWN_PEERS_REJECT);
	assert_string_equal(c->listeners[0].address, "0.0.0.0");
	assert_int_equal(c->upstream.n_hosts, 1);
	assert_null(c->admin.socket);
	/* docs/configuration.md's other defaults */
	assert_int_equal(c->threads.count, 0);
	assert_int_equal(c->drain_timeout_ms, 10000);
	assert_int_equal(c->limits.max_connections, 65536);
	assert_int_equal(c->limits.max_pending_lookups, 256);
	assert_int_equal(c->limits.unconfirmed_bytes_per_vm, 8u << 20);
	assert_int_equal(c->guest.heartbeat, 60);
	assert_int_equal(c->guest.handshake_timeout_ms, 10000);
	assert_false(c->upstream.tls);
	/* the inbox section's */
	assert_true(c->inbox.enabled);
	assert_string_equal(c->inbox.name, "inbox");
	assert_string_equal(c->inbox.exchange, "vm.control");
	assert_false(c->inbox.quorum);
	assert_int_equal(c->inbox.max_length, 1000);
	assert_int_equal(c->inbox.message_ttl_ms, 86400000);
	assert_int_equal(c->inbox.max_prefetch, 100);
	assert_int_equal(c->inbox.max_consumers, 4);
	assert_int_equal(c->inbox.max_message_bytes, 65536);
	proxy_config_free(c);
}

/* The Firecracker form listens where Firecracker hands a guest's
 * connection to host port P: "<uds_path>_P"; its uuid is taken as is. */
static void test_firecracker_form(void **state)
{
	struct proxy_config *c;

	load("{\"listeners\": [{\"type\": \"firecracker\", \"uds_path\": \"/srv/fc/a/v.sock\", "
	     "\"vm\": \"fc-a\", \"uuid\": \"6F1C7D2E-8A51-4E0B-9C3F-2B7A1D9E4C60\"}, "
	     "{\"type\": \"firecracker\", \"uds_path\": \"/srv/fc/b/v.sock\", \"port\": 1025, "
	     "\"vm\": \"fc-b\", \"mode\": \"0600\"}, {\"type\": \"vsock\"}], "
	     "\"identity\": {\"libvirt_uri\": \"test:///x\"}, " MINIMAL_UP "}",
	     NULL, &c);
	assert_int_equal(c->listeners[0].type, LISTENER_FIRECRACKER);
	assert_string_equal(c->listeners[0].path, "/srv/fc/a/v.sock_5672");
	assert_string_equal(c->listeners[0].uds_path, "/srv/fc/a/v.sock");
	assert_string_equal(c->listeners[0].uuid, "6f1c7d2e-8a51-4e0b-9c3f-2b7a1d9e4c60");
	assert_int_equal(c->listeners[0].mode, 0660);
	assert_string_equal(c->listeners[1].path, "/srv/fc/b/v.sock_1025");
	assert_null(c->listeners[1].uuid); /* fc-b is looked up in libvirt */
	assert_int_equal(c->listeners[1].mode, 0600);
	assert_int_equal(c->listeners[2].type, LISTENER_VSOCK);
	proxy_config_free(c);
}

/* upstream.port: 5671 with "tls", 5672 without (test_defaults). */
static void test_default_port_with_tls(void **state)
{
	struct proxy_config *c;

	load("{" LISTEN ", \"upstream\": {\"host\": \"b\", \"exchange\": \"x\", \"tls\": "
	     "{\"ca\": \"@CA@\"}, \"auth\": {\"mechanism\": \"PLAIN\", \"user\": \"u\", "
	     "\"password\": \"p\"}}}",
	     NULL, &c);
	assert_true(c->upstream.tls);
	assert_int_equal(c->upstream.port, 5671);
	proxy_config_free(c);
}

/* A Unix listener's path: 107 bytes load, 108 are refused naming the key
 * (a sockaddr_un holds 107 and the terminating zero). */
static void test_unix_path_bound(void **state)
{
	char text[1024], p107[108], p108[109];
	struct proxy_config *c;

	memset(p107, 'p', sizeof(p107) - 1);
	p107[0] = '/';
	p107[107] = '\0';
	memset(p108, 'p', sizeof(p108) - 1);
	p108[0] = '/';
	p108[108] = '\0';
	snprintf(text, sizeof(text),
		 "{\"listeners\": [{\"type\": \"unix\", \"path\": \"%s\", \"vm\": \"a\", "
		 "\"uuid\": \"6f1c7d2e-8a51-4e0b-9c3f-2b7a1d9e4c60\"}], "
		 MINIMAL_UP "}", p107);
	load(text, NULL, &c);
	assert_int_equal(strlen(c->listeners[0].path), 107);
	proxy_config_free(c);
	snprintf(text, sizeof(text),
		 "{\"listeners\": [{\"type\": \"unix\", \"path\": \"%s\", \"vm\": \"a\", "
		 "\"uuid\": \"6f1c7d2e-8a51-4e0b-9c3f-2b7a1d9e4c60\"}], "
		 MINIMAL_UP "}", p108);
	load(text, "listeners[0].path: expected a path of at most 107 bytes", NULL);
}

static void test_errors(void **state)
{
	static const struct {
		const char *text, *err;
	} cases[] = {
		{ "{", "line 1 column 1: string or '}' expected" },
		{ "[]", "expected an object" },
		{ "{" MINIMAL_UP "}", "listeners: missing required key" },
		{ "{\"listeners\": [], " MINIMAL_UP "}", "listeners: expected at least one" },
		{ "{\"listeners\": [{\"type\": \"tcp\", \"port\": 70000}], " MINIMAL_UP "}",
		  "listeners[0].port: expected an integer in [1, 65535], got 70000" },
		{ "{" LISTEN ", \"limits\": {\"max_pending_lookups\": 0}, " MINIMAL_UP "}",
		  "limits.max_pending_lookups: expected an integer in [1, 65536], got 0" },
		{ "{\"listeners\": [{\"type\": \"udp\"}], " MINIMAL_UP "}",
		  "listeners[0].type: expected one of \"tcp\", \"vsock\", \"unix\", "
		  "\"firecracker\"" },
		{ "{\"listeners\": [{\"type\": \"vsock\"}], " MINIMAL_UP "}",
		  "listeners[0]: a vsock listener identifies guests by CID through libvirt: "
		  "identity.libvirt_uri is required" },
		{ "{\"listeners\": [{\"type\": \"unix\", \"path\": \"/x\", \"vm\": \"a\"}], "
		  MINIMAL_UP "}",
		  "listeners[0].uuid: required when identity.libvirt_uri is not set" },
		{ "{\"listeners\": [{\"type\": \"firecracker\", \"uds_path\": \"/x/v.sock\", "
		  "\"vm\": \"a\"}], " MINIMAL_UP "}",
		  "listeners[0].uuid: required when identity.libvirt_uri is not set" },
		{ "{\"listeners\": [{\"type\": \"firecracker\", \"uds_path\": \"/x/v.sock\", "
		  "\"vm\": \"a\", \"uuid\": \"a-b\"}], " MINIMAL_UP "}",
		  "listeners[0].uuid: expected a UUID" },
		{ "{\"listeners\": [{\"type\": \"firecracker\", \"vm\": \"a\", "
		  "\"uuid\": \"6f1c7d2e-8a51-4e0b-9c3f-2b7a1d9e4c60\"}], " MINIMAL_UP "}",
		  "listeners[0].uds_path: missing required key" },
		{ "{\"listeners\": [{\"type\": \"firecracker\", \"uds_path\": \"/srv/jailer/"
		  "firecracker/0123456789012345678901234567890123456789/root/run/firecracker/"
		  "vsock-directory/v.sock\","
		  " \"vm\": \"a\", \"uuid\": \"6f1c7d2e-8a51-4e0b-9c3f-2b7a1d9e4c60\"}], "
		  MINIMAL_UP "}",
		  "listeners[0].uds_path: expected a path of at most 107 bytes with \"_<port>\"" },
		{ "{\"listeners\": [{\"type\": \"firecracker\", \"uds_path\": \"/x/v.sock\", "
		  "\"path\": \"/y\", \"vm\": \"a\", "
		  "\"uuid\": \"6f1c7d2e-8a51-4e0b-9c3f-2b7a1d9e4c60\"}], " MINIMAL_UP "}",
		  "listeners[0].path: unknown key" },
		{ "{\"listeners\": [{\"type\": \"unix\", \"path\": \"/x\"}], " MINIMAL_UP "}",
		  "listeners[0].vm: missing required key" },
		{ "{\"listeners\": [{\"type\": \"unix\", \"path\": \"/x\", \"vm\": \"a\", "
		  "\"mode\": \"0999\"}], " MINIMAL_UP "}",
		  "listeners[0].mode: expected an octal mode such as \"0660\"" },
		{ "{\"listeners\": [{\"type\": \"unix\", \"path\": \"/x\", \"vm\": \"a\", "
		  "\"group\": \"no-such-group-here\"}], " MINIMAL_UP "}",
		  "listeners[0].group: no group \"no-such-group-here\"" },
		{ "{\"listeners\": [{\"type\": \"tcp\", \"address\": \"eth0\"}], " MINIMAL_UP "}",
		  "listeners[0].address: expected a numeric IPv4 or IPv6 address" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"gest\": {}}", "gest: unknown key" },
		{ "{" LISTEN ", \"upstream\": {\"host\": \"b\"}}", "upstream.exchange: missing" },
		{ "{" LISTEN ", \"upstream\": {\"host\": \"b\", \"exchange\": \"x\", \"tls\": "
		  "{\"ca\": \"/nonexistent/ca.pem\"}, \"auth\": {\"mechanism\": \"EXTERNAL\"}}}",
		  "upstream.tls.ca: cannot read \"/nonexistent/ca.pem\"" },
		{ "{" LISTEN ", \"upstream\": {\"host\": \"b\", \"exchange\": \"x\", \"tls\": "
		  "{\"ca\": \"@CA@\"}, \"auth\": {\"mechanism\": \"EXTERNAL\"}}}",
		  "upstream.auth.mechanism: EXTERNAL needs upstream.tls with a client" },
		{ "{" LISTEN ", \"upstream\": {\"host\": \"b\", \"exchange\": \"x\", \"tls\": "
		  "{\"ca\": \"@CA@\", \"cert\": \"@CA@\"}}}",
		  "upstream.tls.key: missing required key" },
		{ "{" LISTEN ", \"upstream\": {\"host\": \"b\", \"exchange\": \"x\", \"auth\": "
		  "{\"mechanism\": \"CRAM\"}}}",
		  "upstream.auth.mechanism: expected one of \"PLAIN\", \"EXTERNAL\"" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"identity\": {\"static\": [{\"address\": "
		  "\"10.0.0.1\", \"vm\": \"a\"}]}}",
		  "identity.static[0].uuid: required when identity.libvirt_uri is not set" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"identity\": {\"static\": [{\"address\": "
		  "\"10.0.0.1\", \"vm\": \"a\", \"uuid\": \"not-a-uuid\"}]}}",
		  "identity.static[0].uuid: expected a UUID" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"identity\": {\"libvirt_uri\": \"test:///x\", "
		  "\"static\": [{\"address\": \"10.0.0.1\", \"vm\": \"a\"}, {\"address\": "
		  "\"10.0.0.1\", \"vm\": \"b\"}]}}",
		  "identity.static[1].address: \"10.0.0.1\" is already mapped" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"identity\": {\"unknown_peers\": \"allow\"}}",
		  "identity.unknown_peers: expected one of \"reject\", \"by_address\"" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"guest\": {\"channel_max\": 0}}",
		  "guest.channel_max: expected an integer in [1, 2047], got 0" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"guest\": {\"allowed_exchanges\": [\"\"]}}",
		  "guest.allowed_exchanges[0]: expected an exchange name of 1 to 255 bytes" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"limits\": {\"unconfirmed_bytes_per_vm\": 1048576, "
		  "\"unconfirmed_bytes_per_thread\": 65536}}",
		  "limits.unconfirmed_bytes_per_vm: expected at most" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"threads\": {\"cpus\": [0, 0]}}",
		  "threads.cpus[1]: CPU 0 is listed twice" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"log_level\": \"loud\"}",
		  "log_level: expected one of \"error\"" },
		{ "{" LISTEN ", \"upstream\": {\"hosts\": [], \"exchange\": \"x\"}}",
		  "upstream.hosts: expected 1 to 64 broker nodes" },
		/* Sections parsed by their own modules are validated at load too. */
		{ "{" LISTEN ", " MINIMAL_UP ", \"balancer\": {\"intervall_ms\": 1000}}",
		  "balancer.intervall_ms: unknown key" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"balancer\": {\"ratio\": 0.5}}",
		  "balancer.ratio: expected a number in [1.05, 100]" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"metrics\": {\"listen\": \"127.0.0.1:9464\", "
		  "\"per_vms\": true}}",
		  "metrics.per_vms: unknown key" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"metrics\": {\"listen\": \"localhost:http\"}}",
		  "metrics.listen: expected a numeric IPv4 \"ADDRESS:PORT\"" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"inbox\": {\"prefetch\": 10}}",
		  "inbox.prefetch: unknown key" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"inbox\": {\"queue_type\": \"stream\"}}",
		  "inbox.queue_type: expected one of \"classic\", \"quorum\"" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"inbox\": {\"max_prefetch\": 0}}",
		  "inbox.max_prefetch: expected an integer in [1, 65535], got 0" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"inbox\": {\"max_consumers\": 65}}",
		  "inbox.max_consumers: expected an integer in [1, 64], got 65" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"inbox\": {\"max_length\": 0}}",
		  "inbox.max_length: expected an integer in [1, 1000000], got 0" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"inbox\": {\"message_ttl_ms\": 10}}",
		  "inbox.message_ttl_ms: expected an integer in [1000, 2147483647], got 10" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"inbox\": {\"max_message_bytes\": 0}}",
		  "inbox.max_message_bytes: expected an integer in [1, 16777216], got 0" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"inbox\": {\"name\": \"amq.x\"}}",
		  "inbox.name: expected a queue name of 1 to 200 bytes" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"inbox\": {\"exchange\": \"\"}}",
		  "inbox.exchange: expected an exchange name of 1 to 255 bytes" },
		{ "{" LISTEN ", " MINIMAL_UP ", \"inbox\": {\"enabled\": 1}}",
		  "inbox.enabled: expected" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		load(cases[i].text, cases[i].err, NULL);
}

/* What a reload may apply: OLD_TEXT running, NEW_TEXT read at SIGHUP;
 * WANT_KEY the key that needs a restart, or NULL. */
static void restart_case(const char *old_text, const char *new_text, const char *want_key)
{
	struct proxy_config *a, *b;
	char key[64] = "";
	bool r;

	load(old_text, NULL, &a);
	load(new_text, NULL, &b);
	r = proxy_config_restart_key(a, b, key, sizeof(key));
	if (want_key && (!r || strcmp(key, want_key) != 0))
		fail_msg("expected %s to need a restart, got %s", want_key, r ? key : "none");
	if (!want_key && r)
		fail_msg("expected a reloadable change, got %s", key);
	proxy_config_free(a);
	proxy_config_free(b);
}

#define ID(x) "{" LISTEN ", " MINIMAL_UP ", \"identity\": {" x "}}"
#define ST(a, n) "{\"address\": \"" a "\", \"vm\": \"" n "\", " \
	"\"uuid\": \"6f1c7d2e-8a51-4e0b-9c3f-2b7a1d9e4c6" n "\"}"

static void test_restart_keys(void **state)
{
	const char *base = "{" LISTEN ", " MINIMAL_UP "}";

	restart_case(base, base, NULL);
	restart_case(base, "{" LISTEN ", " MINIMAL_UP ", \"log_level\": \"debug\", "
			   "\"guest\": {\"allowed_exchanges\": [\"a\", \"b\"], "
			   "\"channel_max\": 8}, \"balancer\": {\"enabled\": false}, "
			   "\"drain_timeout_ms\": 1, \"metrics\": {\"listen\": "
			   "\"127.0.0.1:1\", \"per_vm\": true}}", "metrics.listen");
	restart_case("{" LISTEN ", " MINIMAL_UP "}",
		     "{" LISTEN ", " MINIMAL_UP ", \"inbox\": {\"max_prefetch\": 5}}", "inbox");
	restart_case("{" LISTEN ", " MINIMAL_UP ", \"metrics\": {\"listen\": \"127.0.0.1:1\"}}",
		     "{" LISTEN ", " MINIMAL_UP ", \"log_level\": \"debug\", "
		     "\"guest\": {\"allowed_exchanges\": [\"a\"], \"channel_max\": 8}, "
		     "\"balancer\": {\"enabled\": false}, \"drain_timeout_ms\": 1, "
		     "\"metrics\": {\"listen\": \"127.0.0.1:1\", \"per_vm\": true}}",
		     NULL);
	restart_case(base, "{\"listeners\": [{\"type\": \"tcp\", \"port\": 5673}], "
			   MINIMAL_UP "}", "listeners");
	restart_case(base, "{" LISTEN ", " MINIMAL_UP ", \"threads\": {\"count\": 2}}",
		     "threads");
	restart_case(base, "{" LISTEN ", " MINIMAL_UP ", \"guest\": {\"max_message_bytes\": "
			   "4096}}", "guest.max_message_bytes");
	/* identity: appending static entries is the one reloadable change. */
	restart_case(base, ID("\"static\": [" ST("10.0.0.1", "1") "]"), NULL);
	restart_case(ID("\"static\": [" ST("10.0.0.1", "1") "]"),
		     ID("\"static\": [" ST("10.0.0.1", "1") ", " ST("10.0.0.2", "2") "]"), NULL);
	restart_case(ID("\"static\": [" ST("10.0.0.1", "1") ", " ST("10.0.0.2", "2") "]"),
		     ID("\"static\": [" ST("10.0.0.1", "1") "]"), "identity.static");
	restart_case(ID("\"static\": [" ST("10.0.0.1", "1") "]"),
		     ID("\"static\": [" ST("10.0.0.9", "1") "]"), "identity.static[0]");
	restart_case(ID("\"static\": [" ST("10.0.0.1", "1") "]"),
		     ID("\"unknown_peers\": \"by_address\", \"static\": [" ST("10.0.0.1", "1") "]"),
		     "identity.unknown_peers");
	restart_case(ID("\"unknown_peers\": \"by_address\""), base, "identity.unknown_peers");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_example_loads),
		cmocka_unit_test(test_defaults),
		cmocka_unit_test(test_firecracker_form),
		cmocka_unit_test(test_default_port_with_tls),
		cmocka_unit_test(test_unix_path_bound),
		cmocka_unit_test(test_errors),
		cmocka_unit_test(test_restart_keys),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
