/* upstream_tls.h -- the link's OpenSSL boundary: the client context from
 * the configured files (built on a helper thread, since it reads them),
 * and OpenSSL's error queue turned into text where a call failed. */
#pragma once

#include <openssl/ssl.h>
#include <stddef.h>

#include "config.h"

/* A TLS 1.2+ client context verifying the broker against upstream.tls.ca,
 * with the client certificate and key when configured (checked as a
 * pair). NULL with ERR naming the file on failure. */
SSL_CTX *upstream_tls_context(const struct proxy_config *c, char *err, size_t errlen);

/* The oldest error of this thread's OpenSSL queue (then cleared), or
 * errno's text for a syscall error, or SSL_ERR's meaning, in BUF. */
const char *upstream_tls_error(char *buf, size_t len, int ssl_err);
