/* spool.c -- see spool.h. Writes go to a temporary name, are fsynced and
 * renamed, and the directory is fsynced, so a crash leaves either the whole
 * sample or nothing. */
#include "spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"

#define NAME_LEN 64

struct spool_entry {
	char name[NAME_LEN];
	uint64_t size;
};

struct spool {
	char *dir;
	int dirfd;
	uint64_t max_bytes, used, dropped;
	struct spool_entry *e; /* sorted by name, oldest first */
	size_t n, cap;
};

static int cmp_entry(const void *a, const void *b)
{
	return strcmp(((const struct spool_entry *)a)->name, ((const struct spool_entry *)b)->name);
}

static int write_file(int dirfd, const char *name, const void *data, size_t len)
{
	char tmp[NAME_LEN + 8];
	int fd, r = 0;

	snprintf(tmp, sizeof(tmp), ".%s.tmp", name);
	fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	if (write(fd, data, len) != (ssize_t)len || fsync(fd) < 0)
		r = errno ? -errno : -EIO;
	close(fd);
	if (r == 0 && renameat(dirfd, tmp, dirfd, name) < 0)
		r = -errno;
	if (r < 0)
		unlinkat(dirfd, tmp, 0);
	else
		fsync(dirfd);
	return r;
}

int spool_open(const char *dir, uint64_t max_bytes, struct spool **out)
{
	struct spool *sp = calloc(1, sizeof(*sp));
	struct dirent *de;
	DIR *d;
	int r;

	if (!sp)
		return -ENOMEM;
	if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
		r = -errno;
		free(sp);
		return r;
	}
	sp->dir = strdup(dir);
	sp->max_bytes = max_bytes;
	sp->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (sp->dirfd < 0 || !sp->dir) {
		r = sp->dirfd < 0 ? -errno : -ENOMEM;
		spool_close(sp);
		return r;
	}
	d = fdopendir(dup(sp->dirfd));
	while (d && (de = readdir(d))) {
		struct stat st;
		size_t l = strlen(de->d_name);

		if (l < 6 || l >= NAME_LEN || strcmp(de->d_name + l - 5, ".json") != 0 ||
		    de->d_name[0] == '.')
			continue;
		if (fstatat(sp->dirfd, de->d_name, &st, 0) < 0 || !S_ISREG(st.st_mode))
			continue;
		if (sp->n == sp->cap) {
			size_t cap = sp->cap ? sp->cap * 2 : 64;
			struct spool_entry *e;
			if (cap > SPOOL_MAX_FILES)
				break;
			e = realloc(sp->e, cap * sizeof(*e));
			if (!e)
				break;
			sp->e = e;
			sp->cap = cap;
		}
		memcpy(sp->e[sp->n].name, de->d_name, l + 1); /* l < NAME_LEN */
		sp->e[sp->n].size = (uint64_t)st.st_size;
		sp->used += (uint64_t)st.st_size;
		sp->n++;
	}
	if (d)
		closedir(d);
	if (sp->n)
		qsort(sp->e, sp->n, sizeof(sp->e[0]), cmp_entry);
	*out = sp;
	return 0;
}

void spool_close(struct spool *sp)
{
	if (!sp)
		return;
	if (sp->dirfd >= 0)
		close(sp->dirfd);
	free(sp->e);
	free(sp->dir);
	free(sp);
}

static void drop_oldest(struct spool *sp)
{
	unlinkat(sp->dirfd, sp->e[0].name, 0);
	sp->used -= sp->e[0].size;
	memmove(sp->e, sp->e + 1, (sp->n - 1) * sizeof(sp->e[0]));
	sp->n--;
	sp->dropped++;
}

