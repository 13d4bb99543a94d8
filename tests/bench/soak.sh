#!/bin/bash
# Soak run of vmproxyd (see docs/performance.md, "Soak"): guests publishing
# with confirms while the broker is killed, frozen and restarted, guests
# reconnect and VMs migrate between poll threads; checks that nothing acked
# is lost and that vmproxyd's memory and descriptors stay flat. Not part of
# CI. Usage: tests/bench/soak.sh [--duration S] [--vms N] [--threads T]
# [--rate R] [--seed N] [--out DIR] (tests/bench/soak.py --help for all).
# Builds vmproxyd (assertions on) in build-soak, or uses VMPROXY_BUILD_DIR.
# Loopback only; stops by itself; Ctrl-C stops everything it started.
set -euo pipefail

top=$(cd "$(dirname "$0")/../.." && pwd)
build="${VMPROXY_BUILD_DIR:-$top/build-soak}"

if [ ! -d "$build" ]; then
	meson setup "$build" "$top" --buildtype=debugoptimized
fi
ninja -C "$build" proxy/vmproxyd proxy/vmproxyctl

# One descriptor per guest connection in the driver and in the proxy.
ulimit -n "$(ulimit -Hn)"

exec /usr/bin/python3 "$top/tests/bench/soak.py" --build "$build" "$@"
