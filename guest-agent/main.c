/* main.c -- vmproxy-agent: command line and configuration, then one of:
 * the sampling loop (collect, spool, publish with confirms, in order),
 * --once (one sample to stdout), or "send" (one message from stdin). */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <unistd.h>

#include "backoff.h"
#include "certfile.h"
#include "clock.h"
#include "collect.h"
#include "conf.h"
#include "log.h"
#include "spool.h"
#include "transport.h"

#define SEND_MAX_BYTES (1u << 20)

struct agent_cfg {
	const char *endpoint, *source_address, *exchange, *routing_key, *vhost, *user, *password;
	const char *ca, *cert, *key, *spool_dir, *proc_root, *log_level, *inbox;
	uint64_t interval_s, spool_max_bytes, timeout_s;
};

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
	transport_abort_from_signal(); /* a publish in progress ends now */
}

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: vmproxy-agent [options]             collect and publish metrics\n"
		"       vmproxy-agent --once [options]      print one sample and exit\n"
		"       vmproxy-agent send --routing-key K [--exchange E] [options] < payload\n"
		"\n"
		"Options (flags override the --config file's keys of the same name):\n"
		"  -c, --config FILE          JSON configuration\n"
		"  -e, --endpoint URL         vsock://CID:PORT (default vsock://2:5672) or tcp://HOST:PORT\n"
		"      --source-address ADDR  bind TCP to ADDR first (plain tcp:// only)\n"
		"  -i, --interval SECONDS     sampling interval (default 10)\n"
		"      --exchange E           default \"metrics\"\n"
		"      --routing-key K        default \"metrics.<hostname>\"\n"
		"      --vhost V --user U --password P   (default / guest guest)\n"
		"      --tls-ca F [--tls-cert F --tls-key F]   TLS for tcp:// endpoints\n"
		"      --spool-dir D          default /var/lib/vmproxy-agent/spool\n"
		"      --spool-max-bytes N    default 16777216\n"
		"      --timeout SECONDS      bound on connect, handshake, a publish (default 10)\n"
		"      --proc-root DIR        read DIR/proc and DIR/sys instead (tests)\n"
		"      --log-level L          error, warn, info (default) or debug\n"
		"      --inbox Q              consume control messages from Q (default \"inbox\";\n"
		"                             \"\" for none)\n"
		"      --check-config         check the configuration and what the start needs\n"
		"                             (endpoint, TLS files, spool directory, source\n"
		"                             address) and exit: 0 if OK, 1 otherwise\n"
		"  -h, --help    -V, --version\n"
		"\n"
		"send exits 0 once the broker confirmed the message, 1 on a usage or\n"
		"configuration error, 2 when the broker nacked it, 3 when the server refused\n"
		"it (its reply code and text are printed), 4 on a timeout (connect, send or\n"
		"confirm), 5 when it cannot connect, 6 when SIGTERM or SIGINT interrupted it.\n");
}

