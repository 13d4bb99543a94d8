#!/usr/bin/env bash
# install-deps.sh -- install every build, run and test dependency of vmproxy
# from Debian 12 packages. Safe to run again: apt-get skips what is present.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps.sh: must run as root (apt-get)" >&2
	exit 1
fi

packages=(
	# build
	build-essential pkg-config meson ninja-build clang libclang-rt-14-dev
	# libraries
	librabbitmq-dev libssl-dev libjansson-dev libvirt-dev libxml2-dev
	libsystemd-dev libmicrohttpd-dev libcmocka-dev libsqlite3-dev libpq-dev
	# run and test
	rabbitmq-server openssl python3 python3-pika python3-pytest
	python3-jsonschema amqp-tools prometheus libvirt-clients valgrind
	# a private libvirtd that tests can kill (tests/integration/harness/libvirtd.py)
	libvirt-daemon
	procps iproute2 systemd groff-base python3-cryptography
	postgresql sqlite3 python3-psycopg2
	# benchmarks and soak (tests/bench)
	strace python3-matplotlib
	# Debian packages (deploy/build-debs.sh, test_packages) and the
	# terminal tests of vmproxyctl top and the quickstart table
	dpkg-dev debhelper fakeroot lintian git tmux
)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
		missing+=("$p")
done

if [ "${#missing[@]}" -eq 0 ]; then
	echo "install-deps.sh: all ${#packages[@]} packages present"
	exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Package scripts must not start services (rabbitmq-server, libvirtd,
# prometheus) on this machine: the tests start private instances.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
	printf '#!/bin/sh\nexit 101\n' >"$policy"
	chmod 755 "$policy"
	created_policy=1
fi
trap '[ "$created_policy" -eq 1 ] && rm -f "$policy"' EXIT

apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-deps.sh: installed ${#missing[@]} packages"
