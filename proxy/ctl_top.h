/* ctl_top.h -- `vmproxyctl top`: a live view of a running vmproxyd, redrawn
 * in place every interval like top(1), from the admin socket's status and
 * vms replies (rates are differences between two polls). */
#pragma once

#include <jansson.h>
#include <stdio.h>

/* Sends the request text REQ to the admin socket at PATH and returns the
 * reply text (the caller frees it), or NULL after printing why on stderr. */
typedef char *(*ctl_roundtrip_fn)(const char *path, const char *req);

/* What one frame needs from the previous poll. */
struct ctl_top {
	double prev_at;	  /* monotonic seconds of the previous poll, 0 before the first */
	json_t *prev_threads; /* the previous "threads" array (a reference) */
	json_t *prev_vms;     /* uuid -> previous "messages_in" (a reference) */
};

/* Renders one frame from a status reply STATUS and a vms reply VMS taken at
 * monotonic time NOW (seconds) into OUT: a header line, one line per poll
 * thread, then the busiest VMs by messages per second, as many as fit in
 * ROWS lines, each line cut at COLS columns (0: no limit). Lines end with
 * "\n"; the caller adds terminal controls. Remembers the counters for the
 * next frame. */
void ctl_top_render(struct ctl_top *t, json_t *status, json_t *vms, double now, int cols,
		    int rows, FILE *out);

/* Forgets the remembered counters. */
void ctl_top_clear(struct ctl_top *t);

/* `vmproxyctl top [INTERVAL [COUNT]]` (ARGC/ARGV: what follows "top"):
 * polls the daemon at PATH every INTERVAL seconds (default 1) through RT,
 * COUNT times (default: until q, Ctrl-C or SIGTERM). On a terminal it
 * redraws in place on the alternate screen and restores the terminal on
 * exit; otherwise it prints one frame after another. Returns the exit
 * status: 0, 1 when the daemon cannot be reached, 2 for a usage error. */
int ctl_top_run(const char *path, int argc, char **argv, ctl_roundtrip_fn rt);
