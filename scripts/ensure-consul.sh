#!/usr/bin/env bash
# Prints the path of a consul binary, fetching one if needed.
#
# Order: $CONSUL_BIN if set, then `consul` on PATH, then Consul 1.8.7 (MPL-2.0) from Debian's
# `bullseye` suite, cached under $CONSUL_CACHE_DIR (default ~/.cache/consul-lock) so that it is
# fetched once per machine. The archive's address is read from this machine's own apt sources; the
# machine's apt state is left untouched (a private list directory and sources file are used).
set -euo pipefail

log() { printf 'ensure-consul: %s\n' "$*" >&2; }

if [ -n "${CONSUL_BIN:-}" ]; then
  if [ -x "$CONSUL_BIN" ]; then echo "$CONSUL_BIN"; exit 0; fi
  log "CONSUL_BIN=$CONSUL_BIN is not an executable file; unset it or point it at a consul binary"
  exit 1
fi
if command -v consul >/dev/null 2>&1; then command -v consul; exit 0; fi

cache="${CONSUL_CACHE_DIR:-$HOME/.cache/consul-lock}"
bin="$cache/consul-1.8.7/usr/bin/consul"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

command -v apt-get >/dev/null 2>&1 || { log "no consul found and no apt-get to fetch one: set CONSUL_BIN"; exit 1; }

# The archive URI of the machine's main Debian source (deb822 or one-line format).
uri=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
  [ -n "$uri" ] && break
done
if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
  uri=$(awk '$1 == "deb" && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list)
fi
[ -n "$uri" ] || { log "could not find a Debian archive URI in /etc/apt/sources*; set CONSUL_BIN"; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/parts" "$work/archives/partial"
cat > "$work/bullseye.sources" <<SRC
Types: deb
URIs: $uri
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
apt_opts=(
  -o "Dir::Etc::SourceList=$work/bullseye.sources"
  -o "Dir::Etc::SourceParts=$work/parts"
  -o "Dir::State::Lists=$work/lists"
  -o "Dir::Cache::Archives=$work/archives"
  -o "Debug::NoLocking=1"
)
# As root, apt drops privileges to `_apt` for downloads and warns that it can't read our private
# directories; download as root instead.
if [ "$(id -u)" = 0 ]; then apt_opts+=(-o "APT::Sandbox::User=root"); fi
log "fetching consul from Debian bullseye ($uri)"
for attempt in 1 2 3; do
  if apt-get "${apt_opts[@]}" -qq update >&2 && (cd "$work" && apt-get "${apt_opts[@]}" -qq download consul >&2); then
    break
  fi
  [ "$attempt" = 3 ] && { log "apt-get could not download consul; set CONSUL_BIN"; exit 1; }
  sleep $((attempt * 5))
done
deb=$(ls "$work"/consul_*.deb | head -n1)
mkdir -p "$cache"
rm -rf "$cache/consul-1.8.7.tmp"
dpkg-deb -x "$deb" "$cache/consul-1.8.7.tmp"
rm -rf "$cache/consul-1.8.7"
mv "$cache/consul-1.8.7.tmp" "$cache/consul-1.8.7"
"$bin" version >&2
echo "$bin"
