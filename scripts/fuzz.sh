#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a while (see fuzz/README.md).
#
#   bash scripts/fuzz.sh [seconds-per-target]       (default 20)
#
# - installs cargo-fuzz from crates.io when `cargo fuzz` is missing (skipped when it works);
# - builds the targets with the machine's stable toolchain: cargo-fuzz needs nightly-only flags
#   (sanitizer coverage, -Zsanitizer), which RUSTC_BOOTSTRAP=1 allows on stable;
# - for each target, copies the committed seeds (fuzz/seeds/<target>/) into its working corpus
#   (fuzz/corpus/<target>/, git-ignored) and runs it for the given time, one target at a time;
# - prints the executions per target, and exits non-zero if any target crashed (the inputs are
#   left in fuzz/artifacts/<target>/, git-ignored, with the command to reproduce them).
#
# Writes only git-ignored paths: fuzz/target, fuzz/corpus, fuzz/artifacts, fuzz/Cargo.lock.
# Environment: FUZZ_TARGETS="a b" to run only some targets; FUZZ_ARGS for extra libFuzzer flags;
# FUZZ_SANITIZER (default none): the code under test is safe Rust (core forbids unsafe), so
# AddressSanitizer finds nothing a panic wouldn't and costs about 7x the executions; panics,
# overflow checks and debug assertions stay on either way. FUZZ_SANITIZER=address to use it.
set -euo pipefail

seconds=${1:-20}
case "$seconds" in
  '' | *[!0-9]*) echo "usage: $0 [seconds-per-target]" >&2; exit 2 ;;
esac
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi
echo "fuzz: $(cargo fuzz --version), $(rustc --version)"

targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
sanitizer=${FUZZ_SANITIZER:-none}

start=$(date +%s)
if [ -n "${FUZZ_TARGETS:-}" ]; then
  for target in $targets; do cargo fuzz build -s "$sanitizer" "$target"; done
else
  cargo fuzz build -s "$sanitizer"
fi
built=$(date +%s)
echo "fuzz: build took $((built - start)) s"

declare -A execs status
failed=()
for target in $targets; do
  corpus="fuzz/corpus/$target"
  mkdir -p "$corpus" "fuzz/artifacts/$target"
  if [ -d "fuzz/seeds/$target" ]; then
    # Overwrite: a seed regenerated under the same name (the machine's protocol changed) must
    # replace the stale copy a working corpus kept from an earlier run.
    cp "fuzz/seeds/$target"/* "$corpus"/ 2>/dev/null || true
  fi
  log=$(mktemp)
  echo "fuzz: $target for ${seconds}s ($(ls "$corpus" | wc -l) inputs in $corpus)"
  set +e
  # -timeout: one input running 20 s is a hang, reported as a crash.
  # shellcheck disable=SC2086
  cargo fuzz run -s "$sanitizer" "$target" "$corpus" -- -max_total_time="$seconds" -timeout=20 -print_final_stats=1 \
    ${FUZZ_ARGS:-} >"$log" 2>&1
  rc=$?
  set -e
  execs[$target]=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  if [ "$rc" -ne 0 ]; then
    status[$target]="CRASH (exit $rc)"
    failed+=("$target")
    grep -E 'panicked|ERROR|SUMMARY|Test unit written|Reproduce with|cargo fuzz run' "$log" | head -n 30 || true
    tail -n 40 "$log" >&2
  else
    status[$target]=ok
  fi
  rm -f "$log"
done
finished=$(date +%s)

echo
printf 'fuzz: %-16s %14s  %s\n' target executions result
for target in $targets; do
  printf 'fuzz: %-16s %14s  %s\n' "$target" "${execs[$target]:-?}" "${status[$target]}"
done
echo "fuzz: build $((built - start)) s, runs $((finished - built)) s, total $((finished - start)) s"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
  exit 1
fi
