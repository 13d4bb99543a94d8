/* metrics_http.h -- a Prometheus "GET /metrics" endpoint (libmicrohttpd) on
 * a numeric IPv4 "ADDRESS:PORT", bounded in connections and time; the text
 * comes from a callback run on the server's thread. */
#pragma once

#include <netinet/in.h>

/* The exposition text, malloc'd (freed by the server), or NULL on error. */
typedef char *(*metrics_http_render_fn)(void *userdata);

/* Parse "ADDRESS:PORT" (numeric IPv4, port 1..65535). 0 or -EINVAL. */
int metrics_http_parse_listen(const char *listen, struct sockaddr_in *out);

struct metrics_http;

/* Listen on LISTEN and serve RENDER's text. 0, -EINVAL or -EADDRINUSE. */
int metrics_http_start(const char *listen, metrics_http_render_fn render, void *userdata,
		       struct metrics_http **out);

/* Accepts NULL. */
void metrics_http_stop(struct metrics_http *h);
