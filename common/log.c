/* log.c -- see log.h */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *log_ident = "vmproxy";
/* Read by every thread; a reload (SIGHUP) changes it while they run. */
static _Atomic int log_min = LOG_LEVEL_INFO;
static bool log_journal;

static bool stderr_is_journal(void)
{
	const char *e = getenv("JOURNAL_STREAM");
	unsigned long dev, ino;
	struct stat st;

	if (!e || sscanf(e, "%lu:%lu", &dev, &ino) != 2)
		return false;
	if (fstat(STDERR_FILENO, &st) < 0)
		return false;
	return st.st_dev == (dev_t)dev && st.st_ino == (ino_t)ino;
}

void log_init(const char *ident, enum log_level min_level)
{
	if (ident)
		log_ident = ident;
	atomic_store(&log_min, (int)min_level);
	log_journal = stderr_is_journal();
}

int log_level_parse(const char *s, enum log_level *out)
{
	static const struct {
		const char *name;
		enum log_level level;
	} names[] = {
		{ "error", LOG_LEVEL_ERROR },
		{ "warn", LOG_LEVEL_WARN },
		{ "info", LOG_LEVEL_INFO },
		{ "debug", LOG_LEVEL_DEBUG },
	};

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		if (strcmp(s, names[i].name) == 0) {
			*out = names[i].level;
			return 0;
		}
	}
	return -EINVAL;
}

void log_set_level(enum log_level min_level)
{
	atomic_store(&log_min, (int)min_level);
}

bool log_enabled(enum log_level level)
{
	return (int)level <= atomic_load(&log_min);
}

int log_reopen(const char *path)
{
	int fd;

	if (!path)
		return 0;
	fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	if (fd < 0)
		return -errno;
	if (dup2(fd, STDERR_FILENO) < 0) {
		int e = errno;
		close(fd);
		return -e;
	}
	close(fd);
	log_journal = false;
	return 0;
}

static const char *level_name(enum log_level level)
{
	switch (level) {
	case LOG_LEVEL_ERROR:
		return "error";
	case LOG_LEVEL_WARN:
		return "warn";
	case LOG_LEVEL_INFO:
		return "info";
	case LOG_LEVEL_DEBUG:
		return "debug";
	}
	return "?";
}

void log_msg(enum log_level level, const char *fmt, ...)
{
	char line[1024];
	int n = 0, m;
	va_list ap;

	if (!log_enabled(level))
		return;
	if (log_journal) {
		n = snprintf(line, sizeof(line), "<%d>", (int)level);
	} else {
		struct timespec ts;
		struct tm tm;

		clock_gettime(CLOCK_REALTIME, &ts);
		gmtime_r(&ts.tv_sec, &tm);
		n = snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s[%d] %s: ",
			     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
			     tm.tm_sec, ts.tv_nsec / 1000000, log_ident, (int)getpid(),
			     level_name(level));
	}
	va_start(ap, fmt);
	m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (m < 0)
		m = 0;
	n += m;
	if (n > (int)sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	/* A short write to stderr is not worth retrying from a hot path. */
	if (write(STDERR_FILENO, line, (size_t)n) < 0)
		return;
}

const char *log_escape(char *buf, unsigned len, const char *str)
{
	unsigned o = 0;

	if (len == 0)
		return buf;
	for (const unsigned char *p = (const unsigned char *)str; *p && o + 1 < len; p++)
		buf[o++] = (*p >= 0x20 && *p < 0x7f) ? (char)*p : '?';
	buf[o] = '\0';
	return buf;
}

const char *log_sanitize(char *buf, unsigned len, const void *data, unsigned data_len)
{
	const unsigned char *p = data;
	unsigned max = len > 4 ? len - 4 : 0; /* room for "..." and the NUL */
	unsigned i, o = 0;

	if (len == 0)
		return buf;
	for (i = 0; i < data_len && o < max; i++)
		buf[o++] = (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '"') ? (char)p[i] : '?';
	if (i < data_len && o + 3 < len) {
		memcpy(buf + o, "...", 3);
		o += 3;
	}
	buf[o] = '\0';
	return buf;
}
