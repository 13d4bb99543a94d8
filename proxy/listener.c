/* listener.c -- see listener.h */
#include "listener.h"

#include <arpa/inet.h>
#include <errno.h>
#include <grp.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define BACKLOG 1024

/* The failure path of every open_*(): ERR names the endpoint and the
 * error of the call that failed (errno, saved before anything else runs),
 * FD is closed if it was opened. */
static int open_failed(const struct listener *l, int fd, char *err, size_t errlen)
{
	int e = errno;

	snprintf(err, errlen, "%s: %s", l->name, strerror(e));
	if (fd >= 0)
		close(fd);
	return -e;
}

static int open_tcp(const struct listener_config *lc, struct listener *l, char *err, size_t errlen)
{
	const char *addr = lc->address ? lc->address : "0.0.0.0";
	struct sockaddr_storage ss;
	socklen_t len;
	int one = 1, fd;

	memset(&ss, 0, sizeof(ss));
	if (inet_pton(AF_INET, addr, &((struct sockaddr_in *)&ss)->sin_addr) == 1) {
		struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
		sin->sin_family = AF_INET;
		sin->sin_port = htons((uint16_t)lc->port);
		len = sizeof(*sin);
	} else if (inet_pton(AF_INET6, addr, &((struct sockaddr_in6 *)&ss)->sin6_addr) == 1) {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons((uint16_t)lc->port);
		len = sizeof(*sin6);
	} else {
		snprintf(err, errlen, "tcp listener: \"%s\" is not a numeric address", addr);
		return -EINVAL;
	}
	snprintf(l->name, sizeof(l->name), "tcp %s:%u", addr, lc->port);
	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&ss, len) < 0 || listen(fd, BACKLOG) < 0)
		goto fail;
	l->fd = fd;
	return 0;
fail:
	return open_failed(l, fd, err, errlen);
}

static int open_vsock(const struct listener_config *lc, struct listener *l, char *err,
		      size_t errlen)
{
	struct sockaddr_vm svm;
	int fd;

	snprintf(l->name, sizeof(l->name), "vsock port %u", lc->port);
	fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	memset(&svm, 0, sizeof(svm));
	svm.svm_family = AF_VSOCK;
	svm.svm_cid = VMADDR_CID_ANY;
	svm.svm_port = lc->port;
	if (bind(fd, (struct sockaddr *)&svm, sizeof(svm)) < 0 || listen(fd, BACKLOG) < 0)
		goto fail;
	l->fd = fd;
	return 0;
fail:
	return open_failed(l, fd, err, errlen);
}

/* Is something listening on the Unix socket PATH? A non-blocking connect
 * tells without waiting: refused means a dead socket file; accepted or a
 * full backlog means a live one; anything else is not known to be dead. */
static bool socket_dead(const char *path)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), r, e;

	if (fd < 0)
		return false;
	strcpy(sun.sun_path, path);
	r = connect(fd, (struct sockaddr *)&sun, sizeof(sun));
	e = errno;
	close(fd);
	return r < 0 && e == ECONNREFUSED;
}

/* Create the missing directories above PATH with MODE and group GID. */
static int make_dirs(const char *path, mode_t mode, gid_t gid, char *err, size_t errlen,
		     const char *name)
{
	char dir[sizeof(((struct sockaddr_un *)0)->sun_path)];
	char *slash;

	snprintf(dir, sizeof(dir), "%s", path);
	slash = strrchr(dir, '/');
	if (!slash || slash == dir)
		return 0;
	*slash = '\0';
	for (char *p = dir + 1;; p++) {
		bool last = *p == '\0';
		struct stat st;

		if (*p != '/' && !last)
			continue;
		*p = '\0';
		if (stat(dir, &st) < 0) {
			if (errno != ENOENT || mkdir(dir, mode) < 0 || chmod(dir, mode) < 0 ||
			    (gid != (gid_t)-1 && chown(dir, (uid_t)-1, gid) < 0)) {
				int e = errno;
				snprintf(err, errlen, "%s: cannot create directory %s: %s", name,
					 dir, strerror(e));
				return -e;
			}
		} else if (!S_ISDIR(st.st_mode)) {
			snprintf(err, errlen, "%s: %s is not a directory", name, dir);
			return -ENOTDIR;
		}
		if (last)
			break;
		*p = '/';
	}
	return 0;
}

