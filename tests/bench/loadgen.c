/* loadgen.c -- AMQP publisher load generator (rabbitmq-c): V simulated VMs,
 * each with its own loopback source address, M connections per VM,
 * publishing with confirms in a window; reports throughput, confirm
 * latency percentiles and per-VM figures as JSON. Also the C guest client
 * of the integration tests: with --count every message carries
 * {"vm","conn","seq"} so arrival, order and duplicates can be checked. */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <amqp.h>

#include <jansson.h>

#include "broker.h"
#include "clock.h"
#include "hdr.h"

struct opts {
	const char *host, *vhost, *user, *password, *exchange, *rk, *source_base, *report;
	uint16_t port;
	bool tls, external;
	const char *ca, *cert, *key;
	unsigned vms, conns_per_vm, threads, window, size;
	double rate, duration;
	uint64_t count;
	unsigned drain_timeout, heartbeat;
	double idle;
	bool verbose;
};

struct vm_stats {
	struct hdr h;
	uint64_t sent, confirmed, nacked;
};

struct lconn {
	amqp_connection_state_t c;
	int fd;
	unsigned vm, idx;
	uint64_t next_tag; /* tags sent so far */
	uint64_t low;	   /* lowest unsettled tag */
	uint64_t *send_ns; /* ring of window entries, by tag */
	uint8_t *settled;
	uint64_t sent, confirmed, nacked;
	uint64_t bad_acks; /* for a tag never sent, or one already settled */
	double next_send; /* seconds, for rate pacing */
	bool dead;
	char err[200];
};

struct worker {
	pthread_t tid;
	unsigned id;
	struct lconn **conns;
	unsigned n;
	uint64_t errors;
	char first_error[300];
};

static struct opts o = {
	.host = "127.0.0.1",
	.vhost = "/",
	.user = "guest",
	.password = "guest",
	.exchange = "metrics",
	.rk = "load",
	.port = 5672,
	.vms = 1,
	.conns_per_vm = 1,
	.threads = 1,
	.window = 64,
	.size = 256,
	.duration = 10,
	.drain_timeout = 15,
	.heartbeat = 60,
};

static struct vm_stats *vmstats;
static atomic_bool stop_flag;
static double t_start;

static double now_s(void)
{
	return (double)clock_mono_ns() / 1e9;
}

static void on_signal(int sig)
{
	(void)sig;
	atomic_store(&stop_flag, true);
}

static int make_fd(unsigned vm, char *err, size_t errlen)
{
	struct sockaddr_in src = { .sin_family = AF_INET }, dst = { .sin_family = AF_INET };
	int fd, one = 1;

	if (inet_pton(AF_INET, o.source_base, &src.sin_addr) != 1 ||
	    inet_pton(AF_INET, o.host, &dst.sin_addr) != 1) {
		snprintf(err, errlen, "--source-base and --host must be numeric IPv4 addresses");
		return -EINVAL;
	}
	src.sin_addr.s_addr = htonl(ntohl(src.sin_addr.s_addr) + vm);
	dst.sin_port = htons(o.port);
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	/* As rabbitmq-c does on the sockets it opens itself: without it the
	 * handshake's small writes wait for delayed ACKs. */
	if (fd >= 0)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (fd < 0 || bind(fd, (struct sockaddr *)&src, sizeof(src)) < 0 ||
	    connect(fd, (struct sockaddr *)&dst, sizeof(dst)) < 0) {
		int e = errno;
		snprintf(err, errlen, "connect from %s+%u: %s", o.source_base, vm, strerror(e));
		if (fd >= 0)
			close(fd);
		return -e;
	}
	return fd;
}

static int lconn_open(struct lconn *lc, char *err, size_t errlen)
{
	struct broker_opts bo;
	char name[64];
	int r;

	broker_opts_init(&bo);
	bo.host = o.host;
	bo.port = o.port;
	bo.vhost = o.vhost;
	bo.user = o.user;
	bo.password = o.password;
	bo.tls = o.tls;
	bo.ca = o.ca;
	bo.cert = o.cert;
	bo.key = o.key;
	bo.auth = o.external ? BROKER_AUTH_EXTERNAL : BROKER_AUTH_PLAIN;
	bo.heartbeat = (int)o.heartbeat;
	snprintf(name, sizeof(name), "loadgen vm%u conn%u", lc->vm, lc->idx);
	bo.connection_name = name;
	bo.product = "vmproxy-loadgen";
	if (o.source_base) {
		bo.fd = make_fd(lc->vm, err, errlen);
		if (bo.fd < 0)
			return bo.fd;
	}
	r = broker_connect(&bo, &lc->c, err, errlen);
	if (r < 0)
		return r;
	r = broker_channel_open(lc->c, 1, true, err, errlen);
	if (r < 0) {
		amqp_destroy_connection(lc->c);
		lc->c = NULL;
		return r;
	}
	lc->fd = amqp_get_sockfd(lc->c);
	return 0;
}

