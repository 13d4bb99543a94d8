/* collect.c -- see collect.h. Every parser reads a bounded line at a time
 * and skips what it cannot parse (counted in st->dropped). */
#include "collect.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define LINE_MAX_LEN 4096

static const char *const pseudo_fs[] = {
	"proc",	      "sysfs",	     "devtmpfs",   "devpts",	   "tmpfs",	"cgroup",
	"cgroup2",    "securityfs",  "pstore",	   "debugfs",	   "tracefs",	"configfs",
	"fusectl",    "mqueue",	     "hugetlbfs",  "bpf",	   "autofs",	"binfmt_misc",
	"rpc_pipefs", "nsfs",	     "ramfs",	   "efivarfs",	   "selinuxfs", "overlay",
	"squashfs",   "fuse.lxcfs", "nfsd",	   "rootfs",	   NULL,
};

void collect_init(struct collect_state *st, const char *root)
{
	memset(st, 0, sizeof(*st));
	st->root = root ? root : "";
	st->statvfs_fn = statvfs;
}

static FILE *open_at(struct collect_state *st, const char *path)
{
	char p[512];

	snprintf(p, sizeof(p), "%s%s", st->root, path);
	return fopen(p, "re");
}

int collect_boot_id(struct collect_state *st, char *buf, size_t len)
{
	FILE *f = open_at(st, "/proc/sys/kernel/random/boot_id");
	char line[64];

	if (!f)
		return -errno;
	if (!fgets(line, sizeof(line), f)) {
		fclose(f);
		return -EIO;
	}
	fclose(f);
	line[strcspn(line, "\n")] = '\0';
	if (strlen(line) != 36)
		return -EINVAL;
	snprintf(buf, len, "%s", line);
	return 0;
}

static double pct(uint64_t part, uint64_t whole)
{
	return whole ? 100.0 * (double)part / (double)whole : 0.0;
}

static double busy_pct(const struct collect_cpu *now, const struct collect_cpu *prev)
{
	uint64_t total = 0, idle;

	for (int i = 0; i < 8; i++)
		total += now->t[i] - (prev ? prev->t[i] : 0);
	idle = (now->t[3] - (prev ? prev->t[3] : 0)) + (now->t[4] - (prev ? prev->t[4] : 0));
	return total ? pct(total - idle, total) : 0.0;
}

static json_t *cpu_times(const struct collect_cpu *c, double hz)
{
	return json_pack("{s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f}", "user_s", c->t[0] / hz,
			 "nice_s", c->t[1] / hz, "system_s", c->t[2] / hz, "idle_s", c->t[3] / hz,
			 "iowait_s", c->t[4] / hz, "irq_s", c->t[5] / hz, "softirq_s", c->t[6] / hz,
			 "steal_s", c->t[7] / hz);
}

static json_t *collect_cpu_doc(struct collect_state *st, bool have_prev)
{
	FILE *f = open_at(st, "/proc/stat");
	char line[LINE_MAX_LEN];
	double hz = (double)sysconf(_SC_CLK_TCK);
	struct collect_cpu total = { { 0 } };
	json_t *per, *o;
	unsigned n = 0;

	if (!f)
		return NULL;
	per = json_array();
	while (fgets(line, sizeof(line), f)) {
		struct collect_cpu c = { { 0 } };
		unsigned id;
		int k;

		if (strncmp(line, "cpu", 3) != 0)
			continue;
		/* "cpu  u n s i ..." is the total, "cpuN u n s i ..." one core. */
		k = sscanf(line + strcspn(line, " "),
			   "%" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64
			   " %" SCNu64 " %" SCNu64,
			   &c.t[0], &c.t[1], &c.t[2], &c.t[3], &c.t[4], &c.t[5], &c.t[6], &c.t[7]);
		if (k < 4) {
			st->dropped++;
			continue;
		}
		if (line[3] == ' ') {
			total = c;
			continue;
		}
		if (sscanf(line + 3, "%u", &id) != 1 || n >= COLLECT_MAX_ITEMS) {
			st->dropped++;
			continue;
		}
		o = cpu_times(&c, hz);
		json_object_set_new(o, "cpu", json_integer(id));
		json_object_set_new(o, "busy_pct",
				    json_real(busy_pct(&c, have_prev && n < st->ncpu ? &st->prev_cpu[n]
										     : NULL)));
		json_array_append_new(per, o);
		st->prev_cpu[n++] = c;
	}
	fclose(f);
	o = json_pack("{s:i, s:f, s:o, s:o}", "count", (int)n, "busy_pct",
		      busy_pct(&total, have_prev ? &st->prev_total : NULL), "total",
		      cpu_times(&total, hz), "per_core", per);
	st->prev_total = total;
	st->ncpu = n;
	return o;
}

