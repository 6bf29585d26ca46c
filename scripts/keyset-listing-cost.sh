#!/usr/bin/env bash
# What one wake of a key set's prefix watch costs on a real agent: the size and serving time of
# a `?recurse` listing of N lock keys (all keys under one folder, or a quarter of them under
# one of four), against a `?keys` listing (names only). Starts its own -dev agent on loopback.
#
#   bash scripts/keyset-listing-cost.sh [N]     (default 10000)
set -euo pipefail
N=${1:-10000}
CONSUL=${CONSUL_BIN:-$(command -v consul || echo /root/.cache/consul-lock/consul-1.8.7/usr/bin/consul)}
PORT=$((20000 + RANDOM % 20000))
DIR=$(mktemp -d)
"$CONSUL" agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$PORT" -dns-port -1 \
  -serf-lan-port $((PORT + 1)) -serf-wan-port $((PORT + 2)) -server-port $((PORT + 3)) \
  -grpc-port -1 -data-dir "$DIR" >"$DIR/agent.log" 2>&1 &
AGENT=$!
trap 'kill $AGENT 2>/dev/null; wait $AGENT 2>/dev/null; rm -rf "$DIR"' EXIT
API="http://127.0.0.1:$PORT/v1"
for _ in $(seq 100); do curl -sf "$API/status/leader" | grep -q : && break; sleep 0.1; done
SESSION=$(curl -sf -X PUT "$API/session/create" -d '{"TTL":"600s","LockDelay":"0s"}' | tr -d ' \n' | sed 's/.*"ID":"\([^"]*\)".*/\1/')
# N keys under m/f0/ .. m/f3/, locked by one session, 64 per transaction, as a key set takes them.
i=0
while [ $i -lt "$N" ]; do
  ops=""
  for j in $(seq $i $((i + 63))); do
    [ "$j" -ge "$N" ] && break
    ops="$ops{\"KV\":{\"Verb\":\"lock\",\"Key\":\"m/f$((j % 4))/shard-$j/.lock\",\"Value\":\"\",\"Flags\":3304740253564472344,\"Session\":\"$SESSION\"}},"
  done
  curl -sf -X PUT "$API/txn" -d "[${ops%,}]" >/dev/null
  i=$((i + 64))
done
measure() { # label url
  local best=999 bytes=0 t
  for _ in 1 2 3 4 5; do
    read -r t bytes < <(curl -s -o /dev/null -w '%{time_total} %{size_download}\n' "$1")
    best=$(awk -v a="$best" -v b="$t" 'BEGIN { print (b < a) ? b : a }')
  done
  printf '%-44s %10s bytes  %7.1f ms (best of 5)\n' "$2" "$bytes" "$(awk -v t="$best" 'BEGIN { print t * 1000 }')"
}
echo "$N lock keys, one session, Consul $("$CONSUL" version | head -1)"
measure "$API/kv/m/?recurse&consistent" "recurse, the common prefix (all $N)"
measure "$API/kv/m/f0/?recurse&consistent" "recurse, one of four folders ($((N / 4)))"
measure "$API/kv/m/?keys&consistent" "keys only, the common prefix (all $N)"
measure "$API/kv/m/f0/shard-0/.lock?consistent" "one key"