static void lconn_fail(struct worker *w, struct lconn *lc, const char *what)
{
	if (lc->dead)
		return;
	lc->dead = true;
	w->errors++;
	snprintf(lc->err, sizeof(lc->err), "%.199s", what);
	if (!w->first_error[0])
		snprintf(w->first_error, sizeof(w->first_error), "vm %u conn %u: %.200s", lc->vm,
			 lc->idx, what);
}

static void settle(struct lconn *lc, uint64_t tag, bool ack, uint64_t now_ns)
{
	struct vm_stats *vs = &vmstats[lc->vm];
	uint64_t i = tag % o.window;

	if (tag < lc->low || tag > lc->next_tag || lc->settled[i]) {
		lc->bad_acks++;
		return;
	}
	lc->settled[i] = 1;
	if (ack) {
		lc->confirmed++;
		vs->confirmed++;
		hdr_record(&vs->h, (now_ns - lc->send_ns[i]) / 1000);
	} else {
		lc->nacked++;
		vs->nacked++;
	}
	while (lc->low <= lc->next_tag && lc->settled[lc->low % o.window]) {
		lc->settled[lc->low % o.window] = 0;
		lc->low++;
	}
}

static void drain(struct worker *w, struct lconn *lc)
{
	for (;;) {
		struct timeval tv = { 0, 0 };
		amqp_frame_t f;
		uint64_t now;
		int r = amqp_simple_wait_frame_noblock(lc->c, &f, &tv);

		if (r == AMQP_STATUS_TIMEOUT)
			break;
		if (r != AMQP_STATUS_OK) {
			lconn_fail(w, lc, amqp_error_string2(r));
			return;
		}
		if (f.frame_type != AMQP_FRAME_METHOD)
			continue;
		now = clock_mono_ns();
		if (f.payload.method.id == AMQP_BASIC_ACK_METHOD ||
		    f.payload.method.id == AMQP_BASIC_NACK_METHOD) {
			bool ack = f.payload.method.id == AMQP_BASIC_ACK_METHOD;
			uint64_t tag;
			bool multiple;
			if (ack) {
				amqp_basic_ack_t *a = f.payload.method.decoded;
				tag = a->delivery_tag;
				multiple = a->multiple;
			} else {
				amqp_basic_nack_t *a = f.payload.method.decoded;
				tag = a->delivery_tag;
				multiple = a->multiple;
			}
			if (multiple && (tag < lc->low || tag > lc->next_tag))
				lc->bad_acks++; /* covers nothing new, or unsent tags */
			else if (multiple)
				for (uint64_t t = lc->low; t <= tag; t++) {
					if (!lc->settled[t % o.window])
						settle(lc, t, ack, now);
				}
			else
				settle(lc, tag, ack, now);
		} else if (f.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD) {
			amqp_channel_close_t *c = f.payload.method.decoded;
			char buf[200];
			snprintf(buf, sizeof(buf), "channel closed by server: %u %.*s", c->reply_code,
				 (int)c->reply_text.len, (char *)c->reply_text.bytes);
			lconn_fail(w, lc, buf);
			return;
		} else if (f.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD) {
			amqp_connection_close_t *c = f.payload.method.decoded;
			char buf[200];
			snprintf(buf, sizeof(buf), "connection closed by server: %u %.*s",
				 c->reply_code, (int)c->reply_text.len, (char *)c->reply_text.bytes);
			lconn_fail(w, lc, buf);
			return;
		}
	}
	amqp_maybe_release_buffers(lc->c);
}

static bool sending_done(const struct lconn *lc, double t)
{
	if (lc->dead || atomic_load(&stop_flag) || o.idle > 0)
		return true;
	if (o.count)
		return lc->next_tag >= o.count;
	return t - t_start >= o.duration;
}

