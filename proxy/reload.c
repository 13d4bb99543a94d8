/* reload.c -- SIGHUP's configuration reload for vmproxyd (daemon_impl.h):
 * the file is loaded and checked like at start, and what may change
 * without dropping a guest is applied; anything else is refused whole. */
#include "daemon_impl.h"

#include <stdatomic.h>
#include <stdlib.h>

#include "conf.h"
#include "log.h"

/* Make a reloaded session setting visible to the poll threads. Each field is
 * one aligned word written by one store: a poll thread's session reads the
 * old or the new value at its next channel or method, never a mix. */
#define SWAP(a, b)                                                                                 \
	do {                                                                                       \
		__typeof__(a) swap_tmp_ = (a);                                                     \
		(a) = (b);                                                                         \
		(b) = swap_tmp_;                                                                   \
	} while (0)

/* The file loaded again and checked: NULL (logged) when it does not load,
 * changes what takes a restart, or adds a static entry libvirt does not
 * know. On success a slot for the retired exchange list is reserved and
 * the new static entries are in use. */
static struct proxy_config *reload_load(struct vmproxy *p)
{
	struct proxy_config *cfg = p->cfg, *ncfg = NULL;
	char ***grown;
	char err[600], key[64];
	size_t nstatic;

	if (proxy_config_load(cfg->file, &ncfg, err, sizeof(err)) < 0) {
		log_error("SIGHUP: %s; the running configuration stays", err);
		return NULL;
	}
	if (proxy_config_restart_key(cfg, ncfg, key, sizeof(key))) {
		log_error("SIGHUP: %s: %s changed, which takes a restart; the running "
			  "configuration stays", cfg->file, key);
		proxy_config_free(ncfg);
		return NULL;
	}
	grown = realloc(p->retired, (p->nretired + 1) * sizeof(*p->retired));
	if (!grown) {
		log_error("SIGHUP: out of memory; the running configuration stays");
		proxy_config_free(ncfg);
		return NULL;
	}
	p->retired = grown;
	/* The one step that can still fail (a new static entry naming a domain
	 * libvirt does not have), so it goes first. */
	nstatic = json_array_size(json_object_get(json_object_get(cfg->raw, "identity"), "static"));
	if (vm_identity_add_statics(p->id, ncfg, nstatic, err, sizeof(err)) < 0) {
		log_error("SIGHUP: %s: %s; the running configuration stays", cfg->file, err);
		proxy_config_free(ncfg);
		return NULL;
	}
	if (ncfg->identity.n_statics > nstatic)
		log_info("SIGHUP: %zu identity.static entries added",
			 ncfg->identity.n_statics - nstatic);
	return ncfg;
}

/* Session settings: each poll thread has its own copy, which its sessions
 * read, and takes the new values by mail. The old exchange list may still
 * be read by a session: it is retired (into the slot reload_load
 * reserved), not freed. */
static void reload_sessions(struct vmproxy *p, struct proxy_config *ncfg)
{
	struct proxy_config *cfg = p->cfg;

	p->retired[p->nretired++] = cfg->guest.allowed_exchanges;
	cfg->guest.allowed_exchanges = ncfg->guest.allowed_exchanges;
	ncfg->guest.allowed_exchanges = NULL;
	p->shared.allowed_exchanges = (const char *const *)cfg->guest.allowed_exchanges;
	p->shared.scfg.allowed_exchanges = p->shared.allowed_exchanges;
	p->shared.scfg.channel_max = ncfg->guest.channel_max;
	p->shared.scfg.heartbeat = ncfg->guest.heartbeat;
	p->shared.scfg.handshake_timeout_ms = ncfg->guest.handshake_timeout_ms;
	for (unsigned i = 0; i < p->nthreads; i++)
		if (poll_thread_reconfig(p->threads[i], p->shared.allowed_exchanges,
					 p->shared.scfg.channel_max, p->shared.scfg.heartbeat,
					 p->shared.scfg.handshake_timeout_ms) < 0)
			log_error("SIGHUP: out of memory: thread %u keeps its guest session settings "
				  "until the next reload", i);
}

/* SIGHUP: read the file again and apply what changes without dropping a
 * guest (log level, guest bounds and allowed exchanges, balancer settings,
 * metrics.per_vm, drain_timeout_ms, static identities appended). Anything
 * else, or a file that does not load, leaves the running configuration as
 * it is, and says why. */
void reload_config(struct vmproxy *p)
{
	struct proxy_config *cfg = p->cfg, *ncfg;
	struct balancer_config bc;
	struct metrics_config mc;
	struct conf_ctx cc;
	enum log_level level;
	size_t nex = 0;

	ncfg = reload_load(p);
	if (!ncfg)
		return;
	conf_ctx_init(&cc, cfg->file);
	balancer_config_parse(&cc, ncfg->balancer_raw, &bc);
	conf_ctx_init(&cc, cfg->file);
	metrics_config_parse(&cc, ncfg->metrics_raw, &mc);

	if (!p->log_level_pinned && log_level_parse(ncfg->log_level, &level) == 0)
		log_set_level(level);
	/* Daemon-thread settings: the acceptor, the timer and the drain read
	 * them on this thread. */
	cfg->guest.max_connections_per_vm = ncfg->guest.max_connections_per_vm;
	cfg->drain_timeout_ms = ncfg->drain_timeout_ms;
	p->balancer.cfg = bc;
	atomic_store(&p->balancer_enabled, bc.enabled);
	metrics_set_per_vm(p->metrics, mc.per_vm);
	reload_sessions(p, ncfg);
	/* The file as applied is what the next reload compares against. */
	SWAP(cfg->raw, ncfg->raw);
	SWAP(cfg->balancer_raw, ncfg->balancer_raw);
	SWAP(cfg->metrics_raw, ncfg->metrics_raw);
	SWAP(cfg->identity.statics, ncfg->identity.statics);
	SWAP(cfg->identity.n_statics, ncfg->identity.n_statics);
	SWAP(cfg->log_level, ncfg->log_level);
	proxy_config_free(ncfg);
	while (cfg->guest.allowed_exchanges[nex])
		nex++;
	log_info("SIGHUP: configuration reloaded (log_level %s%s, %zu allowed exchanges, "
		 "balancer %s, metrics.per_vm %s)", cfg->log_level,
		 p->log_level_pinned ? " ignored: --log-level given" : "", nex,
		 bc.enabled ? "on" : "off", mc.per_vm ? "on" : "off");
}
