#!/usr/bin/env bash
# Captures real Consul replies as seeds for the `decode_replies` fuzz target (and, through
# `include_bytes!`, as replies the `lock_machine` target can pick).
#
#   bash fuzz/capture-seeds.sh [out-dir]     (default: fuzz/seeds/decode_replies)
#
# Starts a throw-away dev agent on loopback ports 18577-18580 (no DNS, no gRPC), sends the requests
# a lock makes, and saves each reply exactly as `curl -si` prints it: the status line, the headers,
# a blank line, the body (see fuzz/README.md, "Seed format"). The agent is stopped on exit.
# The replies hold fresh session IDs, indexes and dates; re-running changes the files.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/fuzz/seeds/decode_replies}
mkdir -p "$out"
consul=$(bash "$root/scripts/ensure-consul.sh")
data=$(mktemp -d)
"$consul" agent -dev -http-port 18577 -dns-port -1 -serf-lan-port 18578 -serf-wan-port 18579 \
  -server-port 18580 -grpc-port -1 -bind 127.0.0.1 -client 127.0.0.1 -log-level warn \
  >"$data/agent.log" 2>&1 &
agent=$!
trap 'kill "$agent" 2>/dev/null || true; wait "$agent" 2>/dev/null || true; rm -rf "$data"' EXIT

b=http://127.0.0.1:18577/v1
for _ in $(seq 1 100); do
  if curl -sf "$b/status/leader" 2>/dev/null | grep -q 18580; then break; fi
  sleep 0.2
done
# Wait for the dev server to be able to write (a session needs the agent's node registered).
for _ in $(seq 1 100); do
  if curl -sf -X PUT "$b/session/create" -d '{"TTL":"10s"}' >/dev/null 2>&1; then break; fi
  sleep 0.2
done

flag=3304740253564472344
none=00000000-0000-0000-0000-000000000000
cap() { # name, curl arguments
  local name=$1
  shift
  curl -si "$@" >"$out/$name.http"
  printf '%-36s %s\n' "$name" "$(head -n1 "$out/$name.http" | tr -d '\r')"
}
id_of() { grep -o '"ID": *"[^"]*"' "$out/$1.http" | head -n1 | sed 's/.*"\([^"]*\)"$/\1/'; }
header() { grep -i "^$2:" "$out/$1.http" | head -n1 | tr -d '\r' | awk '{print $2}'; }
field() { grep -o "\"$2\": *[0-9]*" "$out/$1.http" | head -n1 | awk -F: '{print $2}' | tr -d ' '; }

cap session-create-200 -X PUT "$b/session/create" \
  -d '{"Name":"Consul API Lock","TTL":"15s","Behavior":"release"}'
s1=$(id_of session-create-200)
cap session-create-lockdelay0-200 -X PUT "$b/session/create" \
  -d '{"Name":"other","TTL":"10s","LockDelay":"0s","Behavior":"delete","Checks":[]}'
s2=$(id_of session-create-lockdelay0-200)
cap session-create-bad-ttl-500 -X PUT "$b/session/create" -d '{"Name":"x","TTL":"5s"}'
cap session-renew-200 -X PUT "$b/session/renew/$s1"
cap session-renew-unknown-404 -X PUT "$b/session/renew/$none"
cap session-info-200 "$b/session/info/$s2"
cap session-info-unknown-200 "$b/session/info/$none"
cap kv-get-missing-404 "$b/kv/fuzz/lock"
cap kv-acquire-true -X PUT "$b/kv/fuzz/lock?acquire=$s1&flags=$flag" --data-binary 'node-1'
cap kv-get-held-200 "$b/kv/fuzz/lock?consistent"
cap kv-acquire-other-false -X PUT "$b/kv/fuzz/lock?acquire=$s2&flags=$flag" --data-binary 'node-2'
cap kv-acquire-invalid-session-500 -X PUT "$b/kv/fuzz/lock?acquire=$none&flags=$flag"
index=$(header kv-get-held-200 X-Consul-Index)
cap kv-get-blocking-200 "$b/kv/fuzz/lock?index=$index&wait=50ms"
cap kv-release-true -X PUT "$b/kv/fuzz/lock?release=$s1&flags=$flag" --data-binary 'node-1'
cap kv-get-free-200 "$b/kv/fuzz/lock"
curl -sf -X PUT "$b/kv/fuzz/plain" -d 'hello' >/dev/null
curl -sf -X PUT "$b/kv/fuzz/empty" >/dev/null
cap kv-list-200 "$b/kv/fuzz?recurse"
cap kv-list-missing-404 "$b/kv/nothing/here?recurse"
cap kv-get-ns-400 "$b/kv/fuzz/lock?ns=team"
modify=$(field kv-get-free-200 ModifyIndex)
cap kv-cas-delete-false -X DELETE "$b/kv/fuzz/lock?cas=$((modify - 1))"
cap kv-cas-delete-true -X DELETE "$b/kv/fuzz/lock?cas=$modify"
cap kv-cas-put-true -X PUT "$b/kv/fuzz/sem/.lock?cas=0&flags=16210313421097356768" \
  -d '{"Limit":2,"Holders":{}}'
cap kv-cas-put-false -X PUT "$b/kv/fuzz/sem/.lock?cas=0&flags=16210313421097356768" \
  -d '{"Limit":2,"Holders":{}}'
cap session-destroy-true -X PUT "$b/session/destroy/$s2"
cap session-destroy-unknown-true -X PUT "$b/session/destroy/$none"
cap session-renew-destroyed-404 -X PUT "$b/session/renew/$s2"

# The lock transaction (`PUT /v1/txn`, one KV `lock` operation) the lock acquires with: granted
# (200, the entry with its indices), taken again by its holder, refused (409) because another
# session holds the key, because the session is unknown, and for the lock-delay a destroyed
# holder leaves (Consul's default 15 s).
txn() { # key, value, session
  printf '[{"KV":{"Verb":"lock","Key":"%s","Value":"%s","Flags":%s,"Session":"%s"}}]' \
    "$1" "$(printf '%s' "$2" | base64)" "$flag" "$3"
}
cap session-create-txn-200 -X PUT "$b/session/create" -d '{"Name":"Consul API Lock","TTL":"15s"}'
s3=$(id_of session-create-txn-200)
cap session-create-txn-other-200 -X PUT "$b/session/create" -d '{"Name":"other","TTL":"15s"}'
s4=$(id_of session-create-txn-other-200)
rm -f "$out/session-create-txn-200.http" "$out/session-create-txn-other-200.http"
cap txn-lock-200 -X PUT "$b/txn" --data-binary "$(txn fuzz/lock node-3 "$s3")"
cap txn-lock-again-200 -X PUT "$b/txn" --data-binary "$(txn fuzz/lock node-3 "$s3")"
cap txn-lock-held-409 -X PUT "$b/txn" --data-binary "$(txn fuzz/lock node-4 "$s4")"
cap txn-lock-invalid-session-409 -X PUT "$b/txn" --data-binary "$(txn fuzz/lock node-0 "$none")"
curl -sf -X PUT "$b/session/destroy/$s3" >/dev/null
cap txn-lock-delay-409 -X PUT "$b/txn" --data-binary "$(txn fuzz/lock node-4 "$s4")"