static void publish_some(struct worker *w, struct lconn *lc, char *body)
{
	double t = now_s();

	while (!sending_done(lc, t) && lc->next_tag + 1 - lc->low < o.window) {
		amqp_basic_properties_t p;
		amqp_bytes_t b;
		char rk[128];
		uint64_t tag = lc->next_tag + 1;
		int n, r;

		if (o.rate > 0) {
			if (t < lc->next_send)
				return;
			lc->next_send += 1.0 / o.rate;
			if (lc->next_send < t - 1.0)
				lc->next_send = t; /* do not burst after a stall */
		}
		n = snprintf(body, o.size + 64, "{\"vm\":%u,\"conn\":%u,\"seq\":%" PRIu64 ",\"pad\":\"",
			     lc->vm, lc->idx, tag);
		while ((unsigned)n + 2 < o.size)
			body[n++] = 'x';
		body[n++] = '"';
		body[n++] = '}';
		b.bytes = body;
		b.len = (size_t)n;
		memset(&p, 0, sizeof(p));
		p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
		p.content_type = amqp_cstring_bytes("application/json");
		p.delivery_mode = 2;
		snprintf(rk, sizeof(rk), "%s.v%u.c%u", o.rk, lc->vm, lc->idx);
		lc->send_ns[tag % o.window] = clock_mono_ns();
		lc->settled[tag % o.window] = 0;
		r = amqp_basic_publish(lc->c, 1, amqp_cstring_bytes(o.exchange),
				       amqp_cstring_bytes(rk), 0, 0, &p, b);
		if (r != AMQP_STATUS_OK) {
			lconn_fail(w, lc, amqp_error_string2(r));
			return;
		}
		lc->next_tag = tag;
		lc->sent++;
		vmstats[lc->vm].sent++;
		t = now_s();
	}
}

/* --idle: hold the connections open without publishing for o.idle
 * seconds, reading every second so heartbeats are sent and answered. */
static void *worker_idle(void *arg)
{
	struct worker *w = arg;

	while (!atomic_load(&stop_flag) && now_s() - t_start < o.idle) {
		struct timespec ts = { 0, 200 * 1000 * 1000 };
		for (unsigned i = 0; i < w->n; i++) {
			struct lconn *lc = w->conns[i];
			if (!lc->dead)
				drain(w, lc);
		}
		nanosleep(&ts, NULL);
	}
	return NULL;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct pollfd *pfd = calloc(w->n ? w->n : 1, sizeof(*pfd));
	char *body = malloc(o.size + 128);
	double drain_deadline = 0;

	for (;;) {
		bool all_sent = true, all_settled = true, can_publish = false;
		double t = now_s();

		for (unsigned i = 0; i < w->n; i++) {
			struct lconn *lc = w->conns[i];
			if (lc->dead)
				continue;
			publish_some(w, lc, body);
			if (!sending_done(lc, t))
				all_sent = false;
			if (!lc->dead && lc->low <= lc->next_tag)
				all_settled = false;
			if (!lc->dead && !sending_done(lc, t) && lc->next_tag + 1 - lc->low < o.window)
				can_publish = true;
		}
		if (all_sent && all_settled)
			break;
		if (all_sent) {
			if (drain_deadline == 0)
				drain_deadline = t + o.drain_timeout;
			else if (t > drain_deadline)
				break;
		}
		for (unsigned i = 0; i < w->n; i++) {
			pfd[i].fd = w->conns[i]->dead ? -1 : w->conns[i]->fd;
			pfd[i].events = POLLIN;
			pfd[i].revents = 0;
		}
		/* Sleep in poll while every window is full: a spinning load
		 * generator would take a CPU from the broker and the proxy. */
		poll(pfd, w->n, o.rate > 0 || all_sent || !can_publish ? 1 : 0);
		for (unsigned i = 0; i < w->n; i++) {
			struct lconn *lc = w->conns[i];
			if (lc->dead)
				continue;
			if (pfd[i].revents || amqp_frames_enqueued(lc->c) || amqp_data_in_buffer(lc->c))
				drain(w, lc);
		}
	}
	for (unsigned i = 0; i < w->n; i++) {
		struct lconn *lc = w->conns[i];
		if (!lc->dead && lc->low <= lc->next_tag) {
			char buf[100];
			snprintf(buf, sizeof(buf), "%" PRIu64 " publishes never confirmed",
				 lc->next_tag - lc->low + 1);
			lconn_fail(w, lc, buf);
		}
	}
	free(body);
	free(pfd);
	return NULL;
}

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: loadgen [options]\n"
		"  --host ADDR --port N --vhost V --user U --password P\n"
		"  --tls --ca F [--cert F --key F] [--external]\n"
		"  --vms V --conns-per-vm M --source-base ADDR (VM i connects from ADDR+i)\n"
		"  --rate R        messages/s per connection (0: as fast as the window allows)\n"
		"  --size BYTES    message body size (default 256)\n"
		"  --window W      unconfirmed publishes per connection (default 64)\n"
		"  --duration S    seconds of publishing (default 10), or\n"
		"  --count N       messages per connection, then wait for every confirm\n"
		"  --exchange E --routing-key K   (routing key K.v<vm>.c<conn>)\n"
		"  --threads T     publisher threads (VMs are spread over them)\n"
		"  --drain-timeout S  wait this long for the last confirms (default 15)\n"
		"  --heartbeat S   heartbeat to ask for (default 60)\n"
		"  --idle S        open the connections, publish nothing, hold them S seconds\n"
		"                  (reading, so heartbeats flow), then report and close\n"
		"  --report FILE   write the JSON report there (default stdout)\n");
}

