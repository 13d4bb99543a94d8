/* certfile.h -- PEM certificate files as an operator sees them: whether a
 * client certificate, its key and the CA load and belong together before a
 * start, and how long until they expire (the expiry metric). OpenSSL's
 * errors stay inside this module. */
#pragma once

#include <stddef.h>
#include <stdint.h>

/* Check the TLS files of one link: CA (at least one certificate currently
 * valid: a bundle may keep an expired CA during a CA change), and when CERT
 * is given, its certificates currently valid and KEY the first one's
 * private key. CA, CERT and KEY may be NULL (not checked). WHAT prefixes
 * the message ("upstream.tls"). Returns 0, or -EINVAL/-errno with a message
 * naming the key and the file in ERR. */
int certfile_check(const char *what, const char *ca, const char *cert, const char *key,
		   char *err, size_t errlen);

/* The earliest notAfter among the certificates in the PEM FILE, as Unix
 * seconds in *NOT_AFTER. Returns 0, -ENOENT when the file holds no
 * certificate, or -errno when it cannot be read. */
int certfile_not_after(const char *file, int64_t *not_after);

struct prom_buf;

/* The family vmproxy_tls_certificate_expiry_seconds: for each of FILES
 * (N of them; NULL entries skipped), seconds from now until its
 * earliest notAfter (negative once expired), labelled file="...". A file
 * that cannot be read has no sample. Read anew on each call, so a rotated
 * certificate shows at the next scrape. */
void certfile_prom_expiry(struct prom_buf *b, const char *const *files, size_t n);
