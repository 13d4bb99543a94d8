/* preflight.c -- see preflight.h. Each check mirrors what the start does
 * (listener.c, admin.c, metrics.c, vm_identity.c) without creating
 * anything: a socket is bound and closed, never listened on; a socket file
 * is not created, its directory is checked instead. */
#include "preflight.h"

#include <arpa/inet.h>
#include <errno.h>
#include <grp.h>
#include <libgen.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "certfile.h"
#include "conf.h"
#include "metrics.h"
#include "metrics_http.h"
#include "vm_identity.h"

struct pf {
	const struct proxy_config *cfg;
	FILE *out;
	int problems;
};

static void problem(struct pf *pf, const char *key, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void problem(struct pf *pf, const char *key, const char *fmt, ...)
{
	va_list ap;

	fprintf(pf->out, "%s: %s: ", pf->cfg->file, key);
	va_start(ap, fmt);
	vfprintf(pf->out, fmt, ap);
	va_end(ap);
	fputc('\n', pf->out);
	pf->problems++;
}

/* Bind SA to a new socket and close it: 0 or -errno. */
static int bind_probe(const struct sockaddr *sa, socklen_t len)
{
	int one = 1, fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0), r = 0;

	if (fd < 0)
		return -errno;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, sa, len) < 0)
		r = -errno;
	close(fd);
	return r;
}

static void report_bind(struct pf *pf, const char *key, const char *what, int r)
{
	if (r == 0)
		return;
	if (r == -EADDRINUSE)
		fprintf(pf->out, "warning: %s: %s: %s is in use now; a start succeeds only once "
			"whoever holds it (a running vmproxyd?) has let it go\n", pf->cfg->file, key,
			what);
	else if (r == -EADDRNOTAVAIL)
		problem(pf, key, "%s: the address is not on this host", what);
	else
		problem(pf, key, "%s: %s", what, strerror(-r));
}

/* The directory of a socket file PATH must let us create it (with
 * MAKES_DIRS, missing directories are created at start: the nearest one
 * that exists must let us create them); an existing PATH must be a socket
 * (a dead one is replaced at start). */
static void check_socket_path(struct pf *pf, const char *key, const char *path,
			      bool makes_dirs)
{
	char *copy = strdup(path), *dir;
	struct stat st;

	if (!copy)
		return;
	dir = dirname(copy);
	while (makes_dirs && strcmp(dir, "/") != 0 && strcmp(dir, ".") != 0 &&
	       lstat(dir, &st) < 0 && errno == ENOENT)
		dir = dirname(dir);
	if (strlen(path) > 107)
		problem(pf, key, "\"%s\" is longer than 107 bytes", path);
	else if (lstat(path, &st) == 0 && !S_ISSOCK(st.st_mode))
		problem(pf, key, "\"%s\" exists and is not a socket", path);
	else if (access(dir, W_OK | X_OK) < 0)
		problem(pf, key, "cannot create a socket in \"%s\": %s", dir, strerror(errno));
	free(copy);
}

static void check_listeners(struct pf *pf)
{
	for (size_t i = 0; i < pf->cfg->n_listeners; i++) {
		const struct listener_config *l = &pf->cfg->listeners[i];
		char key[64], what[96];

		conf_path_index(key, sizeof(key), "listeners", i);
		switch (l->type) {
		case LISTENER_TCP: {
			struct sockaddr_in6 s6 = { .sin6_family = AF_INET6 };
			struct sockaddr_in s4 = { .sin_family = AF_INET };

			snprintf(what, sizeof(what), "tcp %s:%u", l->address, l->port);
			if (inet_pton(AF_INET, l->address, &s4.sin_addr) == 1) {
				s4.sin_port = htons((uint16_t)l->port);
				report_bind(pf, key, what,
					    bind_probe((struct sockaddr *)&s4, sizeof(s4)));
			} else if (inet_pton(AF_INET6, l->address, &s6.sin6_addr) == 1) {
				s6.sin6_port = htons((uint16_t)l->port);
				report_bind(pf, key, what,
					    bind_probe((struct sockaddr *)&s6, sizeof(s6)));
			}
			break;
		}
		case LISTENER_VSOCK: {
			struct sockaddr_vm svm = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
						   .svm_port = l->port };

			snprintf(what, sizeof(what), "vsock port %u", l->port);
			report_bind(pf, key, what, bind_probe((struct sockaddr *)&svm, sizeof(svm)));
			break;
		}
		case LISTENER_UNIX: {
			char kp[80];

			check_socket_path(pf, conf_path(kp, sizeof(kp), key, "path"), l->path, true);
			break;
		}
		case LISTENER_FIRECRACKER: {
			char kp[80];

			check_socket_path(pf, conf_path(kp, sizeof(kp), key, "uds_path"), l->path,
					  true);
			break;
		}
		}
	}
}

