#!/usr/bin/env bash
# build-debs.sh -- build the Debian packages (vmproxyd, vmproxy-agent,
# vmproxy-consumer) from this checkout with Debian's own tooling.
#
#   bash deploy/build-debs.sh [OUTDIR]
#
# The build runs in a clean copy of the committed tree (git archive of HEAD,
# so build directories and uncommitted edits never leak into a package) and
# the .deb files, the .buildinfo and the .changes land in OUTDIR (default
# ./build-debs). DEB_BUILD_OPTIONS is passed through: nocheck skips the unit
# tests, parallel=N builds with N jobs. Needs: dpkg-dev debhelper fakeroot
# and the Build-Depends of debian/control (deploy/install-deps.sh installs
# them all).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$top/build-debs}")

if ! git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
	echo "build-debs.sh: $top is not a git checkout" >&2
	exit 1
fi
if [ -n "$(git -C "$top" status --porcelain --untracked-files=no)" ]; then
	echo "build-debs.sh: warning: uncommitted changes are not packaged (HEAD is)" >&2
fi

mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/vmproxy-debs.XXXXXX")
trap 'rm -rf "$work"' EXIT
src="$work/vmproxy"
mkdir -p "$src"
git -C "$top" archive --format=tar HEAD | tar -x -C "$src"

(cd "$src" && dpkg-buildpackage -us -uc -b)

shopt -s nullglob
files=("$work"/*.deb "$work"/*.buildinfo "$work"/*.changes)
if [ "${#files[@]}" -eq 0 ]; then
	echo "build-debs.sh: dpkg-buildpackage produced no package" >&2
	exit 1
fi
cp -f "${files[@]}" "$out"/
for f in "${files[@]}"; do
	echo "build-debs.sh: $out/$(basename "$f")"
done
