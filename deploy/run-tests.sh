#!/usr/bin/env bash
# run-tests.sh -- the project's test command: install dependencies, build
# twice (normal and address+undefined sanitizers), run every suite in both
# builds (unit and fuzz-corpus replays through meson, integration scenarios
# through pytest against a real RabbitMQ), and end with one summary line
# "N passed, N failed[, N skipped]".
set -uo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

bash deploy/install-deps.sh || { echo "run-tests.sh: dependency install failed" >&2; exit 1; }

out=${VMPROXY_TEST_OUT:-$top/build-tests}
mkdir -p "$out"
export LSAN_OPTIONS="suppressions=$top/tests/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export ASAN_OPTIONS="abort_on_error=0:detect_leaks=1"

passed=0 failed=0 skipped=0
tally() { # tally PASSED FAILED SKIPPED
	passed=$((passed + $1)); failed=$((failed + $2)); skipped=$((skipped + $3))
}

# Counts from meson's testlog.json: one line per test.
meson_counts() {
	/usr/bin/python3 - "$1" <<'PY'
import json, sys
p = f = s = 0
try:
    for line in open(sys.argv[1]):
        r = json.loads(line).get("result")
        if r in ("OK", "EXPECTEDFAIL"): p += 1
        elif r == "SKIP": s += 1
        else: f += 1
except FileNotFoundError:
    f = 1
print(p, f, s)
PY
}

# Counts from a pytest JUnit XML file.
junit_counts() {
	/usr/bin/python3 - "$1" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print(0, 1, 0); sys.exit()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
t = f = s = 0
for su in suites:
    t += int(su.get("tests", 0)); s += int(su.get("skipped", 0))
    f += int(su.get("failures", 0)) + int(su.get("errors", 0))
print(t - f - s, f, s)
PY
}

run_variant() { # run_variant NAME [meson options...]
	local name=$1; shift
	local dir="$out/$name"
	echo "=== build: $name ($*)"
	if [ -d "$dir" ]; then
		meson setup --reconfigure "$dir" "$@" >"$out/$name-setup.log" 2>&1 ||
			meson setup --wipe "$dir" "$@" >"$out/$name-setup.log" 2>&1
	else
		meson setup "$dir" "$@" >"$out/$name-setup.log" 2>&1
	fi || { cat "$out/$name-setup.log"; echo "$name: meson setup failed"; tally 0 1 0; return; }
	if ! ninja -C "$dir" >"$out/$name-build.log" 2>&1; then
		tail -n 60 "$out/$name-build.log"
		echo "$name: build failed"
		tally 0 1 0
		return
	fi

	echo "=== unit and fuzz-replay suites: $name"
	rm -f "$dir/meson-logs/testlog.json"
	meson test -C "$dir" --print-errorlogs --num-processes 2 2>&1 | tail -n 40
	read -r p f s < <(meson_counts "$dir/meson-logs/testlog.json")
	echo "$name meson: $p passed, $f failed, $s skipped"
	tally "$p" "$f" "$s"

	echo "=== integration suite: $name"
	local junit="$out/$name-integration.xml"
	rm -f "$junit"
	VMPROXY_BUILD_DIR="$dir" VMPROXY_VARIANT="$name" \
		timeout --kill-after=30 2400 /usr/bin/python3 -m pytest -q -rs \
		-p no:cacheprovider --junitxml="$junit" tests/integration </dev/null 2>&1 | tail -n 80
	local rc=${PIPESTATUS[0]}
	read -r p f s < <(junit_counts "$junit")
	# Killed by the timeout, or failing outside any test (collection,
	# fixtures): the JUnit file may show no failure, the exit status does.
	if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
		echo "$name integration: pytest exited with status $rc"
		f=1
	fi
	echo "$name integration: $p passed, $f failed, $s skipped"
	tally "$p" "$f" "$s"
}

run_variant normal -Dbuildtype=debugoptimized -Dwerror=true
run_variant sanitize -Dbuildtype=debug -Dwerror=true -Db_sanitize=address,undefined \
	-Db_lundef=false

if [ "$skipped" -gt 0 ]; then
	echo "$passed passed, $failed failed, $skipped skipped"
else
	echo "$passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]
