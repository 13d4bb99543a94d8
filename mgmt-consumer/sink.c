/* sink.c -- see sink.h */
#include "sink.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct sink {
	char *dir, *prefix;
	uint64_t max_bytes;
	time_t (*now)(time_t *);
	int fd, dirfd;
	char day[16];
	unsigned index;
	uint64_t size;
	char path[512];
	char *buf;
	size_t len, cap;
};

static void today(struct sink *s, char *out)
{
	time_t t = s->now(NULL);
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(out, 16, "%Y-%m-%d", &tm);
}

/* Open the newest file of DAY, or the next index when it is full. */
static int open_current(struct sink *s)
{
	struct stat st;

	for (;;) {
		snprintf(s->path, sizeof(s->path), "%s/%s-%s.%04u.jsonl", s->dir, s->prefix, s->day,
			 s->index);
		if (stat(s->path, &st) == 0 && (uint64_t)st.st_size >= s->max_bytes) {
			s->index++;
			continue;
		}
		break;
	}
	s->fd = open(s->path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	if (s->fd < 0)
		return -errno;
	s->size = fstat(s->fd, &st) == 0 ? (uint64_t)st.st_size : 0;
	return 0;
}

int sink_open(const char *dir, const char *prefix, uint64_t max_bytes, time_t (*now)(time_t *),
	      struct sink **out)
{
	struct sink *s = calloc(1, sizeof(*s));
	int r;

	if (!s)
		return -ENOMEM;
	if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
		r = -errno;
		free(s);
		return r;
	}
	s->dir = strdup(dir);
	s->prefix = strdup(prefix);
	s->max_bytes = max_bytes;
	s->now = now ? now : time;
	s->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	s->fd = -1;
	today(s, s->day);
	r = open_current(s);
	if (r < 0) {
		sink_close(s);
		return r;
	}
	*out = s;
	return 0;
}

void sink_close(struct sink *s)
{
	if (!s)
		return;
	if (s->fd >= 0)
		close(s->fd);
	if (s->dirfd >= 0)
		close(s->dirfd);
	free(s->buf);
	free(s->dir);
	free(s->prefix);
	free(s);
}

int sink_append(struct sink *s, const char *line, size_t len)
{
	if (s->len + len + 1 > s->cap) {
		size_t cap = s->cap ? s->cap : 65536;
		char *b;

		while (cap < s->len + len + 1)
			cap *= 2;
		b = realloc(s->buf, cap);
		if (!b)
			return -ENOMEM;
		s->buf = b;
		s->cap = cap;
	}
	memcpy(s->buf + s->len, line, len);
	s->len += len;
	s->buf[s->len++] = '\n';
	return 0;
}

void sink_discard(struct sink *s)
{
	s->len = 0;
}

int sink_sync(struct sink *s)
{
	char day[16];
	size_t off = 0;

	if (s->len == 0)
		return 0;
	today(s, day);
	if (strcmp(day, s->day) != 0 || s->size >= s->max_bytes) {
		int r;

		close(s->fd);
		if (strcmp(day, s->day) != 0) {
			memcpy(s->day, day, sizeof(day));
			s->index = 0;
		} else {
			s->index++;
		}
		r = open_current(s);
		if (r < 0)
			return r;
		fsync(s->dirfd); /* the new file's name is durable too */
	}
	while (off < s->len) {
		ssize_t n = write(s->fd, s->buf + off, s->len - off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		off += (size_t)n;
	}
	if (fsync(s->fd) < 0)
		return -errno;
	s->size += s->len;
	s->len = 0;
	return 0;
}

const char *sink_current(const struct sink *s)
{
	return s->path;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

int sink_replay_tail(const char *dir, const char *prefix, size_t max,
		     void (*fn)(void *ud, const char *line, size_t len), void *ud)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	char **names = NULL;
	size_t n = 0, cap = 0, plen = strlen(prefix), done = 0;

	if (!d)
		return errno == ENOENT ? 0 : -errno;
	while ((de = readdir(d))) {
		size_t l = strlen(de->d_name);
		if (strncmp(de->d_name, prefix, plen) != 0 || de->d_name[plen] != '-' || l < 7 ||
		    strcmp(de->d_name + l - 6, ".jsonl") != 0)
			continue;
		if (n == cap) {
			char **nn = realloc(names, (cap = cap ? cap * 2 : 16) * sizeof(char *));
			if (!nn)
				break;
			names = nn;
		}
		names[n++] = strdup(de->d_name);
	}
	closedir(d);
	qsort(names, n, sizeof(char *), cmp_str);
	/* Newest files first until MAX lines are covered, then replay oldest first. */
	{
		size_t first = n, lines = 0;
		while (first > 0 && lines < max) {
			char p[512], *line = NULL;
			size_t lcap = 0;
			FILE *f;

			first--;
			snprintf(p, sizeof(p), "%s/%s", dir, names[first]);
			f = fopen(p, "re");
			while (f && getline(&line, &lcap, f) > 0)
				lines++;
			free(line);
			if (f)
				fclose(f);
		}
		for (size_t i = first; i < n; i++) {
			char p[512], *line = NULL;
			size_t lcap = 0;
			ssize_t len;
			FILE *f;

			snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
			f = fopen(p, "re");
			while (f && (len = getline(&line, &lcap, f)) > 0) {
				if (line[len - 1] != '\n')
					break; /* a torn last line: never acked, redelivered */
				fn(ud, line, (size_t)len - 1);
				done++;
			}
			free(line);
			if (f)
				fclose(f);
		}
	}
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
	return (int)done;
}
