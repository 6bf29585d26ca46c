#!/usr/bin/env bash
# Prints the path of an `nft` command (nftables), fetching one if needed: the reliability lab
# (consul-lock-bench lab) makes its network faults with nftables rules inside a network namespace
# of its own.
#
# Order: $NFT_BIN if set, then `nft` on PATH, then Debian's nftables 0.9.8 from the `bullseye`
# suite with the two libraries of its own it needs (libnftables1, libnftnl11), unpacked under
# $CONSUL_CACHE_DIR (default ~/.cache/consul-lock) once per machine and run through a small wrapper
# that points the loader at them (its other libraries, libmnl, libjansson, libxtables, libgmp and
# libedit, are the system's). The machine's apt state is left untouched (see lib/debian-bullseye.sh).
set -euo pipefail

log() { printf 'ensure-nftables: %s\n' "$*" >&2; }
# shellcheck source=lib/debian-bullseye.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/debian-bullseye.sh"

use_given_or_path NFT_BIN nft

cache="${CONSUL_CACHE_DIR:-$HOME/.cache/consul-lock}"
root="$cache/nftables-0.9.8"
wrapper="$root/nft"
if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then echo "$wrapper"; exit 0; fi

command -v apt-get >/dev/null 2>&1 || { log "no nft found and no apt-get to fetch one: set NFT_BIN"; exit 1; }

bullseye_fetch NFT_BIN nftables libnftables1 libnftnl11
work=$BULLSEYE_WORK
mkdir -p "$cache"
rm -rf "$root.tmp"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$root.tmp"; done
libdir=$(dirname "$(find "$root.tmp" -name 'libnftables.so.1*' | head -n1)")
[ -n "$libdir" ] && [ -x "$root.tmp/usr/sbin/nft" ] || { log "the nftables packages lack usr/sbin/nft or libnftables.so.1"; exit 1; }
cat > "$root.tmp/nft" <<WRAP
#!/bin/sh
LD_LIBRARY_PATH="${libdir/#$root.tmp/$root}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$root/usr/sbin/nft" "\$@"
WRAP
chmod +x "$root.tmp/nft"
rm -rf "$root"
mv "$root.tmp" "$root"
"$wrapper" --version >&2 || { log "the unpacked nft does not run (missing system library?); install nftables or set NFT_BIN"; exit 1; }
echo "$wrapper"