static json_t *collect_memory(struct collect_state *st)
{
	FILE *f = open_at(st, "/proc/meminfo");
	char line[LINE_MAX_LEN], key[64];
	uint64_t total = 0, fr = 0, avail = 0, buffers = 0, cached = 0, stot = 0, sfree = 0, v;

	if (!f)
		return NULL;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%63[^:]: %" SCNu64, key, &v) != 2)
			continue;
		v *= 1024;
		if (!strcmp(key, "MemTotal"))
			total = v;
		else if (!strcmp(key, "MemFree"))
			fr = v;
		else if (!strcmp(key, "MemAvailable"))
			avail = v;
		else if (!strcmp(key, "Buffers"))
			buffers = v;
		else if (!strcmp(key, "Cached"))
			cached = v;
		else if (!strcmp(key, "SwapTotal"))
			stot = v;
		else if (!strcmp(key, "SwapFree"))
			sfree = v;
	}
	fclose(f);
	return json_pack("{s:I, s:I, s:I, s:I, s:I, s:f, s:I, s:I, s:f}", "total_bytes",
			 (json_int_t)total, "free_bytes", (json_int_t)fr, "available_bytes",
			 (json_int_t)avail, "buffers_bytes", (json_int_t)buffers, "cached_bytes",
			 (json_int_t)cached, "used_pct", pct(total - (avail ? avail : fr), total),
			 "swap_total_bytes", (json_int_t)stot, "swap_free_bytes", (json_int_t)sfree,
			 "swap_used_pct", pct(stot - sfree, stot));
}

static json_t *collect_load(struct collect_state *st)
{
	FILE *f = open_at(st, "/proc/loadavg");
	double l1, l5, l15;
	unsigned running, total;
	int k;

	if (!f)
		return NULL;
	k = fscanf(f, "%lf %lf %lf %u/%u", &l1, &l5, &l15, &running, &total);
	fclose(f);
	if (k != 5)
		return NULL;
	return json_pack("{s:f, s:f, s:f, s:i, s:i}", "load1", l1, "load5", l5, "load15", l15,
			 "running", (int)running, "total", (int)total);
}

static const struct collect_dev *find_prev(const struct collect_dev *prev, unsigned n,
					   const char *name)
{
	for (unsigned i = 0; i < n; i++)
		if (!strcmp(prev[i].name, name))
			return &prev[i];
	return NULL;
}

static double per_s(uint64_t now, const struct collect_dev *prev, bool b, double dt)
{
	uint64_t p = prev ? (b ? prev->b : prev->a) : now;

	return dt > 0 && now >= p ? (double)(now - p) / dt : 0.0;
}

static bool skip_disk(const char *name)
{
	return !strncmp(name, "loop", 4) || !strncmp(name, "ram", 3) || !strncmp(name, "zram", 4) ||
	       !strncmp(name, "sr", 2) || !strncmp(name, "fd", 2);
}

