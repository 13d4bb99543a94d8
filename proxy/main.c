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

int main(int argc, char **argv)
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
	const char *config = NULL, *log_file = NULL, *level_arg = NULL;
	bool check = false;
	struct proxy_config *cfg = NULL;
	struct vmproxy *p = NULL;
	enum log_level level = LOG_LEVEL_INFO;
	char err[600];
	sigset_t set;
	int c, r;

	while ((c = getopt_long(argc, argv, "c:hV", opts, NULL)) != -1) {
		switch (c) {
		case 'c':
			config = optarg;
			break;
		case 'C':
			check = true;
			break;
		case 'L':
			log_file = optarg;
			break;
		case 'l':
			level_arg = optarg;
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
	if (!config || optind != argc) {
		fprintf(stderr, "vmproxyd: %s\n", config ? "unexpected argument" : "--config FILE is required");
		usage(stderr);
		return 2;
	}
	if (level_arg && log_level_parse(level_arg, &level) < 0) {
		fprintf(stderr, "vmproxyd: --log-level: expected error, warn, info or debug\n");
		return 2;
	}
	r = proxy_config_load(config, &cfg, err, sizeof(err));
	if (r < 0) {
		fprintf(stderr, "vmproxyd: %s\n", err);
		return 1;
	}
	if (check) {
		/* Everything the start would check that leaves the host as it is. */
		int problems = preflight_run(cfg, log_file, stderr);

		if (problems == 0)
			printf("%s: configuration OK\n", config);
		proxy_config_free(cfg);
		return problems ? 1 : 0;
	}
	if (preflight_tls(cfg, err, sizeof(err)) < 0) {
		fprintf(stderr, "vmproxyd: %s\n", err);
		proxy_config_free(cfg);
		return 1;
	}
	if (!level_arg && cfg->log_level)
		log_level_parse(cfg->log_level, &level);
	log_init("vmproxyd", level);
	if (log_file && (r = log_reopen(log_file)) < 0) {
		fprintf(stderr, "vmproxyd: --log-file \"%s\": %s\n", log_file, strerror(-r));
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
	vmproxy_handle_signals(p, log_file);
	if (level_arg)
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
