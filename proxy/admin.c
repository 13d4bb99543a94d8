/* admin.c -- see admin.h. Requests are served one at a time with a short
 * I/O deadline each, so a slow or hostile client delays the next admin
 * request by at most that deadline and never touches the data path. */
#include "admin.h"

#include <errno.h>
#include <grp.h>
#include <poll.h>
#include <pthread.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "clock.h"
#include "daemon.h"
#include "log.h"
#include "report_json.h"

#define ADMIN_IO_TIMEOUT_MS 2000
#define QUERY_TIMEOUT_MS    2000

struct admin {
	struct vmproxy *p;
	char *path;
	int fd, stopfd;
	gid_t gid;
	bool have_gid;
	pthread_t tid;
};

static json_t *error_reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static json_t *error_reply(const char *fmt, ...)
{
	char buf[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	return json_pack("{s:b, s:s}", "ok", 0, "error", buf);
}

static json_t *strip_vms(json_t *threads)
{
	size_t i;
	json_t *t;

	json_array_foreach(threads, i, t)
		if (json_is_object(t))
			json_object_del(t, "vms");
	return threads;
}

static json_t *list_vms(json_t *threads, const char *only)
{
	json_t *out = json_array(), *t, *v;
	size_t i, j;

	json_array_foreach(threads, i, t) {
		json_t *vms = json_object_get(t, "vms");
		json_array_foreach(vms, j, v) {
			const char *uuid = json_string_value(json_object_get(v, "uuid"));
			const char *name = json_string_value(json_object_get(v, "name"));
			if (only && !(uuid && strcmp(uuid, only) == 0) &&
			    !(name && strcmp(name, only) == 0))
				continue;
			json_object_set(v, "thread", json_object_get(t, "thread"));
			json_array_append(out, v);
		}
	}
	return out;
}

/* Append to VMS (rows of VMs with connections) a row for every VM the
 * identity module knows of (static entries, running libvirt domains) that
 * has none: the guest whose agent never connected is then visible. */
static void add_idle_vms(struct vmproxy *p, json_t *vms)
{
	struct vm_info *known = NULL;
	size_t n = 0, i, j;
	json_t *v;

	if (vm_identity_list_known(vmproxy_identity(p), &known, &n) < 0 && !known)
		return;
	for (i = 0; i < n; i++) {
		bool seen = false;

		json_array_foreach(vms, j, v) {
			const char *u = json_string_value(json_object_get(v, "uuid"));
			if (u && strcmp(u, known[i].uuid) == 0)
				seen = true;
		}
		if (!seen)
			json_array_append_new(vms, json_pack("{s:s, s:s, s:I, s:n, s:i, s:i, s:i, "
							     "s:i, s:b}", "uuid", known[i].uuid,
							     "name", known[i].name, "cid",
							     (json_int_t)known[i].cid, "thread",
							     "connections", 0, "messages_in", 0,
							     "acked", 0, "held_bytes", 0,
							     "blocked", 0));
	}
	free(known);
}

static json_t *cmd_migrate(struct vmproxy *p, json_t *r)
{
	const char *vm = json_string_value(json_object_get(r, "vm"));
	json_t *th = json_object_get(r, "thread");
	char msg[200];
	int st;

	if (!vm || !json_is_integer(th) || json_integer_value(th) < 0 ||
	    json_integer_value(th) > 65535)
		return error_reply("\"migrate\" needs a string \"vm\" and an integer \"thread\"");
	st = vmproxy_migrate(p, vm, (unsigned)json_integer_value(th), msg, sizeof(msg));
	return st < 0 ? error_reply("%s", msg) : json_pack("{s:b, s:s}", "ok", 1, "result", msg);
}

static json_t *cmd_drain(struct vmproxy *p, json_t *r)
{
	(void)r;
	vmproxy_stop(p);
	return json_pack("{s:b, s:s}", "ok", 1, "result",
			 "draining: no new connections; guests are closed once their "
			 "messages are confirmed");
}

/* The "daemon" object: the daemon's counters as JSON. */
static json_t *daemon_json(struct vmproxy *p)
{
	struct vmproxy_counters c;
	json_t *o;

	vmproxy_counters(p, &c);
	o = report_json_counters(&c);
	vmproxy_counters_release(&c);
	return o;
}

static json_t *cmd_balancer(struct vmproxy *p, json_t *r)
{
	json_t *en = json_object_get(r, "enabled");

	if (en && !json_is_boolean(en))
		return error_reply("\"enabled\" must be true or false");
	if (en)
		vmproxy_set_balancer(p, json_is_true(en));
	return json_pack("{s:b, s:o}", "ok", 1, "daemon", daemon_json(p));
}

/* "vm": the one VM named by R's "vm" (name or uuid) among THREADS (stolen). */
static json_t *one_vm(json_t *r, json_t *threads)
{
	const char *which = json_string_value(json_object_get(r, "vm"));
	json_t *found, *reply;
	char c[80];

	if (!which) {
		json_decref(threads);
		return error_reply("\"vm\" needs a string \"vm\" (name or uuid)");
	}
	found = list_vms(threads, which);
	json_decref(threads);
	if (json_array_size(found) == 0)
		reply = error_reply("no VM \"%s\" has connections here",
				    log_sanitize(c, sizeof(c), which, (unsigned)strlen(which)));
	else
		reply = json_pack("{s:b, s:O}", "ok", 1, "vm", json_array_get(found, 0));
	json_decref(found);
	return reply;
}

/* status, threads, vms and vm: what the poll threads report. */
static json_t *cmd_report(struct vmproxy *p, json_t *r, const char *cmd)
{
	unsigned n = 0;
	struct poll_report *rep = vmproxy_query_threads(p, QUERY_TIMEOUT_MS, &n);
	json_t *threads = rep ? report_json_threads(rep, n, true) : NULL, *vms;

	poll_reports_free(rep, n);
	if (!threads)
		return error_reply("a poll thread did not answer within %d ms", QUERY_TIMEOUT_MS);
	if (strcmp(cmd, "status") == 0)
		return json_pack("{s:b, s:o, s:o}", "ok", 1, "daemon", daemon_json(p),
				 "threads", strip_vms(threads));
	if (strcmp(cmd, "threads") == 0)
		return json_pack("{s:b, s:o}", "ok", 1, "threads", strip_vms(threads));
	if (strcmp(cmd, "vm") == 0)
		return one_vm(r, threads);
	vms = list_vms(threads, NULL);
	json_decref(threads);
	if (json_is_true(json_object_get(r, "all")))
		add_idle_vms(p, vms);
	return json_pack("{s:b, s:o}", "ok", 1, "vms", vms);
}

json_t *admin_handle_request(struct vmproxy *p, const char *req, size_t len)
{
	static const struct {
		const char *name;
		json_t *(*fn)(struct vmproxy *p, json_t *r);
	} commands[] = {
		{ "migrate", cmd_migrate },
		{ "drain", cmd_drain },
		{ "balancer", cmd_balancer },
	};
	static const char *const reports[] = { "status", "threads", "vms", "vm" };
	json_error_t jerr;
	json_t *r, *reply = NULL;
	const char *cmd;
	bool found = false;
	char t[80];

	if (len > ADMIN_MAX_REQUEST)
		return error_reply("request larger than %d bytes", ADMIN_MAX_REQUEST);
	r = json_loadb(req, len, JSON_REJECT_DUPLICATES, &jerr);
	if (!r) {
		/* jansson quotes the offending bytes: keep the reply one line */
		return error_reply("bad JSON at column %d: %s", jerr.column,
				   log_sanitize(t, sizeof(t), jerr.text, (unsigned)strlen(jerr.text)));
	}
	cmd = json_string_value(json_object_get(r, "command"));
	if (!json_is_object(r) || !cmd) {
		json_decref(r);
		return error_reply("a request is an object with a string \"command\"");
	}
	for (size_t i = 0; !found && i < sizeof(commands) / sizeof(commands[0]); i++)
		if ((found = strcmp(cmd, commands[i].name) == 0))
			reply = commands[i].fn(p, r);
	for (size_t i = 0; !found && i < sizeof(reports) / sizeof(reports[0]); i++)
		if ((found = strcmp(cmd, reports[i]) == 0))
			reply = cmd_report(p, r, cmd);
	if (!found)
		reply = error_reply("unknown command \"%s\"",
				    log_sanitize(t, sizeof(t), cmd, (unsigned)strlen(cmd)));
	json_decref(r);
	return reply;
}

static bool peer_allowed(struct admin *a, int fd)
{
	struct ucred cr;
	socklen_t len = sizeof(cr);

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) < 0)
		return false;
	if (cr.uid == 0 || cr.uid == geteuid())
		return true;
	if (a->have_gid) {
		struct passwd *pw;
		gid_t groups[256];
		int n = 256;

		if (cr.gid == a->gid)
			return true;
		pw = getpwuid(cr.uid);
		if (pw && getgrouplist(pw->pw_name, pw->pw_gid, groups, &n) >= 0)
			for (int i = 0; i < n; i++)
				if (groups[i] == a->gid)
					return true;
	}
	return false;
}

