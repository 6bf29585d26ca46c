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

section "nftables"
# The reliability lab's network faults (bench/tests/lab.rs): nft inside the lab's own network
# namespace (Debian's nftables, fetched once per machine by scripts/ensure-nftables.sh).
NFT_BIN="${NFT_BIN:-$(bash scripts/ensure-nftables.sh)}"
export NFT_BIN
"$NFT_BIN" --version

section "fmt"
cargo fmt --all --check

section "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

section "docs"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

section "packaging"
# Every crate that goes to crates.io (all but the `publish = false` ones) must package: its
# README.md and both license files inside the package (the license copies identical to the root
# ones), README links that work on crates.io (absolute: crates.io shows a README without the
# repository around it), and a package that builds on its own. `cargo package` of several
# workspace crates at once resolves their path dependencies on each other's unpublished versions
# through a local registry of the packages just made, so verifying (building each .crate, with
# only its packaged files) works before anything is published, offline too, and catches a file
# the build needs that the package lacks. CONSUL_LOCK_PACKAGE_VERIFY=0 skips that build.
publishable=()
package_args=()
while read -r manifest; do
  grep -Eq '^publish *= *(false|\[\])' "$manifest" && continue
  crate=$(sed -n 's/^name *= *"\(.*\)"$/\1/p' "$manifest" | sed -n 1p)
  dir=$(dirname "$manifest")
  publishable+=("$crate")
  package_args+=(-p "$crate")
  files=$(cargo package --list --locked --allow-dirty -p "$crate")
  for file in README.md LICENSE-MIT LICENSE-APACHE; do
    if ! grep -qx "$file" <<<"$files"; then
      echo "error: the package of $crate lacks $file" >&2
      exit 1
    fi
  done
  for license in LICENSE-MIT LICENSE-APACHE; do
    cmp -s "$license" "$dir/$license" || { echo "error: $dir/$license differs from ./$license" >&2; exit 1; }
  done
  relative=$( { grep -oE '\]\([^)]*\)' "$dir/README.md" | sed 's/^](//; s/)$//'
                sed -n 's/^\[[^]]*\]: *//p' "$dir/README.md"; } | grep -vE '^(https?://|#)' || true)
  if [ -n "$relative" ]; then
    echo "error: $dir/README.md has links that break on crates.io (make them absolute):" >&2
    echo "$relative" >&2
    exit 1
  fi
done < <(cargo metadata --no-deps --format-version 1 --locked | grep -o '"manifest_path":"[^"]*"' | cut -d'"' -f4)
echo "publishable: ${publishable[*]}"
verify=()
if [ "${CONSUL_LOCK_PACKAGE_VERIFY:-1}" = 0 ]; then verify=(--no-verify); fi
# Cargo extracts the packages of that local registry under $CARGO_HOME/registry/src/-<hash>/,
# keyed by name and version only, and reuses what it finds there: a run after a change to a crate
# (same version, 0.1.0) would build its dependents against the stale copy of an earlier run (seen:
# the CLI's package built against a core without its new error variants). Only this workspace's
# own crates are removed from those local-registry directories (crates.io's are
# registry/src/index.crates.io-*, untouched).
for extracted in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/-*/; do
  for crate in "${publishable[@]}"; do
    rm -rf "${extracted}${crate}-"[0-9]*
  done
done
# The same goes for what the verify builds in the target directory: a registry crate is never
# rebuilt for a change of content at the same version. Cleaning our crates (every source of
# them) costs rebuilding these six, not their dependencies.
cargo clean --locked "${package_args[@]}"
cargo package --locked --allow-dirty "${verify[@]}" "${package_args[@]}"

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
