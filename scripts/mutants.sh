#!/usr/bin/env bash
# Mutation testing of the machines, on demand: plants each hand mutation of scripts/mutants/*.txt
# (bugs a lock could plausibly ship with) in core/src/machine, one at a time, and runs a suite
# against it. A mutation that survives is a bug no test would catch (or, marked `survives:`, a
# change no test can tell apart). The source is restored after each.
#
#   bash scripts/mutants.sh                  # every core and simulator test (about a minute each)
#   bash scripts/mutants.sh --suite props    # the generated properties alone
#   bash scripts/mutants.sh --only renew-at-ttl --only poll-index-zero
#   bash scripts/mutants.sh --list           # check that every mutation still applies, and list
#   bash scripts/mutants.sh --cases 3000 --seed 7   # more generated cases, another (fixed) seed
#
# Do not edit the tree while it runs: it rewrites files under core/src/machine.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/mutants.py "$@"
