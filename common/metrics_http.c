/* metrics_http.c -- see metrics_http.h */
#include "metrics_http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <stdlib.h>
#include <string.h>

struct metrics_http {
	struct MHD_Daemon *mhd;
	metrics_http_render_fn render;
	void *ud;
};

int metrics_http_parse_listen(const char *listen, struct sockaddr_in *out)
{
	const char *colon = listen ? strrchr(listen, ':') : NULL;
	char host[64], *end;
	long port;

	if (!colon || (size_t)(colon - listen) >= sizeof(host))
		return -EINVAL;
	memcpy(host, listen, (size_t)(colon - listen));
	host[colon - listen] = '\0';
	port = strtol(colon + 1, &end, 10);
	memset(out, 0, sizeof(*out));
	out->sin_family = AF_INET;
	if (*end || port < 1 || port > 65535 || inet_pton(AF_INET, host, &out->sin_addr) != 1)
		return -EINVAL;
	out->sin_port = htons((uint16_t)port);
	return 0;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url,
			      const char *method, const char *version, const char *upload,
			      size_t *upload_size, void **req)
{
	static const char not_found[] = "not found: try GET /metrics\n";
	static const char failed[] = "out of memory\n";
	struct metrics_http *h = cls;
	struct MHD_Response *resp;
	unsigned status = MHD_HTTP_OK;
	enum MHD_Result r;
	char *body = NULL;

	(void)version;
	(void)upload;
	(void)upload_size;
	(void)req;
	if (strcmp(method, "GET") != 0 || strcmp(url, "/metrics") != 0) {
		status = MHD_HTTP_NOT_FOUND;
		resp = MHD_create_response_from_buffer(sizeof(not_found) - 1, (void *)not_found,
						       MHD_RESPMEM_PERSISTENT);
	} else if (!(body = h->render(h->ud))) {
		status = MHD_HTTP_INTERNAL_SERVER_ERROR;
		resp = MHD_create_response_from_buffer(sizeof(failed) - 1, (void *)failed,
						       MHD_RESPMEM_PERSISTENT);
	} else {
		resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
		if (resp)
			MHD_add_response_header(resp, "Content-Type",
						"text/plain; version=0.0.4; charset=utf-8");
		else
			free(body);
	}
	if (!resp)
		return MHD_NO;
	r = MHD_queue_response(conn, status, resp);
	MHD_destroy_response(resp);
	return r;
}

int metrics_http_start(const char *listen, metrics_http_render_fn render, void *userdata,
		       struct metrics_http **out)
{
	struct metrics_http *h;
	struct sockaddr_in sa;

	if (metrics_http_parse_listen(listen, &sa) < 0)
		return -EINVAL;
	h = calloc(1, sizeof(*h));
	if (!h)
		return -ENOMEM;
	h->render = render;
	h->ud = userdata;
	h->mhd = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL, 0, NULL, NULL,
				  handle, h, MHD_OPTION_SOCK_ADDR, &sa, MHD_OPTION_CONNECTION_LIMIT,
				  (unsigned)16, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10,
				  MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)65536, MHD_OPTION_END);
	if (!h->mhd) {
		free(h);
		return -EADDRINUSE;
	}
	*out = h;
	return 0;
}

void metrics_http_stop(struct metrics_http *h)
{
	if (!h)
		return;
	MHD_stop_daemon(h->mhd);
	free(h);
}
