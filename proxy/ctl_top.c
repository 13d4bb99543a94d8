/* ctl_top.c -- see ctl_top.h */
#include "ctl_top.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define TOP_DEFAULT_VMS 10 /* VM lines when the output is not a terminal */
#define TOP_LINE_MAX	512

static long long num(json_t *o, const char *k)
{
	return (long long)json_integer_value(json_object_get(o, k));
}

static double real(json_t *o, const char *k)
{
	return json_number_value(json_object_get(o, k));
}

static const char *str(json_t *o, const char *k)
{
	const char *s = json_string_value(json_object_get(o, k));

	return s ? s : "";
}

/* Where a frame goes: at most ROWS lines (0: no limit) of at most COLS
 * columns (0: no limit). The frame must never wrap or pass the bottom of
 * the screen: either scrolls the screen. */
struct sink {
	FILE *out;
	int cols, rows, lines;
};

__attribute__((format(printf, 2, 3))) static void line(struct sink *o, const char *fmt, ...)
{
	char buf[TOP_LINE_MAX];
	va_list ap;
	int n;

	if (o->rows > 0 && o->lines >= o->rows)
		return;
	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n >= (int)sizeof(buf))
		n = (int)sizeof(buf) - 1;
	if (o->cols > 0 && n > o->cols)
		n = o->cols;
	fwrite(buf, 1, (size_t)n, o->out);
	fputc('\n', o->out);
	o->lines++;
}

/* "12.3", or "-" without a previous poll to compare with. */
static const char *rate(char *buf, size_t len, bool known, double v)
{
	if (!known)
		snprintf(buf, len, "-");
	else
		snprintf(buf, len, "%.1f", v < 0 ? 0 : v);
	return buf;
}

static json_t *prev_thread(struct ctl_top *t, long long idx)
{
	size_t i;
	json_t *p;

	json_array_foreach(t->prev_threads, i, p)
		if (num(p, "thread") == idx)
			return p;
	return NULL;
}

struct vm_row {
	json_t *vm;
	bool known;
	double rate;
};

static int vm_row_cmp(const void *a, const void *b)
{
	const struct vm_row *x = a, *y = b;

	if (x->known != y->known)
		return x->known ? -1 : 1;
	if (x->rate != y->rate)
		return x->rate > y->rate ? -1 : 1;
	if (num(x->vm, "messages_in") != num(y->vm, "messages_in"))
		return num(x->vm, "messages_in") > num(y->vm, "messages_in") ? -1 : 1;
	return strcmp(str(x->vm, "name"), str(y->vm, "name"));
}

void ctl_top_render(struct ctl_top *t, json_t *status, json_t *vms, double now, int cols,
		    int rows, FILE *out)
{
	json_t *d = json_object_get(status, "daemon"), *threads = json_object_get(status, "threads");
	json_t *list = json_object_get(vms, "vms"), *seen = json_object(), *th, *v;
	double dt = t->prev_at > 0 ? now - t->prev_at : 0;
	size_t i, nvm = json_array_size(list), shown = 0, room;
	struct vm_row *vr = calloc(nvm ? nvm : 1, sizeof(*vr));
	struct sink o = { out, cols, rows, 0 };
	char a[32], b[32], c[32];
	int used;

	line(&o,
	     "vmproxyd: %zu threads, %lld connections, %zu VMs, %lld held messages, "
	     "accepted %lld, refused %lld unknown peer / %lld limits%s",
	     json_array_size(threads), num(d, "connections"), nvm, num(d, "held_messages"),
	     num(d, "accepted"), num(d, "refused_unknown_peer"), num(d, "refused_limit"),
	     json_is_true(json_object_get(d, "draining")) ? ", DRAINING" : "");
	line(&o, "%s", "");
	line(&o, "%-6s %-4s %-6s %-6s %-5s %-10s %-10s %-5s %-8s %s", "THREAD", "CPU",
	     "CPU%", "CONNS", "VMS", "MSGS_IN/S", "MSGS_OUT/S", "LINK", "UNCONF", "NODE");
	json_array_foreach(threads, i, th) {
		json_t *u = json_object_get(th, "upstream"), *p = prev_thread(t, num(th, "thread"));
		bool known = p && dt > 0;

		line(&o, "%-6lld %-4lld %-6s %-6lld %-5lld %-10s %-10s %-5s %-8lld %s",
		     num(th, "thread"), num(th, "cpu"),
		     rate(a, sizeof(a), known,
			  known ? 100.0 * (real(th, "cpu_seconds") - real(p, "cpu_seconds")) / dt
				: 0),
		     num(th, "connections"), num(th, "vm_count"),
		     rate(b, sizeof(b), known,
			  known ? (double)(num(th, "messages_in") - num(p, "messages_in")) / dt
				: 0),
		     rate(c, sizeof(c), known,
			  known ? (double)(num(th, "messages_out") - num(p, "messages_out")) / dt
				: 0),
		     json_is_true(json_object_get(u, "up")) ? "up" : "DOWN", num(u, "unconfirmed"),
		     str(u, "node"));
	}

	json_array_foreach(list, i, v) {
		json_t *p = json_object_get(t->prev_vms, str(v, "uuid"));

		if (vr) {
			vr[i].vm = v;
			vr[i].known = p && dt > 0;
			if (vr[i].known)
				vr[i].rate = (double)(num(v, "messages_in") - json_integer_value(p)) /
					     dt;
		}
		json_object_set_new(seen, str(v, "uuid"), json_integer(num(v, "messages_in")));
	}
	if (vr)
		qsort(vr, nvm, sizeof(*vr), vm_row_cmp);
	used = 6 + (int)json_array_size(threads);
	room = rows > 0 ? (rows > used ? (size_t)(rows - used) : 0) : TOP_DEFAULT_VMS;
	shown = !vr ? 0 : nvm < room ? nvm : room;
	line(&o, "%s", "");
	line(&o, "BUSIEST VMS (%zu of %zu)", shown, nvm);
	line(&o, "%-20s %-6s %-6s %-10s %-10s %-8s %s", "NAME", "THREAD", "CONNS",
	     "MSGS_IN/S", "HELD_BYTES", "STATE", "UUID");
	for (i = 0; vr && i < shown; i++) {
		v = vr[i].vm;
		line(&o, "%-20.40s %-6lld %-6lld %-10s %-10lld %-8s %s", str(v, "name"),
		     num(v, "thread"), num(v, "connections"),
		     rate(a, sizeof(a), vr[i].known, vr[i].rate), num(v, "held_bytes"),
		     json_is_true(json_object_get(v, "blocked"))     ? "blocked"
		     : json_is_true(json_object_get(v, "migrating")) ? "moving"
								     : "",
		     str(v, "uuid"));
	}
	free(vr);

	json_decref(t->prev_threads);
	t->prev_threads = json_incref(threads);
	json_decref(t->prev_vms);
	t->prev_vms = seen;
	t->prev_at = now;
}

