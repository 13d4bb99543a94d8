/* vmproxyctl.c -- the operator's view into a running vmproxyd through its
 * admin socket: status, health, threads, vms, vm NAME|UUID; --json for
 * scripts. Exit status: 0 done (health: healthy), 1 an error or unhealthy,
 * 2 a usage error. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "ctl_top.h"

#define DEFAULT_SOCKET "/run/vmproxyd/admin.sock"
#define MAX_REPLY      (16u << 20)
#define TIMEOUT_MS     10000

static void usage(FILE *f)
{
	fprintf(f, "Usage: vmproxyctl [--socket PATH] [--json] COMMAND\n"
		   "\n"
		   "Commands:\n"
		   "  status          daemon counters and one line per poll thread\n"
		   "  health          exit 0 when every upstream link is up and the daemon is\n"
		   "                  not draining, 1 otherwise; one line saying why\n"
		   "  threads         poll threads and their upstream links\n"
		   "  vms [--all]     every VM with connections, and its thread; --all adds\n"
		   "                  the VMs known here (static, running domains) without\n"
		   "                  any\n"
		   "  vm NAME|UUID    one VM\n"
		   "  top [INTERVAL [COUNT]]  live view, redrawn every INTERVAL s (default 1); q quits\n"
		   "  migrate VM THREAD  move a VM with all its connections to a poll thread\n"
		   "  balancer on|off    switch automatic balancing\n"
		   "  drain           stop accepting, wait for confirms, close guests, exit\n"
		   "\n"
		   "Options:\n"
		   "  -s, --socket PATH  admin socket (default " DEFAULT_SOCKET ")\n"
		   "  -j, --json         print the daemon's JSON reply\n"
		   "  -h, --help         this text\n"
		   "  -V, --version      print the version\n");
}

static char *roundtrip(const char *path, const char *req)
{
	struct sockaddr_un sun;
	size_t n = 0, cap = 65536;
	char *buf;
	int fd;

	if (strlen(path) >= sizeof(sun.sun_path)) {
		fprintf(stderr, "vmproxyctl: socket path too long\n");
		return NULL;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	strcpy(sun.sun_path, path);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
		fprintf(stderr, "vmproxyctl: cannot connect to %s: %s (is vmproxyd running?)\n",
			path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return NULL;
	}
	if (write(fd, req, strlen(req)) < 0 || write(fd, "\n", 1) < 0) {
		fprintf(stderr, "vmproxyctl: write: %s\n", strerror(errno));
		close(fd);
		return NULL;
	}
	buf = malloc(cap + 1);
	while (buf) {
		struct pollfd pfd = { fd, POLLIN, 0 };
		ssize_t r;

		if (poll(&pfd, 1, TIMEOUT_MS) <= 0) {
			fprintf(stderr, "vmproxyctl: no reply within %d ms\n", TIMEOUT_MS);
			free(buf);
			buf = NULL;
			break;
		}
		r = read(fd, buf + n, cap - n);
		if (r <= 0)
			break;
		n += (size_t)r;
		if (n == cap) {
			char *nb;
			if (cap >= MAX_REPLY) {
				fprintf(stderr, "vmproxyctl: reply larger than %u bytes\n", MAX_REPLY);
				free(buf);
				buf = NULL;
				break;
			}
			cap *= 2;
			nb = realloc(buf, cap + 1);
			if (!nb) {
				free(buf);
				buf = NULL;
			}
			buf = nb;
		}
	}
	if (buf)
		buf[n] = '\0';
	close(fd);
	return buf;
}

static long long num(json_t *o, const char *k)
{
	return (long long)json_integer_value(json_object_get(o, k));
}

static const char *str(json_t *o, const char *k)
{
	const char *s = json_string_value(json_object_get(o, k));
	return s ? s : "";
}

static void print_threads(json_t *threads)
{
	size_t i;
	json_t *t;

	printf("%-6s %-4s %-6s %-5s %-8s %-10s %-10s %-10s %-12s %s\n", "THREAD", "CPU", "CONNS",
	       "VMS", "LINK", "PUBLISHED", "ACKED", "UNCONF", "HELD_BYTES", "NODE");
	json_array_foreach(threads, i, t) {
		json_t *u = json_object_get(t, "upstream");
		printf("%-6lld %-4lld %-6lld %-5lld %-8s %-10lld %-10lld %-10lld %-12lld %s\n",
		       num(t, "thread"), num(t, "cpu"), num(t, "connections"), num(t, "vm_count"),
		       json_is_true(json_object_get(u, "up")) ? "up" : "down", num(u, "published"),
		       num(u, "acked"), num(u, "unconfirmed"), num(t, "held_bytes"), str(u, "node"));
		if (*str(u, "last_error"))
			printf("       last link error: %s\n", str(u, "last_error"));
	}
}

static void print_load(json_t *load)
{
	size_t i;
	json_t *l;

	if (!json_array_size(load))
		return;
	printf("\n%-6s %-10s %-12s %-10s %-12s %-6s %-10s\n", "THREAD", "MSGS_IN/S", "BYTES_IN/S",
	       "MSGS_OUT/S", "BYTES_OUT/S", "CPU%", "LOOP_MAXUS");
	json_array_foreach(load, i, l)
		printf("%-6lld %-10.0f %-12.0f %-10.0f %-12.0f %-6.1f %-10lld\n", num(l, "thread"),
		       json_number_value(json_object_get(l, "messages_in_per_s")),
		       json_number_value(json_object_get(l, "bytes_in_per_s")),
		       json_number_value(json_object_get(l, "messages_out_per_s")),
		       json_number_value(json_object_get(l, "bytes_out_per_s")),
		       json_number_value(json_object_get(l, "cpu_percent")), num(l, "loop_max_us"));
}

static void print_vm_row(json_t *v)
{
	char thread[24] = "-"; /* vms --all: a VM without connections has no thread */

	if (json_is_integer(json_object_get(v, "thread")))
		snprintf(thread, sizeof(thread), "%lld", num(v, "thread"));
	printf("%-36s %-20s %-6lld %-6s %-6lld %-10lld %-10lld %-10lld %s\n", str(v, "uuid"),
	       str(v, "name"), num(v, "cid"), thread, num(v, "connections"),
	       num(v, "messages_in"), num(v, "acked"), num(v, "held_bytes"),
	       json_is_true(json_object_get(v, "blocked"))	    ? "blocked"
	       : json_is_integer(json_object_get(v, "thread")) ? ""
							    : "no connection");
}