static int load_config(const char *file, struct agent_cfg *c, json_t **root)
{
	static const char *const keys[] = { "endpoint", "source_address", "interval_s",
					    "exchange", "routing_key",	  "vhost",
					    "user",	"password",	  "tls",
					    "spool",	"timeout_s",	  "log_level",
					    "inbox",	NULL };
	static const char *const tls_keys[] = { "ca", "cert", "key", NULL };
	static const char *const spool_keys[] = { "dir", "max_bytes", NULL };
	struct conf_ctx ctx;
	json_t *tls = NULL, *sp = NULL;
	int r = 0;

	conf_ctx_init(&ctx, file);
	if (conf_load_file(&ctx, root) < 0) {
		fprintf(stderr, "vmproxy-agent: %s\n", ctx.err);
		return -EINVAL;
	}
	r |= conf_check_keys(&ctx, *root, "", keys);
	r |= conf_get_string(&ctx, *root, "", "endpoint", false, &c->endpoint);
	r |= conf_get_string(&ctx, *root, "", "source_address", false, &c->source_address);
	r |= conf_get_uint(&ctx, *root, "", "interval_s", false, 1, 86400, &c->interval_s);
	r |= conf_get_string(&ctx, *root, "", "exchange", false, &c->exchange);
	r |= conf_get_string(&ctx, *root, "", "routing_key", false, &c->routing_key);
	r |= conf_get_string(&ctx, *root, "", "vhost", false, &c->vhost);
	r |= conf_get_string(&ctx, *root, "", "user", false, &c->user);
	r |= conf_get_string(&ctx, *root, "", "password", false, &c->password);
	r |= conf_get_uint(&ctx, *root, "", "timeout_s", false, 1, 3600, &c->timeout_s);
	r |= conf_get_string(&ctx, *root, "", "log_level", false, &c->log_level);
	r |= conf_get_string(&ctx, *root, "", "inbox", false, &c->inbox);
	r |= conf_get_object(&ctx, *root, "", "tls", false, &tls);
	if (tls) {
		r |= conf_check_keys(&ctx, tls, "tls", tls_keys);
		r |= conf_get_string(&ctx, tls, "tls", "ca", true, &c->ca);
		r |= conf_get_string(&ctx, tls, "tls", "cert", false, &c->cert);
		r |= conf_get_string(&ctx, tls, "tls", "key", c->cert != NULL, &c->key);
	}
	r |= conf_get_object(&ctx, *root, "", "spool", false, &sp);
	if (sp) {
		r |= conf_check_keys(&ctx, sp, "spool", spool_keys);
		r |= conf_get_string(&ctx, sp, "spool", "dir", false, &c->spool_dir);
		r |= conf_get_uint(&ctx, sp, "spool", "max_bytes", false, 4096, 1ull << 40,
				   &c->spool_max_bytes);
	}
	if (r) {
		fprintf(stderr, "vmproxy-agent: %s\n", ctx.err);
		return -EINVAL;
	}
	return 0;
}

static struct transport *make_transport(const struct agent_cfg *c, bool control)
{
	struct transport_opts o = {
		.endpoint = c->endpoint,
		.source_address = c->source_address,
		.vhost = c->vhost,
		.user = c->user,
		.password = c->password,
		.ca = c->ca,
		.cert = c->cert,
		.key = c->key,
		.exchange = c->exchange,
		.timeout_ms = (int)(c->timeout_s * 1000),
		.inbox = control && c->inbox && c->inbox[0] ? c->inbox : NULL,
	};
	struct transport *t;
	char err[300];

	if (transport_new(&o, &t, err, sizeof(err)) < 0) {
		fprintf(stderr, "vmproxy-agent: %s\n", err);
		return NULL;
	}
	return t;
}

/* --check-config: what the start and the first publish need, without
 * creating anything: the endpoint, the TLS files (valid, the key the
 * certificate's), the spool directory (or its parent) writable, the source
 * address present on this guest. Each problem on a line; 0 or 1. */
static int run_check(const struct agent_cfg *c, const char *config)
{
	const char *name = config ? config : "vmproxy-agent";
	struct transport *t;
	char err[600];
	int problems = 0;

	t = make_transport(c, false); /* says what is wrong itself */
	if (!t)
		problems++;
	transport_free(t);
	if (certfile_check("tls", c->ca, c->cert, c->key, err, sizeof(err)) < 0) {
		fprintf(stderr, "%s: %s\n", name, err);
		problems++;
	}
	problems += conf_check_dir(name, "spool.dir", c->spool_dir);
	if (c->source_address) {
		struct sockaddr_in sa = { .sin_family = AF_INET };
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

		if (inet_pton(AF_INET, c->source_address, &sa.sin_addr) != 1) {
			fprintf(stderr, "%s: source_address \"%s\": expected a numeric IPv4 address\n",
				name, c->source_address);
			problems++;
		} else if (fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
			fprintf(stderr, "%s: source_address \"%s\": %s\n", name, c->source_address,
				errno == EADDRNOTAVAIL ? "the address is not on this machine"
						       : strerror(errno));
			problems++;
		}
		if (fd >= 0)
			close(fd);
	}
	if (problems)
		return 1;
	printf("%s: configuration OK\n", name);
	return 0;
}