void ctl_top_clear(struct ctl_top *t)
{
	json_decref(t->prev_threads);
	json_decref(t->prev_vms);
	memset(t, 0, sizeof(*t));
}

static volatile sig_atomic_t top_stop;

static void on_stop(int sig)
{
	top_stop = 1;
}

static double mono_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A parsed reply with "ok": true, or NULL (the reason printed on stderr). */
static json_t *ask(const char *path, const char *req, ctl_roundtrip_fn rt)
{
	char *text = rt(path, req);
	json_t *reply;

	if (!text)
		return NULL;
	reply = json_loads(text, 0, NULL);
	free(text);
	if (!reply) {
		fprintf(stderr, "vmproxyctl: the daemon's reply is not JSON\n");
		return NULL;
	}
	if (!json_is_true(json_object_get(reply, "ok"))) {
		fprintf(stderr, "vmproxyctl: %s\n", str(reply, "error"));
		json_decref(reply);
		return NULL;
	}
	return reply;
}

/* Writes all of BUF to fd 1; false on error. */
static bool write_all(const char *buf, size_t len)
{
	while (len) {
		ssize_t w = write(STDOUT_FILENO, buf, len);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return false;
		buf += w;
		len -= (size_t)w;
	}
	return true;
}

/* The frame TEXT drawn over the previous one: cursor home, each line
 * cleared to its end, the rest of the screen cleared. The last line gets
 * no newline, so the screen never scrolls. */
static bool draw(const char *text, size_t len)
{
	char *buf = malloc(len * 2 + 64), *o = buf;
	bool ok;

	if (!buf)
		return false;
	o += sprintf(o, "\033[H");
	for (size_t i = 0; i < len; i++) {
		if (text[i] == '\n') {
			o += sprintf(o, "\033[K");
			if (i + 1 < len)
				*o++ = '\n';
		} else {
			*o++ = text[i];
		}
	}
	o += sprintf(o, "\033[J");
	ok = write_all(buf, (size_t)(o - buf));
	free(buf);
	return ok;
}

/* "top [INTERVAL [COUNT]]": 0, or 2 with the error printed. */
static int top_args(int argc, char **argv, double *interval, long *count)
{
	char *end;

	if (argc > 2) {
		fprintf(stderr, "vmproxyctl: top takes at most an interval and a count\n");
		return 2;
	}
	if (argc >= 1) {
		*interval = strtod(argv[0], &end);
		if (*end || end == argv[0] || !(*interval >= 0.1 && *interval <= 3600)) {
			fprintf(stderr, "vmproxyctl: top: interval must be 0.1 to 3600 seconds, got "
					"\"%s\"\n",
				argv[0]);
			return 2;
		}
	}
	if (argc == 2) {
		*count = strtol(argv[1], &end, 10);
		if (*end || end == argv[1] || *count < 1) {
			fprintf(stderr, "vmproxyctl: top: count must be a number >= 1, got \"%s\"\n",
				argv[1]);
			return 2;
		}
	}
	return 0;
}