static void print_vm_header(void)
{
	printf("%-36s %-20s %-6s %-6s %-6s %-10s %-10s %-10s %s\n", "UUID", "NAME", "CID",
	       "THREAD", "CONNS", "MSGS_IN", "ACKED", "HELD_BYTES", "STATE");
}

/* Commands the daemon serves; anything else is a usage error (exit 2). */
static bool known_command(const char *cmd)
{
	static const char *const cmds[] = { "status", "health", "threads", "vms", "vm", "migrate",
					    "balancer", "drain", "top", NULL };

	for (size_t i = 0; cmds[i]; i++)
		if (strcmp(cmds[i], cmd) == 0)
			return true;
	return false;
}

/* The verdict of a status reply: 0 healthy, 1 not; with SAY, one line why. */
static int print_health(json_t *reply, bool say)
{
	json_t *d = json_object_get(reply, "daemon"), *threads = json_object_get(reply, "threads");
	json_t *t, *first_down = NULL;
	size_t i, down = 0, n = json_array_size(threads);

	json_array_foreach(threads, i, t) {
		if (!json_is_true(json_object_get(json_object_get(t, "upstream"), "up"))) {
			if (!first_down)
				first_down = t;
			down++;
		}
	}
	if (json_is_true(json_object_get(d, "draining"))) {
		if (say)
			printf("unhealthy: draining (no new connections; it exits once guests "
			       "are closed)\n");
		return 1;
	}
	if (n == 0) {
		if (say)
			printf("unhealthy: no poll thread answered\n");
		return 1;
	}
	if (down) {
		json_t *u = json_object_get(first_down, "upstream");

		if (say && json_is_object(first_down))
			printf("unhealthy: %zu of %zu upstream links down (thread %lld: %s)\n", down,
			       n, num(first_down, "thread"),
			       *str(u, "last_error") ? str(u, "last_error") : "not connected yet");
		else if (say)
			printf("unhealthy: %zu of %zu upstream links down (a poll thread did not "
			       "answer)\n", down, n);
		return 1;
	}
	if (say)
		printf("healthy: %zu upstream link%s up, %lld guest connection%s\n", n,
		       n == 1 ? "" : "s", num(d, "connections"),
		       num(d, "connections") == 1 ? "" : "s");
	return 0;
}

