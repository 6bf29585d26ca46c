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

section "fmt"
cargo fmt --all --check

section "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

section "docs"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

section "tests"
cargo test --workspace --locked

section "done"
echo "scripts/test.sh passed in $(( $(date +%s) - started ))s"
