#!/usr/bin/env bash
# run-fuzzers.sh -- fuzz every harness of tests/fuzz with libFuzzer for a
# while (not part of deploy/run-tests.sh, which only replays the corpora).
#
#   bash tests/fuzz/run-fuzzers.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Builds build-fuzz/ with clang, -Dfuzzing=true and ASan+UBSan, then runs
# each target (default: all) for SECONDS_PER_TARGET (default 60) seconds
# starting from its checked-in corpus. New inputs go to
# build-fuzz/fuzz-out/TARGET (the checked-in corpus is not touched: copy an
# input worth keeping there by hand); a crash leaves its input in
# build-fuzz/fuzz-out/crash-TARGET-* and makes the script exit 1.
set -uo pipefail

top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top"
secs=${1:-60}
shift || true
targets=("$@")
# Every harness: one corpus directory per fuzz-NAME.c (tests/fuzz/meson.build).
if [ ${#targets[@]} -eq 0 ]; then
	for d in tests/fuzz/corpus/*/; do
		targets+=("$(basename "$d")")
	done
fi

dir=build-fuzz
if [ ! -d "$dir" ]; then
	CC=clang meson setup "$dir" -Dfuzzing=true -Dbuildtype=debug \
		-Db_sanitize=address,undefined -Db_lundef=false >/dev/null || exit 1
fi
ninja -C "$dir" >/dev/null || { echo "run-fuzzers.sh: build failed" >&2; exit 1; }

export LSAN_OPTIONS="suppressions=$top/tests/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
failed=0
for t in "${targets[@]}"; do
	out="$dir/fuzz-out/$t"
	mkdir -p "$out"
	echo "=== fuzz-$t: ${secs} s"
	if "$dir/tests/fuzz/fuzz-$t" -max_total_time="$secs" -print_final_stats=1 \
		-artifact_prefix="$dir/fuzz-out/crash-$t-" "$out" "tests/fuzz/corpus/$t" \
		>"$dir/fuzz-out/$t.log" 2>&1; then
		grep -E "^stat::number_of_executed_units|^Done" "$dir/fuzz-out/$t.log"
	else
		tail -n 40 "$dir/fuzz-out/$t.log"
		echo "fuzz-$t: FAILED (see $dir/fuzz-out/$t.log)"
		failed=1
	fi
done
exit $failed