static int open_unix(const struct listener_config *lc, struct listener *l, char *err,
		     size_t errlen)
{
	struct sockaddr_un sun;
	struct stat st;
	gid_t gid = (gid_t)-1;
	int fd, e, r;

	if (lc->type == LISTENER_FIRECRACKER)
		snprintf(l->name, sizeof(l->name), "firecracker %s", lc->path);
	else
		snprintf(l->name, sizeof(l->name), "unix %s", lc->path);
	if (strlen(lc->path) >= sizeof(sun.sun_path)) {
		snprintf(err, errlen, "%s: path longer than %zu bytes", l->name,
			 sizeof(sun.sun_path) - 1);
		return -ENAMETOOLONG;
	}
	/* Whoever may connect is the VM: the mode and group say who that is,
	 * independently of the umask. */
	if (lc->group) {
		struct group *gr = getgrnam(lc->group);

		if (!gr) {
			snprintf(err, errlen, "%s: no group \"%s\"", l->name, lc->group);
			return -ENOENT;
		}
		gid = gr->gr_gid;
	}
	r = make_dirs(lc->path, (mode_t)(lc->mode | ((lc->mode & 0444) >> 2)), gid, err, errlen,
		      l->name);
	if (r < 0)
		return r;
	/* A dead socket from a previous run is replaced. A live one (another
	 * vmproxyd, or Firecracker's own uds_path) and anything that is not
	 * a socket are not. */
	if (lstat(lc->path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode)) {
			snprintf(err, errlen, "%s: exists and is not a socket", l->name);
			return -EEXIST;
		}
		if (!socket_dead(lc->path)) {
			snprintf(err, errlen, "%s: a process is listening on this socket; not "
				 "replacing it", l->name);
			return -EADDRINUSE;
		}
		unlink(lc->path);
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	strcpy(sun.sun_path, lc->path);
	if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0)
		goto fail;
	if (lstat(lc->path, &st) == 0) {
		l->sock_dev = st.st_dev;
		l->sock_ino = st.st_ino;
	}
	if (chmod(lc->path, lc->mode) < 0 ||
	    (gid != (gid_t)-1 && chown(lc->path, (uid_t)-1, gid) < 0)) {
		e = errno;
		snprintf(err, errlen, "%s: cannot set mode %04o%s%s: %s", l->name, lc->mode,
			 lc->group ? " and group " : "", lc->group ? lc->group : "", strerror(e));
		close(fd);
		unlink(lc->path);
		return -e;
	}
	if (listen(fd, BACKLOG) < 0)
		goto fail;
	l->fd = fd;
	return 0;
fail:
	return open_failed(l, fd, err, errlen);
}

int listener_open(const struct listener_config *lc, struct listener *out, char *err,
		  size_t errlen)
{
	memset(out, 0, sizeof(*out));
	out->cfg = lc;
	out->fd = -1;
	switch (lc->type) {
	case LISTENER_TCP:
		return open_tcp(lc, out, err, errlen);
	case LISTENER_VSOCK:
		return open_vsock(lc, out, err, errlen);
	case LISTENER_UNIX:
	case LISTENER_FIRECRACKER:
		return open_unix(lc, out, err, errlen);
	}
	return -EINVAL;
}

int listener_accept(struct listener *l, int *fd, struct sockaddr_storage *peer, socklen_t *len)
{
	int one = 1, r;

	*len = sizeof(*peer);
	r = accept4(l->fd, (struct sockaddr *)peer, len, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (r < 0)
		return errno == EWOULDBLOCK ? -EAGAIN : -errno;
	if (l->cfg->type == LISTENER_TCP)
		setsockopt(r, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	*fd = r;
	return 0;
}

void listener_close(struct listener *l)
{
	if (l->fd < 0)
		return;
	close(l->fd);
	l->fd = -1;
	if (l->cfg && (l->cfg->type == LISTENER_UNIX || l->cfg->type == LISTENER_FIRECRACKER)) {
		struct stat st;

		/* Only our own socket: the path may have been taken over since. */
		if (lstat(l->cfg->path, &st) == 0 && st.st_dev == l->sock_dev &&
		    st.st_ino == l->sock_ino)
			unlink(l->cfg->path);
	}
}

const char *listener_peer_str(const struct sockaddr_storage *sa, socklen_t len, char *buf,
			      size_t buflen)
{
	char a[INET6_ADDRSTRLEN];

	switch (sa->ss_family) {
	case AF_INET: {
		const struct sockaddr_in *s = (const struct sockaddr_in *)sa;
		inet_ntop(AF_INET, &s->sin_addr, a, sizeof(a));
		snprintf(buf, buflen, "%s:%u", a, ntohs(s->sin_port));
		break;
	}
	case AF_INET6: {
		const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)sa;
		inet_ntop(AF_INET6, &s->sin6_addr, a, sizeof(a));
		snprintf(buf, buflen, "[%s]:%u", a, ntohs(s->sin6_port));
		break;
	}
	case AF_VSOCK: {
		const struct sockaddr_vm *s = (const struct sockaddr_vm *)sa;
		snprintf(buf, buflen, "vsock cid %u port %u", s->svm_cid, s->svm_port);
		break;
	}
	default:
		snprintf(buf, buflen, "unix");
		break;
	}
	(void)len;
	return buf;
}
