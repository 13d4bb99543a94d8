/* preflight.h -- the start-time checks of vmproxyd that leave the host as it
 * is, run by --check-config: libvirt and the static domains, listener and
 * endpoint addresses, socket directories, the TLS files, the log file. */
#pragma once

#include <stdio.h>

#include "config.h"

/* The TLS files of upstream.tls: CA and client certificate currently valid,
 * the key the certificate's (certfile_check). A start runs this too, so
 * the check and the start agree. 0, or -errno with a message in ERR. */
int preflight_tls(const struct proxy_config *cfg, char *err, size_t errlen);

/* Every check a start makes that has no side effect on the host, TLS
 * included. Each problem is one line on OUT, "FILE: key: what"; a port that
 * is in use right now (by the running daemon, before a restart) is a
 * "warning:" line, not a problem. LOG_FILE (--log-file) may be NULL.
 * Returns the number of problems. */
int preflight_run(const struct proxy_config *cfg, const char *log_file, FILE *out);
