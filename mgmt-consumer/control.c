/* control.c -- see control.h */
#include "control.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <amqp.h>
#include <jansson.h>

#include "clock.h"
#include "consumer.h"
#include "query.h"
#include "store.h"

static void control_usage(FILE *f)
{
	fprintf(f, "Usage: vmproxy-consumer control --config FILE [--exchange E] [--timeout S] "
	           "VM JSON\n"
	           "VM: a uuid, or a name the store knows. JSON: an object, e.g. "
	           "'{\"interval_s\": 5}'.\n"
	           "Exit: 0 confirmed and routed, 1 error, 2 usage, 3 the VM has no inbox,\n"
	           "4 refused by the broker (inbox full), 5 no such VM (or the name is not\n"
	           "unique), 6 no confirm within the timeout.\n");
}

static bool is_uuid(const char *s)
{
	if (strlen(s) != 36)
		return false;
	for (int i = 0; i < 36; i++) {
		if (i == 8 || i == 13 || i == 18 || i == 23) {
			if (s[i] != '-')
				return false;
		} else if (!isxdigit((unsigned char)s[i])) {
			return false;
		}
	}
	return true;
}

/* VM as a uuid: as given (lower case), else looked up in the store. */
static int resolve(struct ccfg *c, const char *vm, char *uuid, size_t len)
{
	struct store *st = NULL;
	char dbpath[600], err[600];
	int e;

	if (is_uuid(vm)) {
		for (int i = 0; i < 36; i++)
			uuid[i] = (char)tolower((unsigned char)vm[i]);
		uuid[36] = '\0';
		return CONTROL_OK;
	}
	consumer_store_options(c, dbpath, sizeof(dbpath));
	c->store.existing = true;
	if (c->store.kind == STORE_JSONL) {
		fprintf(stderr,
		        "vmproxy-consumer control: sink.type is jsonl, which cannot look up "
		        "VM names: give the VM's uuid\n");
		return CONTROL_NO_VM;
	}
	if (store_open(&c->store, &st, err, sizeof(err)) < 0) {
		fprintf(stderr, "vmproxy-consumer control: %s\n", err);
		return CONTROL_FAILED;
	}
	e = query_vm_uuid(st, vm, uuid, len);
	if (e == -EIO)
		fprintf(stderr, "vmproxy-consumer control: %s\n", store_error(st));
	else if (e < 0)
		fprintf(stderr, "vmproxy-consumer control: VM \"%s\": %s\n", vm,
		        e == -EEXIST ? "more than one VM has that name: give its uuid"
		                     : "no such VM in the store");
	store_close(st);
	return e == 0 ? CONTROL_OK : e == -EIO ? CONTROL_FAILED : CONTROL_NO_VM;
}

/* Publish and wait for the outcome: a basic.return (no queue took it)
 * comes before the confirm. */
static int publish(amqp_connection_state_t conn, const char *exchange, const char *rk,
                   const char *body, int timeout_ms)
{
	amqp_basic_properties_t p;
	uint64_t deadline = clock_mono_ms() + (uint64_t)timeout_ms;
	bool returned = false;

	memset(&p, 0, sizeof(p));
	p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
	p.content_type = amqp_cstring_bytes("application/json");
	p.delivery_mode = 2;
	if (amqp_basic_publish(conn, 1, amqp_cstring_bytes(exchange), amqp_cstring_bytes(rk), 1, 0,
	                       &p, amqp_cstring_bytes(body)) != AMQP_STATUS_OK) {
		fprintf(stderr, "vmproxy-consumer control: publish failed\n");
		return CONTROL_FAILED;
	}
	for (;;) {
		uint64_t now = clock_mono_ms();
		struct timeval tv;
		amqp_frame_t f;
		int r;

		if (now >= deadline) {
			fprintf(stderr, "vmproxy-consumer control: no confirm within %d ms\n",
			        timeout_ms);
			return CONTROL_TIMEOUT;
		}
		tv.tv_sec = (long)((deadline - now) / 1000);
		tv.tv_usec = (long)((deadline - now) % 1000) * 1000;
		r = amqp_simple_wait_frame_noblock(conn, &f, &tv);
		if (r == AMQP_STATUS_TIMEOUT)
			continue;
		if (r != AMQP_STATUS_OK) {
			fprintf(stderr, "vmproxy-consumer control: connection lost: %s\n",
			        amqp_error_string2(r));
			return CONTROL_FAILED;
		}
		if (f.frame_type != AMQP_FRAME_METHOD)
			continue; /* the returned message's content */
		switch (f.payload.method.id) {
		case AMQP_BASIC_RETURN_METHOD:
			returned = true;
			break;
		case AMQP_BASIC_ACK_METHOD:
			if (returned) {
				fprintf(stderr,
				        "vmproxy-consumer control: no inbox is bound for routing "
				        "key \"%s\" on \"%s\": the VM has not consumed its inbox "
				        "yet, or does not exist\n",
				        rk, exchange);
				return CONTROL_NO_INBOX;
			}
			return CONTROL_OK;
		case AMQP_BASIC_NACK_METHOD:
			fprintf(stderr, "vmproxy-consumer control: the broker refused the message "
			                "(the inbox is full)\n");
			return CONTROL_NACKED;
		case AMQP_CHANNEL_CLOSE_METHOD:
		case AMQP_CONNECTION_CLOSE_METHOD: {
			amqp_channel_close_t *c = f.payload.method.decoded;
			fprintf(stderr,
			        "vmproxy-consumer control: refused by the broker: %u %.*s\n",
			        c->reply_code, (int)c->reply_text.len,
			        (const char *)c->reply_text.bytes);
			return CONTROL_FAILED;
		}
		default:
			break;
		}
	}
}