static void parse(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "host", 1, NULL, 'H' },     { "port", 1, NULL, 'p' },
		{ "vhost", 1, NULL, 'v' },    { "user", 1, NULL, 'u' },
		{ "password", 1, NULL, 'P' }, { "tls", 0, NULL, 't' },
		{ "ca", 1, NULL, 'a' },	      { "cert", 1, NULL, 'c' },
		{ "key", 1, NULL, 'k' },      { "external", 0, NULL, 'X' },
		{ "vms", 1, NULL, 'V' },      { "conns-per-vm", 1, NULL, 'M' },
		{ "source-base", 1, NULL, 's' }, { "rate", 1, NULL, 'r' },
		{ "size", 1, NULL, 'S' },     { "window", 1, NULL, 'w' },
		{ "duration", 1, NULL, 'd' }, { "count", 1, NULL, 'n' },
		{ "exchange", 1, NULL, 'e' }, { "routing-key", 1, NULL, 'R' },
		{ "threads", 1, NULL, 'T' },  { "drain-timeout", 1, NULL, 'D' },
		{ "report", 1, NULL, 'o' },   { "help", 0, NULL, 'h' },
		{ "heartbeat", 1, NULL, 'B' }, { "idle", 1, NULL, 'I' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		switch (c) {
		case 'H': o.host = optarg; break;
		case 'p': o.port = (uint16_t)atoi(optarg); break;
		case 'v': o.vhost = optarg; break;
		case 'u': o.user = optarg; break;
		case 'P': o.password = optarg; break;
		case 't': o.tls = true; break;
		case 'a': o.ca = optarg; break;
		case 'c': o.cert = optarg; break;
		case 'k': o.key = optarg; break;
		case 'X': o.external = true; break;
		case 'V': o.vms = (unsigned)atoi(optarg); break;
		case 'M': o.conns_per_vm = (unsigned)atoi(optarg); break;
		case 's': o.source_base = optarg; break;
		case 'r': o.rate = atof(optarg); break;
		case 'S': o.size = (unsigned)atoi(optarg); break;
		case 'w': o.window = (unsigned)atoi(optarg); break;
		case 'd': o.duration = atof(optarg); break;
		case 'n': o.count = strtoull(optarg, NULL, 10); break;
		case 'e': o.exchange = optarg; break;
		case 'R': o.rk = optarg; break;
		case 'T': o.threads = (unsigned)atoi(optarg); break;
		case 'D': o.drain_timeout = (unsigned)atoi(optarg); break;
		case 'o': o.report = optarg; break;
		case 'B': o.heartbeat = (unsigned)atoi(optarg); break;
		case 'I': o.idle = atof(optarg); break;
		case 'h': usage(stdout); exit(0);
		default: usage(stderr); exit(2);
		}
	}
	if (!o.vms || !o.conns_per_vm || !o.threads || !o.window || o.window > 100000 ||
	    o.size > (64u << 20) || o.heartbeat > 3600 || o.idle < 0 || o.idle > 86400 ||
	    optind != argc) {
		usage(stderr);
		exit(2);
	}
	if (o.threads > o.vms)
		o.threads = o.vms;
}

static json_t *lat_json(const struct hdr *h)
{
	return json_pack("{s:I, s:I, s:I, s:I, s:I, s:f}", "p50", (json_int_t)hdr_quantile(h, 0.5),
			 "p90", (json_int_t)hdr_quantile(h, 0.9), "p99",
			 (json_int_t)hdr_quantile(h, 0.99), "p999",
			 (json_int_t)hdr_quantile(h, 0.999), "max", (json_int_t)h->max, "mean",
			 h->total ? (double)h->sum / (double)h->total : 0.0);
}

