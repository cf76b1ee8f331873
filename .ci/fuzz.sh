#!/usr/bin/env bash
# Bounded fuzzing run of every target in fuzz/ (cargo-fuzz, libFuzzer).
#
#   FUZZ_SECONDS=60 bash .ci/fuzz.sh            # every target, 60 s each
#   FUZZ_SECONDS=600 bash .ci/fuzz.sh sanitize  # one target
#
# Each target starts from its seed corpus in fuzz/corpus/<target>/ (read
# only; regress_* files are reproducers of fixed bugs) and keeps what it finds
# in fuzz/target/corpus/<target>/ (not in git), with the libFuzzer dictionary
# fuzz/dict/<target>.dict when there is one.
# A crash leaves its reproducer in fuzz/artifacts/<target>/; replay it with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
# Exits non-zero if any target crashed (or failed to build).
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
TOOLCHAIN="${FUZZ_TOOLCHAIN:-nightly}"

if ! cargo "+$TOOLCHAIN" --version >/dev/null 2>&1; then
  echo "fuzz: the $TOOLCHAIN toolchain is missing (rustup toolchain install $TOOLCHAIN)" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked || exit 2
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cd fuzz && cargo "+$TOOLCHAIN" fuzz list)
fi

echo "== building ${targets[*]}"
for t in "${targets[@]}"; do
  (cd fuzz && cargo "+$TOOLCHAIN" fuzz build "$t") || { echo "fuzz: $t does not build" >&2; exit 2; }
done

logs="fuzz/target/logs"
mkdir -p "$logs"
failed=()
summary=()
for t in "${targets[@]}"; do
  work="fuzz/target/corpus/$t"
  mkdir -p "$work" "fuzz/artifacts/$t"
  dict=()
  [ -f "fuzz/dict/$t.dict" ] && dict=(-dict="dict/$t.dict")
  echo "== fuzzing $t for ${FUZZ_SECONDS}s"
  # stdin closed: nothing a config names (e.g. a secret file /dev/stdin) can block.
  (cd fuzz && cargo "+$TOOLCHAIN" fuzz run "$t" "target/corpus/$t" "corpus/$t" -- \
      -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -timeout=20 \
      -print_final_stats=1 "${dict[@]}") \
      </dev/null >"$logs/$t.log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$t.log" | tail -1 | grep -o '[0-9]*$')
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$logs/$t.log" | tail -1 | grep -o '[0-9]*$')
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    echo "fuzz: $t FAILED (exit $rc); last lines of $logs/$t.log:" >&2
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written to|^artifact_prefix' "$logs/$t.log" >&2
    tail -n 40 "$logs/$t.log" >&2
    summary+=("$t: CRASH after ${execs:-?} executions")
  else
    summary+=("$t: ok, ${execs:-?} executions (${rate:-?}/s)")
  fi
  echo "${summary[-1]}"
done

echo "== summary (FUZZ_SECONDS=$FUZZ_SECONDS)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: crashed: ${failed[*]}" >&2
  exit 1
fi