static int run_send(const struct agent_cfg *c)
{
	char *buf = malloc(SEND_MAX_BYTES + 1), err[300];
	size_t n = 0;
	struct transport *t;
	enum transport_result r;

	if (!c->routing_key) {
		fprintf(stderr, "vmproxy-agent send: --routing-key is required\n");
		free(buf);
		return 1;
	}
	while (buf && n <= SEND_MAX_BYTES) {
		size_t k = fread(buf + n, 1, SEND_MAX_BYTES + 1 - n, stdin);
		if (k == 0)
			break;
		n += k;
	}
	if (!buf || n > SEND_MAX_BYTES) {
		fprintf(stderr, "vmproxy-agent send: the payload is larger than %u bytes\n",
			SEND_MAX_BYTES);
		free(buf);
		return 1;
	}
	t = make_transport(c, false);
	if (!t) {
		free(buf);
		return 1;
	}
	r = transport_publish(t, c->routing_key, NULL, buf, n, clock_wall_ms() / 1000, err,
			      sizeof(err));
	if (r != TRANSPORT_CONFIRMED)
		fprintf(stderr, "vmproxy-agent send: %s\n", err);
	transport_free(t);
	free(buf);
	return (int)r;
}

/* A control message: {"interval_s": N} (1 to 86400) sets the sampling
 * interval now (the next sample comes N seconds from now) and is acked
 * after that; anything else is logged and rejected (not requeued). */
static void apply_control(struct transport *t, const struct transport_control *m,
			  uint64_t *interval_s, uint64_t *next_sample)
{
	json_error_t e;
	json_t *doc = json_loadb(m->body, m->len, JSON_REJECT_DUPLICATES, &e);
	json_t *v = doc ? json_object_get(doc, "interval_s") : NULL;
	char shown[120];

	if (json_is_object(doc) && json_object_size(doc) == 1 && json_is_integer(v) &&
	    json_integer_value(v) >= 1 && json_integer_value(v) <= 86400) {
		*interval_s = (uint64_t)json_integer_value(v);
		*next_sample = clock_mono_ms() + *interval_s * 1000;
		log_info("control message: sampling interval set to %" PRIu64 " s", *interval_s);
		transport_settle(t, m->tag, true);
	} else {
		log_warn("control message rejected (expected {\"interval_s\": 1..86400}): \"%s\"",
			 log_sanitize(shown, sizeof(shown), m->body, (unsigned)m->len));
		transport_settle(t, m->tag, false);
	}
	json_decref(doc);
}