static json_t *collect_disks(struct collect_state *st, double dt)
{
	FILE *f = open_at(st, "/proc/diskstats");
	char line[LINE_MAX_LEN], name[64], p[512];
	struct collect_dev cur[COLLECT_MAX_ITEMS];
	json_t *arr = json_array();
	unsigned n = 0;

	if (!f)
		return arr;
	while (fgets(line, sizeof(line), f)) {
		uint64_t rd, rsec, wr, wsec, io_ms;

		if (sscanf(line, "%*u %*u %63s %" SCNu64 " %*u %" SCNu64 " %*u %" SCNu64 " %*u %" SCNu64
				 " %*u %*u %" SCNu64,
			   name, &rd, &rsec, &wr, &wsec, &io_ms) != 6) {
			st->dropped++;
			continue;
		}
		if (skip_disk(name))
			continue;
		/* Whole disks only: partitions have a "partition" file in sysfs. */
		snprintf(p, sizeof(p), "%s/sys/class/block/%s/partition", st->root, name);
		if (access(p, F_OK) == 0)
			continue;
		if (n >= COLLECT_MAX_ITEMS) {
			st->dropped++;
			continue;
		}
		snprintf(cur[n].name, sizeof(cur[n].name), "%s", name);
		cur[n].a = rsec * 512;
		cur[n].b = wsec * 512;
		{
			const struct collect_dev *pv = find_prev(st->prev_disk, st->ndisk, name);
			json_array_append_new(
				arr, json_pack("{s:s, s:I, s:I, s:I, s:I, s:I, s:f, s:f}", "device", name,
					       "reads", (json_int_t)rd, "read_bytes", (json_int_t)cur[n].a,
					       "writes", (json_int_t)wr, "write_bytes",
					       (json_int_t)cur[n].b, "io_ms", (json_int_t)io_ms,
					       "read_bytes_per_s", per_s(cur[n].a, pv, false, dt),
					       "write_bytes_per_s", per_s(cur[n].b, pv, true, dt)));
		}
		n++;
	}
	fclose(f);
	memcpy(st->prev_disk, cur, n * sizeof(cur[0]));
	st->ndisk = n;
	return arr;
}

static json_t *collect_net(struct collect_state *st, double dt)
{
	FILE *f = open_at(st, "/proc/net/dev");
	char line[LINE_MAX_LEN];
	struct collect_dev cur[COLLECT_MAX_ITEMS];
	json_t *arr = json_array();
	unsigned n = 0;

	if (!f)
		return arr;
	while (fgets(line, sizeof(line), f)) {
		uint64_t v[16];
		char *colon = strrchr(line, ':'), *name = line;

		/* "  name: rx..."; names may hold colons (aliases): split at the last. */
		if (!colon)
			continue;
		*colon = '\0';
		while (*name == ' ')
			name++;
		if (sscanf(colon + 1,
			   "%" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64
			   " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64
			   " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64,
			   &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9],
			   &v[10], &v[11], &v[12], &v[13], &v[14], &v[15]) != 16) {
			st->dropped++;
			continue;
		}
		if (n >= COLLECT_MAX_ITEMS || strlen(name) >= sizeof(cur[0].name)) {
			st->dropped++;
			continue;
		}
		memcpy(cur[n].name, name, strlen(name) + 1);
		cur[n].a = v[0];
		cur[n].b = v[8];
		{
			const struct collect_dev *pv = find_prev(st->prev_net, st->nnet, name);
			json_array_append_new(
				arr, json_pack("{s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:f}",
					       "interface", name, "rx_bytes", (json_int_t)v[0],
					       "rx_packets", (json_int_t)v[1], "rx_errors",
					       (json_int_t)v[2], "rx_dropped", (json_int_t)v[3],
					       "tx_bytes", (json_int_t)v[8], "tx_packets",
					       (json_int_t)v[9], "tx_errors", (json_int_t)v[10],
					       "tx_dropped", (json_int_t)v[11], "rx_bytes_per_s",
					       per_s(v[0], pv, false, dt), "tx_bytes_per_s",
					       per_s(v[8], pv, true, dt)));
		}
		n++;
	}
	fclose(f);
	memcpy(st->prev_net, cur, n * sizeof(cur[0]));
	st->nnet = n;
	return arr;
}

static bool is_pseudo(const char *fstype)
{
	for (const char *const *p = pseudo_fs; *p; p++)
		if (!strcmp(*p, fstype))
			return true;
	return false;
}

