/* certfile.c -- see certfile.h */
#include "certfile.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "prom.h"

/* An encrypted key cannot be used by a daemon: never prompt for it. */
static int no_password(char *buf, int size, int rwflag, void *u)
{
	(void)buf;
	(void)size;
	(void)rwflag;
	(void)u;
	return -1;
}

static const char *ssl_error(char *buf, size_t len)
{
	unsigned long e = ERR_get_error();

	if (!e)
		snprintf(buf, len, "no PEM data");
	else
		ERR_error_string_n(e, buf, len);
	ERR_clear_error();
	return buf;
}

static int64_t asn1_unix(const ASN1_TIME *t)
{
	struct tm tm;

	if (!t || ASN1_TIME_to_tm(t, &tm) != 1)
		return 0;
	return (int64_t)timegm(&tm);
}

/* The certificates of FILE. With ALL, each must be currently valid (a
 * client certificate and its chain); without, at least one (a CA bundle may
 * keep an expired CA during a CA change: verification uses the valid one).
 * FIRST, when given, receives the first certificate. */
static int check_certs(const char *key_path, const char *file, bool all, X509 **first,
		       char *err, size_t errlen)
{
	FILE *f = fopen(file, "r");
	char when[32], bad[300] = "";
	int n = 0, valid = 0, r = 0;
	X509 *x;

	if (!f) {
		r = -errno;
		snprintf(err, errlen, "%s: cannot read \"%s\": %s", key_path, file, strerror(errno));
		return r;
	}
	ERR_clear_error();
	while ((x = PEM_read_X509(f, NULL, no_password, NULL))) {
		time_t now = time(NULL);
		int64_t nb = asn1_unix(X509_get0_notBefore(x)), na = asn1_unix(X509_get0_notAfter(x));
		struct tm tm;

		n++;
		if (na <= (int64_t)now || nb > (int64_t)now) {
			time_t t = (time_t)(na <= (int64_t)now ? na : nb);

			gmtime_r(&t, &tm);
			strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S UTC", &tm);
			if (!bad[0])
				snprintf(bad, sizeof(bad), "certificate %d of \"%.200s\" %s %s", n,
					 file, na <= (int64_t)now ? "expired on" : "is not valid before",
					 when);
		} else {
			valid++;
		}
		if (first && !*first)
			*first = x;
		else
			X509_free(x);
	}
	ERR_clear_error();
	fclose(f);
	if (n == 0) {
		snprintf(err, errlen, "%s: \"%s\" holds no PEM certificate", key_path, file);
		r = -EINVAL;
	} else if (all ? valid < n : valid == 0) {
		snprintf(err, errlen, "%s: %s", key_path, bad);
		r = -EINVAL;
	}
	if (r < 0 && first && *first) {
		X509_free(*first);
		*first = NULL;
	}
	return r;
}

int certfile_check(const char *what, const char *ca, const char *cert, const char *key,
		   char *err, size_t errlen)
{
	char kp[96], ebuf[256];
	EVP_PKEY *pkey = NULL;
	X509 *x = NULL;
	FILE *f;
	int r;

	if (ca) {
		snprintf(kp, sizeof(kp), "%s.ca", what);
		r = check_certs(kp, ca, false, NULL, err, errlen);
		if (r < 0)
			return r;
	}
	if (!cert)
		return 0;
	snprintf(kp, sizeof(kp), "%s.cert", what);
	r = check_certs(kp, cert, true, &x, err, errlen);
	if (r < 0)
		return r;
	snprintf(kp, sizeof(kp), "%s.key", what);
	if (!key) {
		snprintf(err, errlen, "%s: required with a client certificate", kp);
		r = -EINVAL;
		goto out;
	}
	f = fopen(key, "r");
	if (!f) {
		r = -errno;
		snprintf(err, errlen, "%s: cannot read \"%s\": %s", kp, key, strerror(errno));
		goto out;
	}
	ERR_clear_error();
	pkey = PEM_read_PrivateKey(f, NULL, no_password, NULL);
	fclose(f);
	if (!pkey) {
		snprintf(err, errlen, "%s: \"%s\" holds no usable unencrypted private key (%s)", kp,
			 key, ssl_error(ebuf, sizeof(ebuf)));
		r = -EINVAL;
		goto out;
	}
	if (X509_check_private_key(x, pkey) != 1) {
		ERR_clear_error();
		snprintf(err, errlen, "%s: \"%s\" is not the private key of the certificate \"%s\"",
			 kp, key, cert);
		r = -EINVAL;
		goto out;
	}
	r = 0;
out:
	EVP_PKEY_free(pkey);
	X509_free(x);
	return r;
}

int certfile_not_after(const char *file, int64_t *not_after)
{
	FILE *f = fopen(file, "r");
	int64_t min = 0;
	bool any = false;
	X509 *x;

	if (!f)
		return -errno;
	ERR_clear_error();
	while ((x = PEM_read_X509(f, NULL, no_password, NULL))) {
		int64_t na = asn1_unix(X509_get0_notAfter(x));

		if (!any || na < min)
			min = na;
		any = true;
		X509_free(x);
	}
	ERR_clear_error();
	fclose(f);
	if (!any)
		return -ENOENT;
	*not_after = min;
	return 0;
}

void certfile_prom_expiry(struct prom_buf *b, const char *const *files, size_t n)
{
	int64_t now = (int64_t)time(NULL);

	prom_family(b, "vmproxy_tls_certificate_expiry_seconds", "gauge",
		    "Seconds until the earliest certificate of the file expires.");
	for (size_t i = 0; i < n; i++) {
		int64_t na;

		if (files[i] && certfile_not_after(files[i], &na) == 0)
			prom_sample(b, "vmproxy_tls_certificate_expiry_seconds", (double)(na - now),
				    "file", files[i], NULL);
	}
}
