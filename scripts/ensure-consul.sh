#!/usr/bin/env bash
# Prints the path of a consul binary, fetching one if needed.
#
# Order: $CONSUL_BIN if set, then `consul` on PATH, then Consul 1.8.7 (MPL-2.0) from Debian's
# `bullseye` suite, cached under $CONSUL_CACHE_DIR (default ~/.cache/consul-lock) so that it is
# fetched once per machine. The archive's address is read from this machine's own apt sources; the
# machine's apt state is left untouched (a private list directory and sources file are used).
set -euo pipefail

log() { printf 'ensure-consul: %s\n' "$*" >&2; }
# shellcheck source=lib/debian-bullseye.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/debian-bullseye.sh"

use_given_or_path CONSUL_BIN consul

cache="${CONSUL_CACHE_DIR:-$HOME/.cache/consul-lock}"
bin="$cache/consul-1.8.7/usr/bin/consul"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

command -v apt-get >/dev/null 2>&1 || { log "no consul found and no apt-get to fetch one: set CONSUL_BIN"; exit 1; }

bullseye_fetch CONSUL_BIN consul
work=$BULLSEYE_WORK
deb=$(ls "$work"/consul_*.deb | head -n1)
mkdir -p "$cache"
rm -rf "$cache/consul-1.8.7.tmp"
dpkg-deb -x "$deb" "$cache/consul-1.8.7.tmp"
rm -rf "$cache/consul-1.8.7"
mv "$cache/consul-1.8.7.tmp" "$cache/consul-1.8.7"
"$bin" version >&2
echo "$bin"