static json_t *collect_fs(struct collect_state *st)
{
	FILE *f = open_at(st, "/proc/self/mounts");
	char line[LINE_MAX_LEN], dev[1024], mnt[1024], type[64];
	json_t *arr = json_array();
	unsigned n = 0;

	if (!f)
		return arr;
	while (fgets(line, sizeof(line), f)) {
		struct statvfs sv;
		uint64_t total, avail, used;

		if (sscanf(line, "%1023s %1023s %63s", dev, mnt, type) != 3) {
			st->dropped++;
			continue;
		}
		if (is_pseudo(type) || dev[0] != '/')
			continue;
		if (n >= COLLECT_MAX_ITEMS) {
			st->dropped++;
			continue;
		}
		if (st->statvfs_fn(mnt, &sv) < 0)
			continue;
		total = (uint64_t)sv.f_blocks * sv.f_frsize;
		avail = (uint64_t)sv.f_bavail * sv.f_frsize;
		used = total - (uint64_t)sv.f_bfree * sv.f_frsize;
		json_array_append_new(arr, json_pack("{s:s, s:s, s:s, s:I, s:I, s:I, s:f, s:I, s:I}",
						     "mount", mnt, "device", dev, "fstype", type,
						     "total_bytes", (json_int_t)total, "used_bytes",
						     (json_int_t)used, "avail_bytes", (json_int_t)avail,
						     "used_pct", pct(used, used + avail), "inodes_total",
						     (json_int_t)sv.f_files, "inodes_free",
						     (json_int_t)sv.f_ffree));
		n++;
	}
	fclose(f);
	return arr;
}

static double uptime(struct collect_state *st)
{
	FILE *f = open_at(st, "/proc/uptime");
	double u = 0;

	if (f) {
		if (fscanf(f, "%lf", &u) != 1)
			u = 0;
		fclose(f);
	}
	return u;
}

/* Rounds every real under V to COLLECT_DECIMALS decimals, in place. */
static void round_reals(json_t *v)
{
	const char *key;
	json_t *item;
	size_t i;

	if (json_is_real(v)) {
		double scale = pow(10, COLLECT_DECIMALS);

		json_real_set(v, round(json_real_value(v) * scale) / scale);
	} else if (json_is_object(v)) {
		json_object_foreach(v, key, item)
			round_reals(item);
	} else if (json_is_array(v)) {
		json_array_foreach(v, i, item)
			round_reals(item);
	}
}

char *collect_format(const json_t *doc, size_t flags)
{
	/* 15 significant digits: every double rounded to two decimals below
	 * 10^13 prints as the decimal it was rounded to (17 would show the
	 * binary approximation's tail). */
	return json_dumps(doc, flags | JSON_REAL_PRECISION(15));
}

json_t *collect_sample(struct collect_state *st, uint64_t now_mono_ms, uint64_t wall_ms,
		       unsigned interval_s)
{
	bool have_prev = st->prev_ms != 0;
	double dt = have_prev ? (double)(now_mono_ms - st->prev_ms) / 1000.0 : 0;
	char host[256] = "", boot[40] = "";
	json_t *doc, *v;

	gethostname(host, sizeof(host) - 1);
	collect_boot_id(st, boot, sizeof(boot));
	doc = json_pack("{s:s, s:I, s:i, s:{s:s, s:s, s:f, s:s}}", "schema", "vmproxy.metrics/1",
			"time_ms", (json_int_t)wall_ms, "interval_s", (int)interval_s, "host",
			"hostname", host, "boot_id", boot, "uptime_s", uptime(st), "agent_version",
			VMPROXY_VERSION);
	if (!doc)
		return NULL;
	if ((v = collect_cpu_doc(st, have_prev)))
		json_object_set_new(doc, "cpu", v);
	if ((v = collect_memory(st)))
		json_object_set_new(doc, "memory", v);
	if ((v = collect_load(st)))
		json_object_set_new(doc, "load", v);
	json_object_set_new(doc, "disks", collect_disks(st, dt));
	json_object_set_new(doc, "network", collect_net(st, dt));
	json_object_set_new(doc, "filesystems", collect_fs(st));
	round_reals(doc);
	st->prev_ms = now_mono_ms;
	return doc;
}
