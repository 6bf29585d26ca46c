#!/usr/bin/env bash
# Prints the path of the Go contender (bench/go: Consul's Go `api` 1.8.7 Lock driven over
# bench/PROTOCOL.md), building it if needed. Logs go to stderr, the path alone to stdout.
#
# Order: $GO_CONTENDER_BIN if set; else a binary cached under $CONSUL_CACHE_DIR (default
# ~/.cache/consul-lock), keyed by a hash of bench/go/*.go and the Go version; else a build. The
# build is offline and in GOPATH mode against the Go sources Debian packages: `go` from the
# machine's own apt sources (golang-go), Consul's api 1.8.7 and its dependencies from Debian's
# `bullseye` suite, fetched once per machine into the cache without touching the machine's apt
# state (see lib/debian-bullseye.sh).
set -euo pipefail

log() { printf 'ensure-go-contender: %s\n' "$*" >&2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/debian-bullseye.sh
. "$here/lib/debian-bullseye.sh"
src="$here/../bench/go"

if [ -n "${GO_CONTENDER_BIN:-}" ]; then
  if [ -x "$GO_CONTENDER_BIN" ]; then echo "$GO_CONTENDER_BIN"; exit 0; fi
  log "GO_CONTENDER_BIN=$GO_CONTENDER_BIN is not an executable file; unset it or point it at a built bench/go"
  exit 1
fi

# The closure of github.com/hashicorp/consul/api's imports, found by building: api imports
# cleanhttp, hclog, rootcerts, mapstructure and serf/coordinate; hclog pulls in color, isatty,
# colorable and x/sys; serf/coordinate pulls in go-metrics, which needs immutable-radix and lru.
packages=(
  golang-github-hashicorp-consul-dev
  golang-github-hashicorp-go-cleanhttp-dev
  golang-github-hashicorp-go-hclog-dev
  golang-github-hashicorp-go-rootcerts-dev
  golang-github-hashicorp-serf-dev
  golang-github-mitchellh-mapstructure-dev
  golang-github-armon-go-metrics-dev
  golang-github-hashicorp-go-immutable-radix-dev
  golang-github-hashicorp-golang-lru-dev
  golang-github-fatih-color-dev
  golang-github-mattn-go-isatty-dev
  golang-github-mattn-go-colorable-dev
  golang-golang-x-sys-dev
)

# `go`: the one on PATH, else Debian's golang-go from the machine's own apt sources.
if ! command -v go >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || { log "no \`go\` on PATH and no apt-get to install it: install Go (>= 1.15) or set GO_CONTENDER_BIN"; exit 1; }
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { log "no \`go\` on PATH; installing golang-go needs root: run \`apt-get install golang-go\` as root or set GO_CONTENDER_BIN"; exit 1; }
    sudo=(sudo)
  fi
  log "no \`go\` on PATH: installing Debian's golang-go with apt-get (${sudo[*]:-as root})"
  if ! "${sudo[@]}" apt-get install -y -qq golang-go >&2; then
    log "apt-get install golang-go failed; updating the package lists and retrying"
    "${sudo[@]}" apt-get update -qq >&2 && "${sudo[@]}" apt-get install -y -qq golang-go >&2 ||
      { log "could not install golang-go: install Go yourself or set GO_CONTENDER_BIN"; exit 1; }
  fi
  command -v go >/dev/null 2>&1 || { log "golang-go is installed but \`go\` is not on PATH (is /usr/bin on PATH?)"; exit 1; }
fi

cache="${CONSUL_CACHE_DIR:-$HOME/.cache/consul-lock}"
gocode="$cache/gocode-consul-1.8.7"
outdir="$cache/go-contender"
shopt -s nullglob
sources=("$src"/*.go)
shopt -u nullglob
[ "${#sources[@]}" -gt 0 ] || { log "no Go sources in $src"; exit 1; }
key=$( { cat "${sources[@]}"; go version; printf '%s\n' "${packages[@]}"; } | sha256sum | cut -c1-16)
bin="$outdir/go-contender-$key"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

# The Go sources, once per machine. A marker file, written last, lists the packages the tree holds.
if [ "$(cat "$gocode/.packages" 2>/dev/null)" != "${packages[*]}" ]; then
  command -v apt-get >/dev/null 2>&1 || { log "no apt-get to fetch Consul's Go sources: set GO_CONTENDER_BIN"; exit 1; }
  bullseye_fetch GO_CONTENDER_BIN "${packages[@]}"
  work=$BULLSEYE_WORK
  mkdir -p "$cache"
  rm -rf "$gocode.tmp"
  for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$gocode.tmp"; done
  printf '%s\n' "${packages[*]}" > "$gocode.tmp/.packages"
  rm -rf "$gocode"
  mv "$gocode.tmp" "$gocode"
fi

# GOPATH mode: the imports resolve in Debian's tree; bench/go itself may live outside GOPATH.
log "building $bin with $(go version)"
mkdir -p "$outdir"
if ! (cd "$src" && GO111MODULE=off GOFLAGS= GOPATH="$gocode/usr/share/gocode" GOCACHE="$outdir/gocache" \
  go build -o "$bin.tmp" .) >&2; then
  rm -f "$bin.tmp"
  log "go build failed (see above); if an import is missing, add its Debian -dev package to \`packages\` in $0 and remove $gocode"
  exit 1
fi
mv "$bin.tmp" "$bin"
# Binaries of older sources are dead weight now.
find "$outdir" -maxdepth 1 -name 'go-contender-*' ! -name "${bin##*/}" -delete
echo "$bin"