/* The arguments of CMD (ARGV[ARGI] is CMD) checked before anything is
 * allocated: 0, or 2 with the complaint on stderr. *THREAD: migrate's
 * target. */
static int check_args(const char *cmd, int argi, int argc, char **argv, bool all, long *thread)
{
	if (!known_command(cmd)) {
		fprintf(stderr, "vmproxyctl: unknown command \"%.64s\"\n", cmd);
		usage(stderr);
		return 2;
	}
	if (all && strcmp(cmd, "vms") != 0) {
		fprintf(stderr, "vmproxyctl: --all goes with vms\n");
		return 2;
	}
	if (strcmp(cmd, "vm") == 0 && argi + 1 >= argc) {
		fprintf(stderr, "vmproxyctl: vm needs a NAME or UUID\n");
		return 2;
	}
	if (strcmp(cmd, "migrate") == 0) {
		char *end;

		if (argi + 2 >= argc) {
			fprintf(stderr, "vmproxyctl: migrate needs a VM and a thread number\n");
			return 2;
		}
		*thread = strtol(argv[argi + 2], &end, 10);
		if (*end || *thread < 0 || *thread > 65535) {
			fprintf(stderr, "vmproxyctl: thread must be a number, got \"%s\"\n",
				argv[argi + 2]);
			return 2;
		}
	}
	if (strcmp(cmd, "balancer") == 0 && argi + 1 < argc &&
	    strcmp(argv[argi + 1], "on") != 0 && strcmp(argv[argi + 1], "off") != 0) {
		fprintf(stderr, "vmproxyctl: balancer takes on or off\n");
		return 2;
	}
	return 0;
}

/* The request text for CMD (checked by check_args); malloc'd. */
static char *build_request(const char *cmd, int argi, int argc, char **argv, bool all,
			   long thread)
{
	json_t *req;
	char *text;

	/* health is a verdict over the status reply. */
	req = json_pack("{s:s}", "command", strcmp(cmd, "health") == 0 ? "status" : cmd);
	if (all)
		json_object_set_new(req, "all", json_true());
	if (strcmp(cmd, "vm") == 0) {
		json_object_set_new(req, "vm", json_string(argv[argi + 1]));
	} else if (strcmp(cmd, "migrate") == 0) {
		json_object_set_new(req, "vm", json_string(argv[argi + 1]));
		json_object_set_new(req, "thread", json_integer(thread));
	} else if (strcmp(cmd, "balancer") == 0 && argi + 1 < argc) {
		json_object_set_new(req, "enabled", json_boolean(strcmp(argv[argi + 1], "on") == 0));
	}
	text = json_dumps(req, JSON_COMPACT);
	json_decref(req);
	return text;
}

