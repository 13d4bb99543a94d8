/* amqp_frame.c -- see amqp_frame.h */
#include "amqp_frame.h"

#include <errno.h>
#include <stdbool.h>

#define DEPTH_HARD_MAX 64

/* Bytes of a fixed-size field value, or 0 for variable/unknown types. */
static size_t fixed_size(uint8_t type, bool *known)
{
	*known = true;
	switch (type) {
	case 't': /* boolean */
	case 'b': /* int8 */
	case 'B': /* uint8 */
		return 1;
	case 's': /* int16 */
	case 'u': /* uint16 */
		return 2;
	case 'I': /* int32 */
	case 'i': /* uint32 */
	case 'f': /* float */
		return 4;
	case 'D': /* decimal: scale u8 + value u32 */
		return 5;
	case 'l': /* int64 */
	case 'L': /* uint64 */
	case 'd': /* double */
	case 'T': /* timestamp */
		return 8;
	case 'V': /* void */
		return 0;
	case 'S': /* long string */
	case 'x': /* byte array */
	case 'A': /* array */
	case 'F': /* table */
		return 0;
	}
	*known = false;
	return 0;
}

int amqp_frame_check_table(const uint8_t *p, size_t len, unsigned max_depth)
{
	/* ends[d]: end offset of the container at depth d+1; is_table[d]. */
	size_t ends[DEPTH_HARD_MAX];
	bool is_table[DEPTH_HARD_MAX];
	unsigned depth = 1;
	size_t pos = 0;

	if (max_depth == 0)
		return -ELOOP;
	if (max_depth > DEPTH_HARD_MAX)
		max_depth = DEPTH_HARD_MAX;
	ends[0] = len;
	is_table[0] = true;
	while (depth > 0) {
		size_t end = ends[depth - 1], n;
		uint8_t type;
		bool known;

		if (pos == end) {
			depth--;
			continue;
		}
		if (is_table[depth - 1]) {
			/* key: short string */
			if (end - pos < 1 || end - pos - 1 < p[pos])
				return -EBADMSG;
			pos += 1 + (size_t)p[pos];
		}
		if (end - pos < 1)
			return -EBADMSG;
		type = p[pos++];
		n = fixed_size(type, &known);
		if (!known)
			return -EBADMSG;
		if (type == 'S' || type == 'x' || type == 'A' || type == 'F') {
			uint32_t l;

			if (end - pos < 4)
				return -EBADMSG;
			l = amqp_frame_get32(p + pos);
			pos += 4;
			if (end - pos < l)
				return -EBADMSG;
			if (type == 'A' || type == 'F') {
				if (depth >= max_depth)
					return -ELOOP;
				ends[depth] = pos + l;
				is_table[depth] = type == 'F';
				depth++;
				continue;
			}
			pos += l;
			continue;
		}
		if (end - pos < n)
			return -EBADMSG;
		pos += n;
	}
	return 0;
}

int amqp_frame_check_table_prefixed(const uint8_t *p, size_t avail, unsigned max_depth,
				    size_t *consumed)
{
	uint32_t l;
	int r;

	if (avail < 4)
		return -EBADMSG;
	l = amqp_frame_get32(p);
	if (avail - 4 < l)
		return -EBADMSG;
	r = amqp_frame_check_table(p + 4, l, max_depth);
	if (r == 0)
		*consumed = 4 + (size_t)l;
	return r;
}

int amqp_frame_skip_shortstr(const uint8_t *p, size_t avail, size_t *consumed)
{
	if (avail < 1 || avail - 1 < p[0])
		return -EBADMSG;
	*consumed = 1 + (size_t)p[0];
	return 0;
}