/* Read until a newline, EOF, the size bound or the deadline. */
static ssize_t read_request(int fd, char *buf, size_t cap)
{
	uint64_t deadline = clock_mono_ms() + ADMIN_IO_TIMEOUT_MS;
	size_t n = 0;

	while (n < cap) {
		struct pollfd pfd = { fd, POLLIN, 0 };
		uint64_t now = clock_mono_ms();
		ssize_t r;

		if (now >= deadline || poll(&pfd, 1, (int)(deadline - now)) <= 0)
			return -ETIMEDOUT;
		r = recv(fd, buf + n, cap - n, MSG_DONTWAIT);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		n += (size_t)r;
		if (memchr(buf + n - (size_t)r, '\n', (size_t)r))
			break;
	}
	return (ssize_t)n;
}

static void write_all(int fd, const char *s, size_t len)
{
	uint64_t deadline = clock_mono_ms() + ADMIN_IO_TIMEOUT_MS;

	while (len > 0) {
		struct pollfd pfd = { fd, POLLOUT, 0 };
		uint64_t now = clock_mono_ms();
		ssize_t r;

		if (now >= deadline || poll(&pfd, 1, (int)(deadline - now)) <= 0)
			return;
		r = send(fd, s, len, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return;
		s += r;
		len -= (size_t)r;
	}
}

static void serve_one(struct admin *a, int fd)
{
	char *buf = malloc(ADMIN_MAX_REQUEST + 2);
	json_t *reply;
	char *text;
	ssize_t n;

	if (!buf)
		return;
	/* The request is read (bounded) even from a peer that is refused, so
	 * that closing with it unread does not reset the connection and lose
	 * the reply. */
	n = read_request(fd, buf, ADMIN_MAX_REQUEST + 1);
	if (!peer_allowed(a, fd)) {
		reply = error_reply("permission denied: root, the daemon's user or the admin "
				    "group only");
	} else {
		if (n == -ETIMEDOUT)
			reply = error_reply("timed out reading the request");
		else if (n > ADMIN_MAX_REQUEST)
			reply = error_reply("request larger than %d bytes", ADMIN_MAX_REQUEST);
		else
			reply = admin_handle_request(a->p, buf, (size_t)(n < 0 ? 0 : n));
	}
	text = json_dumps(reply, JSON_COMPACT);
	json_decref(reply);
	if (text) {
		write_all(fd, text, strlen(text));
		write_all(fd, "\n", 1);
		free(text);
	}
	free(buf);
}

static void *admin_main(void *arg)
{
	struct admin *a = arg;

	pthread_setname_np(pthread_self(), "vmproxy-admin");
	for (;;) {
		struct pollfd pfd[2] = { { a->fd, POLLIN, 0 }, { a->stopfd, POLLIN, 0 } };
		int fd;

		if (poll(pfd, 2, -1) < 0 && errno != EINTR)
			break;
		if (pfd[1].revents)
			break;
		if (!(pfd[0].revents & POLLIN))
			continue;
		fd = accept4(a->fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0)
			continue;
		serve_one(a, fd);
		close(fd);
	}
	return NULL;
}

int admin_start(struct vmproxy *p, const char *path, const char *group, struct admin **out,
		char *err, size_t errlen)
{
	struct admin *a = calloc(1, sizeof(*a));
	struct sockaddr_un sun;
	struct stat st;
	int r;

	if (!a)
		return -ENOMEM;
	a->p = p;
	a->fd = a->stopfd = -1;
	if (group) {
		struct group *gr = getgrnam(group);
		if (!gr) {
			snprintf(err, errlen, "admin.group: no group \"%s\"", group);
			free(a);
			return -ENOENT;
		}
		a->gid = gr->gr_gid;
		a->have_gid = true;
	}
	if (strlen(path) >= sizeof(sun.sun_path)) {
		snprintf(err, errlen, "admin.socket: path too long");
		free(a);
		return -ENAMETOOLONG;
	}
	if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
		unlink(path);
	a->path = strdup(path);
	a->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	a->stopfd = eventfd(0, EFD_CLOEXEC);
	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	strcpy(sun.sun_path, path);
	if (!a->path || a->fd < 0 || a->stopfd < 0 ||
	    bind(a->fd, (struct sockaddr *)&sun, sizeof(sun)) < 0 || listen(a->fd, 16) < 0) {
		r = -errno;
		snprintf(err, errlen, "admin socket \"%s\": %s", path, strerror(errno));
		goto fail;
	}
	if (chmod(path, 0660) < 0 || (a->have_gid && chown(path, (uid_t)-1, a->gid) < 0))
		log_warn("admin socket \"%s\": cannot set its mode or group: %s", path,
			 strerror(errno));
	r = -pthread_create(&a->tid, NULL, admin_main, a);
	if (r < 0) {
		snprintf(err, errlen, "admin thread: %s", strerror(-r));
		goto fail;
	}
	*out = a;
	return 0;
fail:
	if (a->fd >= 0)
		close(a->fd);
	if (a->stopfd >= 0)
		close(a->stopfd);
	free(a->path);
	free(a);
	return r;
}

void admin_stop(struct admin *a)
{
	uint64_t one = 1;

	if (!a)
		return;
	if (write(a->stopfd, &one, sizeof(one)) == sizeof(one))
		pthread_join(a->tid, NULL);
	close(a->fd);
	close(a->stopfd);
	unlink(a->path);
	free(a->path);
	free(a);
}
