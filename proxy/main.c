/* main.c -- vmproxyd: command line, configuration, signals, then the daemon. */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "daemon.h"
#include "log.h"
#include "preflight.h"

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: vmproxyd --config FILE [options]\n"
		"\n"
		"AMQP 0-9-1 proxy for virtual-machine guests: accepts guest connections over\n"
		"vsock, TCP or per-VM Unix sockets, stamps each message with the VM identity\n"
		"observed on the host, and forwards it with end-to-end confirms over one TLS\n"
		"link per poll thread to the management broker.\n"
		"\n"
		"Options:\n"
		"  -c, --config FILE     configuration file (JSON; see vmproxyd.conf(5))\n"
		"      --check-config    run every start check that leaves the host unchanged\n"
		"                        (configuration, libvirt and its domains, addresses,\n"
		"                        socket directories, TLS files) and exit: 0 if OK\n"
		"      --log-file FILE   log there instead of stderr (reopened on SIGHUP)\n"
		"      --log-level L     error, warn, info or debug (overrides the file)\n"
		"  -h, --help            this text\n"
		"  -V, --version         print the version\n"
		"\n"
		"Signals: SIGTERM/SIGINT drain (stop accepting, wait for confirms, close guests\n"
		"with 320), SIGHUP reloads what changes without closing guests (log level,\n"
		"guest bounds, balancer, metrics.per_vm, static identities added; anything\n"
		"else is refused), reopens\n"
		"the log file and reconnects the upstream links once idle, re-reading the TLS\n"
		"files.\n");
}

struct options {
	const char *config, *log_file, *level_arg;
	bool check;
	enum log_level level;
};

/* The command line into O: -1 to go on, else the exit code (usage or
 * version printed, or 2 with the error). */
static int parse_options(int argc, char **argv, struct options *o)
{
	static const struct option opts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "check-config", no_argument, NULL, 'C' },
		{ "log-file", required_argument, NULL, 'L' },
		{ "log-level", required_argument, NULL, 'l' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	while ((c = getopt_long(argc, argv, "c:hV", opts, NULL)) != -1) {
		switch (c) {
		case 'c':
			o->config = optarg;
			break;
		case 'C':
			o->check = true;
			break;
		case 'L':
			o->log_file = optarg;
			break;
		case 'l':
			o->level_arg = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("vmproxyd %s\n", VMPROXY_VERSION);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (!o->config || optind != argc) {
		fprintf(stderr, "vmproxyd: %s\n", o->config ? "unexpected argument" : "--config FILE is required");
		usage(stderr);
		return 2;
	}
	if (o->level_arg && log_level_parse(o->level_arg, &o->level) < 0) {
		fprintf(stderr, "vmproxyd: --log-level: expected error, warn, info or debug\n");
		return 2;
	}
	return -1;
}

/* Start the daemon on CFG (stolen) and run it until it stops: the exit
 * code. */
static int run_daemon(struct proxy_config *cfg, const struct options *o)
{
	struct vmproxy *p = NULL;
	enum log_level level = o->level;
	char err[600];
	sigset_t set;
	int r;

	if (preflight_tls(cfg, err, sizeof(err)) < 0) {
		fprintf(stderr, "vmproxyd: %s\n", err);
		proxy_config_free(cfg);
		return 1;
	}
	if (!o->level_arg && cfg->log_level)
		log_level_parse(cfg->log_level, &level);
	log_init("vmproxyd", level);
	if (o->log_file && (r = log_reopen(o->log_file)) < 0) {
		fprintf(stderr, "vmproxyd: --log-file \"%s\": %s\n", o->log_file, strerror(-r));
		proxy_config_free(cfg);
		return 1;
	}
	/* Every thread inherits the mask; signals arrive through a signalfd. */
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);

	r = vmproxy_new(cfg, &p);
	if (r < 0) {
		fprintf(stderr, "vmproxyd: out of memory\n");
		return 1;
	}
	vmproxy_handle_signals(p, o->log_file);
	if (o->level_arg)
		vmproxy_pin_log_level(p);
	r = vmproxy_start(p, err, sizeof(err));
	if (r < 0) {
		log_error("cannot start: %s", err);
		vmproxy_free(p);
		return 1;
	}
	r = vmproxy_run(p);
	vmproxy_free(p);
	return r < 0 ? 1 : 0;
}

int main(int argc, char **argv)
{
	struct options o = { .level = LOG_LEVEL_INFO };
	struct proxy_config *cfg = NULL;
	char err[600];
	int r = parse_options(argc, argv, &o);

	if (r >= 0)
		return r;
	r = proxy_config_load(o.config, &cfg, err, sizeof(err));
	if (r < 0) {
		fprintf(stderr, "vmproxyd: %s\n", err);
		return 1;
	}
	if (o.check) {
		/* Everything the start would check that leaves the host as it is. */
		int problems = preflight_run(cfg, o.log_file, stderr);

		if (problems == 0)
			printf("%s: configuration OK\n", o.config);
		proxy_config_free(cfg);
		return problems ? 1 : 0;
	}
	return run_daemon(cfg, &o);
}