int main(int argc, char **argv)
{
	unsigned nconns, k = 0;
	struct lconn *conns;
	struct worker *ws;
	struct hdr *all;
	uint64_t sent = 0, confirmed = 0, nacked = 0, errors = 0, bad_acks = 0;
	double elapsed;
	json_t *rep, *per_vm, *errs;
	FILE *out = stdout;
	char err[300];

	parse(argc, argv);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	nconns = o.vms * o.conns_per_vm;
	conns = calloc(nconns, sizeof(*conns));
	vmstats = calloc(o.vms, sizeof(*vmstats));
	ws = calloc(o.threads, sizeof(*ws));
	all = calloc(1, sizeof(*all));
	if (!conns || !vmstats || !ws || !all)
		return 1;
	for (unsigned t = 0; t < o.threads; t++) {
		ws[t].id = t;
		ws[t].conns = calloc(nconns, sizeof(struct lconn *));
	}
	errs = json_array();
	for (unsigned v = 0; v < o.vms; v++) {
		for (unsigned m = 0; m < o.conns_per_vm; m++, k++) {
			struct lconn *lc = &conns[k];
			struct worker *w = &ws[v % o.threads];
			lc->vm = v;
			lc->idx = m;
			lc->low = 1;
			lc->send_ns = calloc(o.window, sizeof(uint64_t));
			lc->settled = calloc(o.window, 1);
			w->conns[w->n++] = lc;
			if (lconn_open(lc, err, sizeof(err)) < 0) {
				lconn_fail(w, lc, err);
				if (json_array_size(errs) < 20)
					json_array_append_new(errs, json_sprintf("vm %u conn %u: %s", v, m, err));
			}
		}
	}
	t_start = now_s();
	{
		unsigned open = 0;
		for (unsigned i = 0; i < nconns; i++)
			open += !conns[i].dead;
		/* A line a driver script can wait for before it measures. */
		fprintf(stderr, "loadgen: %u of %u connections open\n", open, nconns);
		fflush(stderr);
	}
	for (unsigned i = 0; i < nconns; i++)
		conns[i].next_send = t_start;
	for (unsigned t = 0; t < o.threads; t++)
		pthread_create(&ws[t].tid, NULL, o.idle > 0 ? worker_idle : worker_main, &ws[t]);
	for (unsigned t = 0; t < o.threads; t++)
		pthread_join(ws[t].tid, NULL);
	elapsed = now_s() - t_start;

	per_vm = json_array();
	for (unsigned v = 0; v < o.vms; v++) {
		struct vm_stats *vs = &vmstats[v];
		hdr_merge(all, &vs->h);
		sent += vs->sent;
		confirmed += vs->confirmed;
		nacked += vs->nacked;
		json_array_append_new(per_vm, json_pack("{s:i, s:I, s:I, s:I, s:f, s:o}", "vm", v,
							"sent", (json_int_t)vs->sent, "confirmed",
							(json_int_t)vs->confirmed, "nacked",
							(json_int_t)vs->nacked, "msgs_per_s",
							(double)vs->confirmed / elapsed, "latency_us",
							lat_json(&vs->h)));
	}
	for (unsigned i = 0; i < nconns; i++) {
		bad_acks += conns[i].bad_acks;
		if (conns[i].dead) {
			errors++;
			if (json_array_size(errs) < 20 && conns[i].err[0])
				json_array_append_new(errs, json_sprintf("vm %u conn %u: %s", conns[i].vm,
									 conns[i].idx, conns[i].err));
		}
	}
	rep = json_pack("{s:i, s:i, s:i, s:i, s:i, s:I, s:I, s:I, s:I, s:f, s:f, s:o, s:o, s:o}",
			"vms", o.vms, "connections", nconns, "size", o.size, "window", o.window,
			"threads", o.threads, "sent", (json_int_t)sent, "confirmed",
			(json_int_t)confirmed, "nacked", (json_int_t)nacked, "errors",
			(json_int_t)errors, "duration_s", elapsed, "msgs_per_s",
			(double)confirmed / elapsed, "latency_us", lat_json(all), "per_vm", per_vm,
			"error_samples", errs);
	json_object_set_new(rep, "bad_acks", json_integer((json_int_t)bad_acks));
	if (o.report) {
		out = fopen(o.report, "w");
		if (!out) {
			perror(o.report);
			return 1;
		}
	}
	json_dumpf(rep, out, JSON_INDENT(1));
	fputc('\n', out);
	if (out != stdout)
		fclose(out);
	for (unsigned i = 0; i < nconns; i++)
		if (conns[i].c)
			broker_close(conns[i].c);
	json_decref(rep);
	for (unsigned i = 0; i < nconns; i++) {
		free(conns[i].send_ns);
		free(conns[i].settled);
	}
	for (unsigned t = 0; t < o.threads; t++)
		free(ws[t].conns);
	free(ws);
	free(conns);
	free(vmstats);
	free(all);
	if (errors || bad_acks)
		return 1;
	if (o.count && confirmed != (uint64_t)nconns * o.count)
		return 1;
	return 0;
}
