# shellcheck shell=bash
# Fetching packages from Debian's `bullseye` suite without touching the machine's apt state.
#
# Sourced by scripts/ensure-*.sh. The archive's address is read from the machine's own apt sources;
# a private sources file, list directory and archive cache are used, so nothing under /etc/apt or
# /var/lib/apt changes. The caller defines `log` (message to stderr) before sourcing this file.

# use_given_or_path VAR PROGRAM: if $VAR is set, prints it and exits the script (failing if it is
# not an executable file); else if PROGRAM is on PATH, prints its path and exits. Returns when
# neither, for the caller to fetch one.
use_given_or_path() {
  local var=$1 program=$2 given
  given=${!var:-}
  if [ -n "$given" ]; then
    if [ -x "$given" ]; then echo "$given"; exit 0; fi
    log "$var=$given is not an executable file; unset it or point it at a $program binary"
    exit 1
  fi
  if command -v "$program" >/dev/null 2>&1; then command -v "$program"; exit 0; fi
}

# Prints the archive URI of the machine's main (non-security) Debian source, deb822 or one-line
# format; fails if there is none.
bullseye_archive_uri() {
  local f uri=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1 == "deb" && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || return 1
  printf '%s\n' "$uri"
}

# bullseye_apt_setup WORK URI: writes a private bullseye sources file and directories under WORK
# and sets the array BULLSEYE_APT_OPTS, the options that make apt-get use them.
bullseye_apt_setup() {
  local work=$1 uri=$2
  mkdir -p "$work/lists/partial" "$work/parts" "$work/archives/partial"
  cat > "$work/bullseye.sources" <<SRC
Types: deb
URIs: $uri
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  BULLSEYE_APT_OPTS=(
    -o "Dir::Etc::SourceList=$work/bullseye.sources"
    -o "Dir::Etc::SourceParts=$work/parts"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache::Archives=$work/archives"
    -o "Debug::NoLocking=1"
  )
  # As root, apt drops privileges to `_apt` for downloads and warns that it can't read our private
  # directories; download as root instead.
  if [ "$(id -u)" = 0 ]; then BULLSEYE_APT_OPTS+=(-o "APT::Sandbox::User=root"); fi
}

# bullseye_download WORK PACKAGE...: updates the private lists and downloads the packages' .debs
# into WORK (after bullseye_apt_setup WORK), retrying three times; fails if they never arrive.
bullseye_download() {
  local work=$1 attempt
  shift
  for attempt in 1 2 3; do
    if apt-get "${BULLSEYE_APT_OPTS[@]}" -qq update >&2 &&
      (cd "$work" && apt-get "${BULLSEYE_APT_OPTS[@]}" -qq download "$@" >&2); then
      return 0
    fi
    [ "$attempt" = 3 ] && return 1
    log "apt-get failed (attempt $attempt of 3); retrying"
    sleep $((attempt * 5))
  done
}

# bullseye_fetch VAR PACKAGE...: downloads the packages' .debs from bullseye into a new temporary
# directory, removed when the script exits, whose path it leaves in BULLSEYE_WORK; on failure it
# logs what to do (set VAR, the caller's variable for a ready binary) and exits the script.
bullseye_fetch() {
  local var=$1 uri
  shift
  uri=$(bullseye_archive_uri) || { log "could not find a Debian archive URI in /etc/apt/sources*; set $var"; exit 1; }
  BULLSEYE_WORK=$(mktemp -d)
  # shellcheck disable=SC2064 # the path is fixed now, on purpose
  trap "rm -rf '$BULLSEYE_WORK'" EXIT
  bullseye_apt_setup "$BULLSEYE_WORK" "$uri"
  log "fetching from Debian bullseye ($uri): $*"
  bullseye_download "$BULLSEYE_WORK" "$@" || { log "apt-get could not download $*; set $var"; exit 1; }
}
