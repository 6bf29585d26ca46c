#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, docs, and every test, with a real Consul
# agent (fetched once per machine if none is installed). Run from anywhere in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
section() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }

section "toolchain"
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    rustup component add "$component" || echo "warning: could not add $component" >&2
  fi
done
cargo --version

section "consul"
CONSUL_BIN="${CONSUL_BIN:-$(bash scripts/ensure-consul.sh)}"
export CONSUL_BIN
"$CONSUL_BIN" version | sed -n 1p  # not head: consul would die of SIGPIPE (pipefail)

section "go reference client"
# The Go lock the benchmark suite's smoke test runs beside ours (bench/go, built from Debian's Go
# and Consul api packages; see scripts/ensure-go-contender.sh).
GO_CONTENDER_BIN="${GO_CONTENDER_BIN:-$(bash scripts/ensure-go-contender.sh)}"
export GO_CONTENDER_BIN

section "fmt"
cargo fmt --all --check

section "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

section "docs"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

section "tests"
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$test_log"

section "core benchmark (smoke)"
# Criterion runs each benchmark once when not given --bench (the figures: cargo bench).
cargo test -p consul-lock-bench --bench core_machine --locked

section "fuzz crate tests"
# The fuzz crate's own tests (its machine drivers on random runs through the invariant checker, the
# decoder oracle on real replies): fuzz/ is a workspace of its own, outside `cargo test
# --workspace`. They run whatever CONSUL_LOCK_FUZZ_SECONDS says (0 skips only the fuzzing below).
(cd fuzz && cargo test --lib) 2>&1 | tee -a "$test_log"

section "fuzz (smoke)"
# A short run of every cargo-fuzz target (longer runs: bash scripts/fuzz.sh <seconds>).
# CONSUL_LOCK_FUZZ_SECONDS=0 skips it.
fuzz_seconds="${CONSUL_LOCK_FUZZ_SECONDS:-15}"
if [ "$fuzz_seconds" -gt 0 ]; then
  bash scripts/fuzz.sh "$fuzz_seconds"
fi

section "done"
echo "scripts/test.sh passed in $(( $(date +%s) - started ))s"
# The tally of every `cargo test` result line, as the closing line.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$test_log"