int control_main(int argc, char **argv)
{
	static const struct option opts[] = {
	        {"config", 1, NULL, 'c'}, {"exchange", 1, NULL, 'x'}, {"timeout", 1, NULL, 't'},
	        {"help", 0, NULL, 'h'},   {NULL, 0, NULL, 0},
	};
	const char *config = NULL, *exchange = "vm.control";
	unsigned long timeout_s = 10;
	struct ccfg c;
	json_t *root = NULL, *doc;
	json_error_t je;
	char uuid[40], rk[64], err[300];
	int ch, rc = CONTROL_FAILED;
	char *end;

	consumer_config_defaults(&c);
	optind = 1;
	while ((ch = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
		switch (ch) {
		case 'c':
			config = optarg;
			break;
		case 'x':
			exchange = optarg;
			break;
		case 't':
			timeout_s = strtoul(optarg, &end, 10);
			if (!*optarg || *end || timeout_s == 0 || timeout_s > 3600) {
				fprintf(stderr,
				        "vmproxy-consumer control: --timeout: expected 1 to "
				        "3600 seconds\n");
				return CONTROL_USAGE;
			}
			break;
		case 'h':
			control_usage(stdout);
			return CONTROL_OK;
		default:
			control_usage(stderr);
			return CONTROL_USAGE;
		}
	}
	if (!config || argc - optind != 2) {
		control_usage(stderr);
		return CONTROL_USAGE;
	}
	doc = json_loads(argv[optind + 1], JSON_REJECT_DUPLICATES, &je);
	if (!json_is_object(doc)) {
		fprintf(stderr, "vmproxy-consumer control: JSON: expected an object%s%s\n",
		        doc ? "" : ": ", doc ? "" : je.text);
		json_decref(doc);
		return CONTROL_USAGE;
	}
	json_decref(doc);
	if (consumer_parse_config(config, &c, &root) < 0)
		return CONTROL_FAILED;
	rc = resolve(&c, argv[optind], uuid, sizeof(uuid));
	if (rc != CONTROL_OK)
		goto out;
	snprintf(rk, sizeof(rk), "%s.control", uuid);
	rc = CONTROL_FAILED;
	for (size_t i = 0; i < c.nhosts; i++) {
		struct broker_opts o = c.b;
		amqp_connection_state_t conn;

		o.host = c.hosts[i];
		o.port = (uint16_t)c.ports[i];
		o.connection_name = "vmproxy-consumer control";
		o.product = "vmproxy-consumer";
		o.timeout_ms = (int)timeout_s * 1000;
		if (broker_connect(&o, &conn, err, sizeof(err)) < 0) {
			fprintf(stderr, "vmproxy-consumer control: broker %s:%" PRIu64 ": %s\n",
			        c.hosts[i], c.ports[i], err);
			continue;
		}
		if (broker_channel_open(conn, 1, true, err, sizeof(err)) < 0) {
			fprintf(stderr, "vmproxy-consumer control: broker %s:%" PRIu64 ": %s\n",
			        c.hosts[i], c.ports[i], err);
			broker_close(conn);
			break;
		}
		rc = publish(conn, exchange, rk, argv[optind + 1], (int)timeout_s * 1000);
		broker_close(conn);
		break;
	}
	if (rc == CONTROL_OK)
		printf("%s: confirmed\n", uuid);
out:
	json_decref(root);
	return rc;
}