int spool_put(struct spool *sp, uint64_t time_ms, uint64_t seq, const void *data, size_t len)
{
	char name[NAME_LEN];
	unsigned dropped = 0;
	int r;

	if (len > sp->max_bytes)
		return -EFBIG;
	while (sp->n && (sp->used + len > sp->max_bytes || sp->n >= SPOOL_MAX_FILES)) {
		drop_oldest(sp);
		dropped++;
	}
	if (dropped)
		log_warn("spool \"%s\" full (%" PRIu64 " bytes max): dropped the %u oldest samples "
			 "(%" PRIu64 " dropped in all)", sp->dir, sp->max_bytes, dropped, sp->dropped);
	if (sp->n == sp->cap) {
		size_t cap = sp->cap ? sp->cap * 2 : 64;
		struct spool_entry *e = realloc(sp->e, cap * sizeof(*e));
		if (!e)
			return -ENOMEM;
		sp->e = e;
		sp->cap = cap;
	}
	snprintf(name, sizeof(name), "%016" PRIu64 "-%012" PRIu64 ".json", time_ms, seq);
	r = write_file(sp->dirfd, name, data, len);
	if (r < 0)
		return r;
	/* Names sort by time: a new sample goes last unless the clock stepped back. */
	snprintf(sp->e[sp->n].name, NAME_LEN, "%s", name);
	sp->e[sp->n].size = len;
	sp->n++;
	sp->used += len;
	if (sp->n > 1 && strcmp(sp->e[sp->n - 2].name, name) > 0)
		qsort(sp->e, sp->n, sizeof(sp->e[0]), cmp_entry);
	return 0;
}

int spool_peek(struct spool *sp, char **data, size_t *len, char *name, size_t namelen)
{
	while (sp->n) {
		int fd = openat(sp->dirfd, sp->e[0].name, O_RDONLY | O_CLOEXEC);
		struct stat st;
		char *buf = NULL;

		if (fd >= 0 && fstat(fd, &st) == 0 && st.st_size > 0 &&
		    (uint64_t)st.st_size <= sp->max_bytes && (buf = malloc((size_t)st.st_size + 1)) &&
		    read(fd, buf, (size_t)st.st_size) == st.st_size) {
			close(fd);
			buf[st.st_size] = '\0';
			*data = buf;
			*len = (size_t)st.st_size;
			snprintf(name, namelen, "%s", sp->e[0].name);
			return 0;
		}
		free(buf);
		if (fd >= 0)
			close(fd);
		log_warn("spool \"%s\": unreadable sample \"%s\" removed", sp->dir, sp->e[0].name);
		drop_oldest(sp);
	}
	return -ENOENT;
}

int spool_remove(struct spool *sp, const char *name)
{
	for (size_t i = 0; i < sp->n; i++) {
		if (strcmp(sp->e[i].name, name) != 0)
			continue;
		if (unlinkat(sp->dirfd, name, 0) < 0 && errno != ENOENT)
			return -errno;
		sp->used -= sp->e[i].size;
		memmove(sp->e + i, sp->e + i + 1, (sp->n - i - 1) * sizeof(sp->e[0]));
		sp->n--;
		return 0;
	}
	return -ENOENT;
}

size_t spool_count(const struct spool *sp)
{
	return sp->n;
}

uint64_t spool_bytes(const struct spool *sp)
{
	return sp->used;
}

uint64_t spool_dropped(const struct spool *sp)
{
	return sp->dropped;
}

int spool_save_seq(struct spool *sp, const char *boot_id, uint64_t seq)
{
	char buf[128];
	int n = snprintf(buf, sizeof(buf), "%s %" PRIu64 "\n", boot_id, seq);

	return write_file(sp->dirfd, "state", buf, (size_t)n);
}

/* SEQ, or the seq of the newest spooled sample when that is later and the
 * sample is of boot BOOT_ID (its document names the boot). */
static uint64_t newest_seq(struct spool *sp, const char *boot_id, uint64_t seq)
{
	char buf[4096], want[80];
	const char *dash;
	uint64_t s;
	ssize_t n;
	int fd;

	if (sp->n == 0)
		return seq;
	dash = strrchr(sp->e[sp->n - 1].name, '-');
	if (!dash || sscanf(dash + 1, "%" SCNu64, &s) != 1 || s <= seq)
		return seq;
	fd = openat(sp->dirfd, sp->e[sp->n - 1].name, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return seq;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return seq;
	buf[n] = '\0';
	snprintf(want, sizeof(want), "\"boot_id\":\"%s\"", boot_id);
	return strstr(buf, want) ? s : seq;
}

uint64_t spool_load_seq(struct spool *sp, const char *boot_id)
{
	char buf[128], boot[64];
	uint64_t seq = 0;
	int fd = openat(sp->dirfd, "state", O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	if (sscanf(buf, "%63s %" SCNu64, boot, &seq) != 2 || strcmp(boot, boot_id) != 0)
		seq = 0; /* another boot: seq starts again */
	return newest_seq(sp, boot_id, seq);
}
