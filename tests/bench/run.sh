#!/bin/bash
# Performance benchmark of vmproxyd against direct TLS, direct plain AMQP and
# HAProxy (see docs/performance.md). Usage: tests/bench/run.sh [--quick]
# [--out DIR] [--only matrix,idle,fairness,callgrind,syscalls]
# [--topologies direct,direct-plain,vmproxyd,haproxy] [--docs]
# [--replot DIR]. Loopback only; stops by itself.
set -euo pipefail

top=$(cd "$(dirname "$0")/../.." && pwd)
build="$top/build-bench"

if ! command -v haproxy >/dev/null; then
	apt-get install -y haproxy >/dev/null
fi
if ! command -v valgrind >/dev/null; then
	apt-get install -y valgrind >/dev/null
fi
if ! command -v strace >/dev/null; then
	apt-get install -y --no-install-recommends strace >/dev/null
fi
if ! /usr/bin/python3 -c 'import matplotlib' 2>/dev/null; then
	apt-get install -y --no-install-recommends python3-matplotlib >/dev/null
fi

if [ ! -d "$build" ]; then
	# As the Debian packages are built (debian/rules): with link-time
	# optimisation.
	meson setup "$build" "$top" --buildtype=release -Db_ndebug=true -Db_lto=true
fi
ninja -C "$build" proxy/vmproxyd proxy/vmproxyctl tests/bench/loadgen

# 10,000 idle guest connections: one fd each in the load generator and in
# the proxy, plus the broker's own (raised by the harness).
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt 12000 ]; then
	echo "run.sh: open-files limit $(ulimit -n) is too low for the idle-scale scenario" >&2
fi

exec /usr/bin/python3 "$top/tests/bench/run.py" --build "$build" "$@"