static void check_endpoints(struct pf *pf)
{
	const struct proxy_config *cfg = pf->cfg;
	struct metrics_config mc;
	struct conf_ctx cc;

	conf_ctx_init(&cc, cfg->file);
	if (metrics_config_parse(&cc, cfg->metrics_raw, &mc) == 0 && mc.listen[0]) {
		struct sockaddr_in sa;

		if (metrics_http_parse_listen(mc.listen, &sa) == 0)
			report_bind(pf, "metrics.listen", mc.listen,
				    bind_probe((struct sockaddr *)&sa, sizeof(sa)));
	}
	if (cfg->admin.socket)
		check_socket_path(pf, "admin.socket", cfg->admin.socket, false);
	if (cfg->admin.group && !getgrnam(cfg->admin.group))
		problem(pf, "admin.group", "no group \"%s\"", cfg->admin.group);
}

static void check_identity(struct pf *pf)
{
	struct vm_identity *id = NULL;
	char err[512];

	/* The same constructor as the start: the libvirt connection (read-only
	 * unless configured otherwise) and every static entry's domain. */
	if (vm_identity_new(pf->cfg, &id, err, sizeof(err)) < 0) {
		/* Its messages name the key already ("identity.static[2].vm: ..."). */
		fprintf(pf->out, "%s: %s\n", pf->cfg->file, err);
		pf->problems++;
	}
	vm_identity_free(id);
}

static void check_log_file(struct pf *pf, const char *log_file)
{
	char *copy;

	if (!log_file)
		return;
	if (access(log_file, F_OK) == 0) {
		if (access(log_file, W_OK) < 0)
			problem(pf, "--log-file", "\"%s\": %s", log_file, strerror(errno));
		return;
	}
	copy = strdup(log_file);
	if (copy && access(dirname(copy), W_OK | X_OK) < 0)
		problem(pf, "--log-file", "cannot create \"%s\": %s", log_file, strerror(errno));
	free(copy);
}

/* A CPU outside the affinity mask is not fatal (the thread runs unpinned)
 * but is worth saying before the start says it. */
static void check_cpus(struct pf *pf)
{
	cpu_set_t set;

	if (!pf->cfg->threads.cpus || sched_getaffinity(0, sizeof(set), &set) < 0)
		return;
	for (size_t i = 0; i < pf->cfg->threads.n_cpus; i++)
		if (!CPU_ISSET(pf->cfg->threads.cpus[i], &set))
			fprintf(pf->out, "warning: %s: threads.cpus[%zu]: CPU %d is not in this "
				"process's affinity mask; its thread would run unpinned\n",
				pf->cfg->file, i, pf->cfg->threads.cpus[i]);
}

int preflight_tls(const struct proxy_config *cfg, char *err, size_t errlen)
{
	char msg[512];
	int r;

	if (!cfg->upstream.tls)
		return 0;
	r = certfile_check("upstream.tls", cfg->upstream.ca, cfg->upstream.cert,
			   cfg->upstream.key, msg, sizeof(msg));
	if (r < 0)
		snprintf(err, errlen, "%s: %s", cfg->file, msg);
	return r;
}

int preflight_run(const struct proxy_config *cfg, const char *log_file, FILE *out)
{
	struct pf pf = { .cfg = cfg, .out = out };
	char err[600];

	if (preflight_tls(cfg, err, sizeof(err)) < 0) {
		fprintf(out, "%s\n", err);
		pf.problems++;
	}
	check_identity(&pf);
	check_listeners(&pf);
	check_endpoints(&pf);
	check_log_file(&pf, log_file);
	check_cpus(&pf);
	return pf.problems;
}