static int run_loop(const struct agent_cfg *c, bool once)
{
	static struct collect_state st; /* large: not on the stack */
	struct spool *sp = NULL;
	struct transport *t = NULL;
	struct backoff bo;
	char boot[40] = "unknown", host[256] = "localhost", rk[320];
	uint64_t seq, next_sample, retry_at = 0, interval_s;
	int r;

	collect_init(&st, c->proc_root);
	collect_boot_id(&st, boot, sizeof(boot));
	gethostname(host, sizeof(host) - 1);
	snprintf(rk, sizeof(rk), "%s", c->routing_key ? c->routing_key : "");
	if (!c->routing_key)
		snprintf(rk, sizeof(rk), "metrics.%.200s", host);
	if (once) {
		json_t *doc = collect_sample(&st, clock_mono_ms(), clock_wall_ms(),
					     (unsigned)c->interval_s);
		char *text;

		json_object_set_new(doc, "seq", json_integer(1));
		text = collect_format(doc, JSON_INDENT(2) | JSON_SORT_KEYS);
		if (text)
			printf("%s\n", text);
		free(text);
		json_decref(doc);
		return 0;
	}
	r = spool_open(c->spool_dir, c->spool_max_bytes, &sp);
	if (r < 0) {
		log_error("spool directory \"%s\": %s", c->spool_dir, strerror(-r));
		return 1;
	}
	t = make_transport(c, true);
	if (!t) {
		spool_close(sp);
		return 1;
	}
	seq = spool_load_seq(sp, boot);
	log_info("boot %s: continuing after seq %" PRIu64 " with %zu spooled samples, publishing to "
		 "%s", boot, seq, spool_count(sp), c->endpoint);
	backoff_init(&bo, 500, 30000, 0);
	next_sample = clock_mono_ms();
	interval_s = c->interval_s;
	while (!stop) {
		uint64_t now = clock_mono_ms(), wake;

		if (now >= next_sample) {
			json_t *doc = collect_sample(&st, now, clock_wall_ms(), (unsigned)interval_s);
			char *text;

			seq++;
			json_object_set_new(doc, "seq", json_integer((json_int_t)seq));
			text = collect_format(doc, JSON_COMPACT);
			/* The sample first, then its seq: a crash in between is
			 * seen by spool_load_seq in the spool, so no seq is reused
			 * or skipped. */
			if (spool_put(sp, clock_wall_ms(), seq, text, strlen(text)) < 0 ||
			    spool_save_seq(sp, boot, seq) < 0)
				log_error("cannot spool sample %" PRIu64 ": %s", seq, strerror(errno));
			free(text);
			json_decref(doc);
			next_sample += interval_s * 1000;
			if (next_sample <= now)
				next_sample = now + interval_s * 1000;
		}
		while (!stop && now >= retry_at) {
			char *data, name[80], msgid[96], err[300];
			json_t *doc;
			size_t len;
			enum transport_result res;

			if (spool_peek(sp, &data, &len, name, sizeof(name)) < 0)
				break;
			doc = json_loadb(data, len, 0, NULL);
			snprintf(msgid, sizeof(msgid), "%s.%" PRId64,
				 json_string_value(json_object_get(json_object_get(doc, "host"),
								   "boot_id")) ?: boot,
				 (int64_t)json_integer_value(json_object_get(doc, "seq")));
			json_decref(doc);
			res = transport_publish(t, rk, msgid, data, len, clock_wall_ms() / 1000, err,
						sizeof(err));
			free(data);
			if (res == TRANSPORT_CONFIRMED) {
				spool_remove(sp, name);
				backoff_reset(&bo);
				continue;
			}
			{
				uint32_t delay = backoff_next(&bo);
				log_warn("sample %s not confirmed: %s; %zu samples spooled, retrying "
					 "in %u ms", msgid, err, spool_count(sp), delay);
				retry_at = clock_mono_ms() + delay;
			}
			break;
		}
		now = clock_mono_ms();
		wake = next_sample;
		if (retry_at > now && retry_at < wake && spool_count(sp))
			wake = retry_at;
		if (wake > now) {
			struct transport_control m;

			/* Sleeps, or waits for a control message, until then. */
			if (transport_wait(t, (int)(wake - now), &m) == 1) {
				apply_control(t, &m, &interval_s, &next_sample);
				free(m.body);
			}
		}
	}
	log_info("stopping: %zu samples stay spooled for the next run", spool_count(sp));
	transport_free(t);
	spool_close(sp);
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "config", 1, NULL, 'c' },	     { "endpoint", 1, NULL, 'e' },
		{ "source-address", 1, NULL, 's' }, { "interval", 1, NULL, 'i' },
		{ "exchange", 1, NULL, 'x' },	     { "routing-key", 1, NULL, 'k' },
		{ "vhost", 1, NULL, 'v' },	     { "user", 1, NULL, 'u' },
		{ "password", 1, NULL, 'p' },	     { "tls-ca", 1, NULL, 'A' },
		{ "tls-cert", 1, NULL, 'C' },	     { "tls-key", 1, NULL, 'K' },
		{ "spool-dir", 1, NULL, 'd' },	     { "spool-max-bytes", 1, NULL, 'm' },
		{ "timeout", 1, NULL, 't' },	     { "proc-root", 1, NULL, 'r' },
		{ "log-level", 1, NULL, 'l' },	     { "once", 0, NULL, 'o' },
		{ "inbox", 1, NULL, 'I' },
		{ "help", 0, NULL, 'h' },	     { "version", 0, NULL, 'V' },
		{ "check-config", 0, NULL, 'X' },
		{ NULL, 0, NULL, 0 },
	};
	struct agent_cfg c = {
		.endpoint = "vsock://2:5672",
		.exchange = "metrics",
		.vhost = "/",
		.user = "guest",
		.password = "guest",
		.spool_dir = "/var/lib/vmproxy-agent/spool",
		.proc_root = "",
		.interval_s = 10,
		.spool_max_bytes = 16u << 20,
		.timeout_s = 10,
		.inbox = "inbox",
	};
	struct agent_cfg flags = { 0 };
	const char *config = NULL;
	bool once = false, send = false, check = false;
	enum log_level level = LOG_LEVEL_INFO;
	json_t *root = NULL;
	struct sigaction sa;
	int ch, rc;

	if (argc > 1 && strcmp(argv[1], "send") == 0) {
		send = true;
		argv++;
		argc--;
	}
	while ((ch = getopt_long(argc, argv, "c:e:i:hV", opts, NULL)) != -1) {
		char *end = NULL;
		switch (ch) {
		case 'c': config = optarg; break;
		case 'e': flags.endpoint = optarg; break;
		case 's': flags.source_address = optarg; break;
		case 'x': flags.exchange = optarg; break;
		case 'k': flags.routing_key = optarg; break;
		case 'v': flags.vhost = optarg; break;
		case 'u': flags.user = optarg; break;
		case 'p': flags.password = optarg; break;
		case 'A': flags.ca = optarg; break;
		case 'C': flags.cert = optarg; break;
		case 'K': flags.key = optarg; break;
		case 'd': flags.spool_dir = optarg; break;
		case 'r': flags.proc_root = optarg; break;
		case 'l': flags.log_level = optarg; break;
		case 'I': flags.inbox = optarg; break;
		case 'o': once = true; break;
		case 'X': check = true; break;
		case 'i':
		case 'm':
		case 't': {
			unsigned long long v = strtoull(optarg, &end, 10);
			if (!*optarg || *end || v == 0) {
				fprintf(stderr, "vmproxy-agent: --%s expects a positive number\n",
					ch == 'i' ? "interval" : ch == 'm' ? "spool-max-bytes" : "timeout");
				return 1;
			}
			if (ch == 'i')
				flags.interval_s = v;
			else if (ch == 'm')
				flags.spool_max_bytes = v;
			else
				flags.timeout_s = v;
			break;
		}
		case 'h': usage(stdout); return 0;
		case 'V': printf("vmproxy-agent %s\n", VMPROXY_VERSION); return 0;
		default: usage(stderr); return 1;
		}
	}
	if (optind != argc) {
		usage(stderr);
		return 1;
	}
	if (config && load_config(config, &c, &root) < 0)
		return 1;
#define OVERRIDE(f)                                                                                \
	if (flags.f)                                                                               \
	c.f = flags.f
	OVERRIDE(endpoint);
	OVERRIDE(source_address);
	OVERRIDE(exchange);
	OVERRIDE(routing_key);
	OVERRIDE(vhost);
	OVERRIDE(user);
	OVERRIDE(password);
	OVERRIDE(ca);
	OVERRIDE(cert);
	OVERRIDE(key);
	OVERRIDE(spool_dir);
	OVERRIDE(proc_root);
	OVERRIDE(log_level);
	OVERRIDE(inbox);
	OVERRIDE(interval_s);
	OVERRIDE(spool_max_bytes);
	OVERRIDE(timeout_s);
#undef OVERRIDE
	if (c.log_level && log_level_parse(c.log_level, &level) < 0) {
		fprintf(stderr, "vmproxy-agent: log level: expected error, warn, info or debug\n");
		return 1;
	}
	log_init("vmproxy-agent", level);
	if (check) {
		rc = run_check(&c, config);
		json_decref(root);
		return rc;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGHUP, SIG_IGN); /* nothing to reload; a stray HUP must not stop sampling */
	rc = send ? run_send(&c) : run_loop(&c, once);
	json_decref(root);
	return rc;
}
