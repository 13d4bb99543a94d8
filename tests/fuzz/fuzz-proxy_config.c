/* fuzz-proxy_config.c -- libFuzzer harness for vmproxyd's configuration
 * loader (proxy/config.c over common/conf.c): the input is the contents of
 * the configuration file. It loads or is refused with an error that names
 * the file, on one line; a loaded configuration is freed. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct proxy_config *cfg = NULL;
	char path[64], err[1024] = "";
	int fd = memfd_create("vmproxyd.json", MFD_CLOEXEC);

	if (fd < 0)
		abort();
	for (size_t off = 0; off < size;) {
		ssize_t n = write(fd, data + off, size - off);

		if (n <= 0)
			abort();
		off += (size_t)n;
	}
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	if (proxy_config_load(path, &cfg, err, sizeof(err)) == 0) {
		proxy_config_free(cfg);
	} else if (strncmp(err, path, strlen(path)) != 0 || strchr(err, '\n')) {
		abort(); /* an error names the file and fits on one line */
	}
	close(fd);
	return 0;
}
