/* upstream_tls.c -- see upstream_tls.h */
#include "upstream_tls.h"

#include <errno.h>
#include <openssl/err.h>
#include <stdio.h>
#include <string.h>

const char *upstream_tls_error(char *buf, size_t len, int ssl_err)
{
	unsigned long e = ERR_get_error();

	if (e) {
		ERR_error_string_n(e, buf, len);
		ERR_clear_error();
	} else if (ssl_err == SSL_ERROR_SYSCALL) {
		snprintf(buf, len, "%s", errno ? strerror(errno) : "connection closed by the peer");
	} else if (ssl_err == SSL_ERROR_ZERO_RETURN) {
		snprintf(buf, len, "the broker closed the TLS session");
	} else {
		snprintf(buf, len, "TLS error %d", ssl_err);
	}
	return buf;
}

SSL_CTX *upstream_tls_context(const struct proxy_config *c, char *err, size_t errlen)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	char e[200];

	if (!ctx) {
		snprintf(err, errlen, "SSL_CTX_new: %s", upstream_tls_error(e, sizeof(e), 0));
		return NULL;
	}
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
				      SSL_MODE_RELEASE_BUFFERS);
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	if (!c->upstream.ca) {
		snprintf(err, errlen, "TLS needs a CA file (upstream.tls.ca)");
		goto fail;
	}
	if (SSL_CTX_load_verify_locations(ctx, c->upstream.ca, NULL) != 1) {
		snprintf(err, errlen, "CA file \"%s\": %s", c->upstream.ca,
			 upstream_tls_error(e, sizeof(e), 0));
		goto fail;
	}
	if (c->upstream.cert) {
		if (!c->upstream.key) {
			snprintf(err, errlen, "client certificate given without a key");
			goto fail;
		}
		if (SSL_CTX_use_certificate_chain_file(ctx, c->upstream.cert) != 1) {
			snprintf(err, errlen, "client certificate \"%s\": %s", c->upstream.cert,
				 upstream_tls_error(e, sizeof(e), 0));
			goto fail;
		}
		if (SSL_CTX_use_PrivateKey_file(ctx, c->upstream.key, SSL_FILETYPE_PEM) != 1 ||
		    SSL_CTX_check_private_key(ctx) != 1) {
			snprintf(err, errlen, "client key \"%s\" (for \"%s\"): %s", c->upstream.key,
				 c->upstream.cert, upstream_tls_error(e, sizeof(e), 0));
			goto fail;
		}
	}
	return ctx;
fail:
	SSL_CTX_free(ctx);
	return NULL;
}