/* Keys without Enter or echo, when stdin is a terminal: true if set (SAVED
 * then holds what to restore). */
static bool keys_raw(struct termios *saved)
{
	struct termios raw;

	if (!isatty(STDIN_FILENO) || tcgetattr(STDIN_FILENO, saved) != 0)
		return false;
	raw = *saved;
	raw.c_lflag &= ~(tcflag_t)(ICANON | ECHO);
	raw.c_cc[VMIN] = 0;
	raw.c_cc[VTIME] = 0;
	return tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0;
}

/* Until UNTIL (mono_now): keys on a terminal (q stops), signals anywhere. */
static void wait_frame(double until, bool *keys)
{
	while (!top_stop && mono_now() < until) {
		struct pollfd pfd = { STDIN_FILENO, POLLIN, 0 };
		int ms = (int)((until - mono_now()) * 1000) + 1;
		char key;

		if (!*keys) {
			poll(NULL, 0, ms);
			continue;
		}
		if (poll(&pfd, 1, ms) > 0) {
			if (read(STDIN_FILENO, &key, 1) == 1 && (key == 'q' || key == 'Q'))
				top_stop = 1;
			else if (pfd.revents & (POLLHUP | POLLERR))
				*keys = false;
		}
	}
}

/* Render one frame from STATUS and VMS and show it: in place on a
 * terminal, as a block of lines otherwise. False when it could not be
 * written. */
static bool show_frame(struct ctl_top *t, json_t *status, json_t *vms, double now, bool tty)
{
	struct winsize ws = { 0 };
	char *text = NULL;
	size_t len = 0;
	FILE *out;
	bool ok;

	if (tty)
		ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws);
	out = open_memstream(&text, &len);
	if (out) {
		ctl_top_render(t, status, vms, now, tty ? ws.ws_col : 0, tty ? ws.ws_row : 0, out);
		fclose(out);
	}
	ok = text && (tty ? draw(text, len) : write_all(text, len) && write_all("\n", 1));
	free(text);
	return ok;
}

int ctl_top_run(const char *path, int argc, char **argv, ctl_roundtrip_fn rt)
{
	static const char enter[] = "\033[?1049h\033[?25l\033[H\033[2J";
	static const char leave[] = "\033[?25h\033[?1049l";
	struct sigaction sa = { .sa_handler = on_stop }, old_int, old_term, old_hup;
	struct ctl_top t = { 0 };
	struct termios saved;
	bool tty = isatty(STDOUT_FILENO), keys = false, lost = false, entered = false;
	double interval = 1.0;
	long count = -1;
	int rc = top_args(argc, argv, &interval, &count);

	if (rc)
		return rc;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, &old_int);
	sigaction(SIGTERM, &sa, &old_term);
	sigaction(SIGHUP, &sa, &old_hup);
	top_stop = 0;

	for (long n = 0; !top_stop && (count < 0 || n < count); n++) {
		json_t *status = ask(path, "{\"command\":\"status\"}", rt), *vms = NULL;
		double now = mono_now();
		bool shown;

		if (status)
			vms = ask(path, "{\"command\":\"vms\"}", rt);
		if (!vms) {
			json_decref(status);
			/* A signal that interrupted the request is a stop, not a
			 * lost daemon. */
			if (top_stop)
				break;
			lost = n > 0;
			rc = 1;
			break;
		}
		if (n == 0 && tty) {
			/* Only once the daemon answered: a wrong socket path is
			 * reported on the ordinary screen. */
			keys = keys_raw(&saved);
			entered = write_all(enter, sizeof(enter) - 1);
		}
		shown = show_frame(&t, status, vms, now, tty);
		json_decref(status);
		json_decref(vms);
		if (!shown) {
			rc = 1;
			break;
		}
		if (count > 0 && n + 1 >= count)
			break;
		wait_frame(now + interval, &keys);
	}

	if (entered)
		write_all(leave, sizeof(leave) - 1);
	if (keys)
		tcsetattr(STDIN_FILENO, TCSANOW, &saved);
	sigaction(SIGINT, &old_int, NULL);
	sigaction(SIGTERM, &old_term, NULL);
	sigaction(SIGHUP, &old_hup, NULL);
	if (lost)
		fprintf(stderr, "vmproxyctl: top: lost the daemon at %s\n", path);
	ctl_top_clear(&t);
	return rc;
}