/* status: the daemon's counters, the libvirt connection, the threads. */
static void print_status(json_t *reply)
{
	json_t *d = json_object_get(reply, "daemon");
	json_t *lv = json_object_get(d, "libvirt");

	printf("connections %lld, held messages %lld, accepted %lld, refused (unknown "
	       "peer) %lld, refused (limits) %lld, refused (libvirt unreachable) %lld, "
	       "refused (lookups pending) %lld%s\n",
	       num(d, "connections"), num(d, "held_messages"), num(d, "accepted"),
	       num(d, "refused_unknown_peer"), num(d, "refused_limit"),
	       num(d, "refused_libvirt_unreachable"), num(d, "refused_lookups_pending"),
	       json_is_true(json_object_get(d, "draining")) ? ", draining" : "");
	printf("libvirt %s, %lld disconnects, %lld reconnects, %lld failed reconnects, "
	       "%lld peers served from cache while unreachable, %lld lookups pending\n\n",
	       str(lv, "state"), num(lv, "disconnects"), num(lv, "reconnects"),
	       num(lv, "reconnect_failures"), num(lv, "served_from_cache"),
	       num(d, "lookups_pending"));
	print_threads(json_object_get(reply, "threads"));
	print_load(json_object_get(d, "load"));
}

/* Print CMD's REPLY (TEXT as received) for a person, or as JSON. The
 * exit status. */
static int print_reply(const char *cmd, json_t *reply, const char *text, bool as_json)
{
	int rc = 0;

	if (!json_is_true(json_object_get(reply, "ok"))) {
		fprintf(stderr, "vmproxyctl: %s\n", str(reply, "error"));
		rc = 1;
	} else if (as_json) {
		fputs(text, stdout);
		if (strcmp(cmd, "health") == 0)
			rc = print_health(reply, false);
	} else if (strcmp(cmd, "health") == 0) {
		rc = print_health(reply, true);
	} else if (strcmp(cmd, "migrate") == 0 || strcmp(cmd, "drain") == 0) {
		printf("%s\n", str(reply, "result"));
	} else if (strcmp(cmd, "balancer") == 0) {
		printf("balancer %s\n",
		       json_is_true(json_object_get(json_object_get(reply, "daemon"),
						    "balancer_enabled"))
			       ? "on"
			       : "off");
	} else if (strcmp(cmd, "status") == 0) {
		print_status(reply);
	} else if (strcmp(cmd, "threads") == 0) {
		print_threads(json_object_get(reply, "threads"));
	} else if (strcmp(cmd, "vms") == 0) {
		size_t i;
		json_t *v;
		print_vm_header();
		json_array_foreach(json_object_get(reply, "vms"), i, v)
			print_vm_row(v);
	} else {
		print_vm_header();
		print_vm_row(json_object_get(reply, "vm"));
	}
	return rc;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "json", no_argument, NULL, 'j' },
		{ "all", no_argument, NULL, 'a' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	const char *path = DEFAULT_SOCKET, *cmd;
	bool as_json = false, all = false;
	json_t *reply;
	char *reqtext, *text;
	long thread = 0;
	int c, rc;

	while ((c = getopt_long(argc, argv, "s:jhV", opts, NULL)) != -1) {
		switch (c) {
		case 's':
			path = optarg;
			break;
		case 'j':
			as_json = true;
			break;
		case 'a':
			all = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("vmproxyctl %s\n", VMPROXY_VERSION);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind >= argc) {
		usage(stderr);
		return 2;
	}
	cmd = argv[optind];
	if (strcmp(cmd, "top") == 0)
		return ctl_top_run(path, argc - optind - 1, argv + optind + 1, roundtrip);
	rc = check_args(cmd, optind, argc, argv, all, &thread);
	if (rc)
		return rc;
	reqtext = build_request(cmd, optind, argc, argv, all, thread);
	text = roundtrip(path, reqtext);
	free(reqtext);
	if (!text)
		return 1;
	reply = json_loads(text, 0, NULL);
	if (!reply) {
		fprintf(stderr, "vmproxyctl: the daemon's reply is not JSON\n");
		free(text);
		return 1;
	}
	rc = print_reply(cmd, reply, text, as_json);
	json_decref(reply);
	free(text);
	return rc;
}
