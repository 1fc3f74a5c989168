#!/usr/bin/env bash
# Start a local agentmesh cluster on 127.0.0.1 and show it working: the first node
# founds the cluster and the others join it with single-use tokens, every node finds
# every other, a replicated key written on one node is read on another, a blob put
# on the first node is fetched on the last, and a message published on one node
# reaches a subscriber on another.
#
#   scripts/devnet.sh            # 3 nodes; keeps running until Ctrl-C
#   scripts/devnet.sh --smoke    # same, then stops (used by CI)
#   NODES=5 scripts/devnet.sh    # more nodes
#
# Ports: libp2p on BASE_PORT+i (TCP and QUIC), API on API_BASE+i (defaults 4100,
# 7100). Data and logs go to DEVNET_DIR (default: a fresh temp dir).
set -euo pipefail

NODES=${NODES:-3}
BASE_PORT=${BASE_PORT:-4100}
API_BASE=${API_BASE:-7100}
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1

cd "$(dirname "$0")/.."
echo "building agentmesh (release)..."
cargo build --release --locked -q -p agentmesh
BIN=$PWD/target/release/agentmesh
OWN_DIR=0
[ -z "${DEVNET_DIR:-}" ] && OWN_DIR=1
DIR=${DEVNET_DIR:-$(mktemp -d -t agentmesh-devnet.XXXXXX)}
mkdir -p "$DIR"
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # A smoke run leaves nothing behind; an interactive one keeps its logs.
  if [ "$SMOKE" = 1 ] && [ "$OWN_DIR" = 1 ]; then rm -rf "$DIR"; fi
}
trap cleanup EXIT INT TERM

# Waits for a node's runtime file and prints the value of one of its keys.
runtime_value() { # dir key
  local file="$1/node.json"
  for _ in $(seq 200); do
    [ -f "$file" ] && break
    sleep 0.05
  done
  [ -f "$file" ] || { echo "node in $1 did not start; log:" >&2; tail -20 "$1.log" >&2; exit 1; }
  sed -n "s/^ *\"$2\": \"\(.*\)\",\{0,1\}$/\1/p" "$file"
}

BOOTSTRAP=""
for i in $(seq 1 "$NODES"); do
  port=$((BASE_PORT + i)); api=127.0.0.1:$((API_BASE + i))
  args=(start --name "node$i" --data-dir "$DIR/node$i" --api "$api"
        --listen "/ip4/127.0.0.1/tcp/$port" --listen "/ip4/127.0.0.1/udp/$port/quic-v1")
  if [ -n "$BOOTSTRAP" ]; then
    # A fresh single-use token from the founder for every joining node.
    token=$("$BIN" token --ttl 10m --api "127.0.0.1:$((API_BASE + 1))" 2>/dev/null | tail -1)
    args+=(--bootstrap "$BOOTSTRAP" --join "$token")
  fi
  rm -f "$DIR/node$i/node.json"
  "$BIN" "${args[@]}" >"$DIR/node$i.log" 2>&1 &
  PIDS+=($!)
  peer=$(runtime_value "$DIR/node$i" peer_id)
  echo "node$i  api=$api  peer=$peer"
  if [ "$i" = 1 ]; then
    for _ in $(seq 200); do curl -fs "http://$api/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
  fi
  # Each node bootstraps from the previous one: a chain, not a star.
  BOOTSTRAP="/ip4/127.0.0.1/tcp/$port/p2p/$peer"
done

API1=127.0.0.1:$((API_BASE + 1)); APIN=127.0.0.1:$((API_BASE + NODES))
echo "waiting for every node to see the other $((NODES - 1))..."
for i in $(seq 1 "$NODES"); do
  for _ in $(seq 300); do
    active=$("$BIN" peers --json --api "127.0.0.1:$((API_BASE + i))" | grep -c '"status": "active"' || true)
    [ "$active" -ge $((NODES - 1)) ] && break
    sleep 0.1
  done
  [ "$active" -ge $((NODES - 1)) ] || { echo "node$i sees only $active peers" >&2; exit 1; }
done
"$BIN" peers --api "$API1"

echo; echo "cluster: waiting for every node to be a member with a known leader..."
for i in $(seq 1 "$NODES"); do
  for _ in $(seq 300); do
    curl -fs "http://127.0.0.1:$((API_BASE + i))/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:$((API_BASE + i))/readyz" >/dev/null || { echo "node$i never became ready" >&2; exit 1; }
done
# The leader promotes learners to voters once they have caught up.
for _ in $(seq 100); do
  curl -fs "http://$API1/v1/cluster" | grep -q '"role":"learner"' || break
  sleep 0.1
done
"$BIN" cluster --api "$APIN"
echo; echo "kv: write on node$NODES, read on node1 (linearizable, from any node)"
"$BIN" kv put demo/greeting '{"hello": "mesh"}' --api "$APIN"
"$BIN" kv get demo/greeting --api "$API1" --json

echo; echo "blob: put 8 MiB on node1, get it on node$NODES"
head -c $((8 << 20)) /dev/urandom >"$DIR/sample.bin"
HASH=$("$BIN" blob put "$DIR/sample.bin" --api "$API1")
for _ in $(seq 100); do
  curl -fs "http://$APIN/v1/blobs/$HASH/providers" 2>/dev/null | grep -q '"providers":\["' && break
  sleep 0.1
done
"$BIN" blob get "$HASH" "$DIR/sample.out" --api "$APIN"
cmp "$DIR/sample.bin" "$DIR/sample.out"

echo; echo "gossip: node2 subscribes to 'hello', node1 publishes"
SUB_API=127.0.0.1:$((API_BASE + 2))
"$BIN" subscribe hello --api "$SUB_API" >"$DIR/sub.out" 2>"$DIR/sub.err" &
SUB=$!
PIDS+=("$SUB")
for _ in $(seq 200); do
  curl -fs "http://$API1/v1/topics/hello" | grep -q '"peers":\["' && break
  sleep 0.05
done
"$BIN" publish hello "hi from node1" --api "$API1" >/dev/null
for _ in $(seq 200); do
  grep -q "hi from node1" "$DIR/sub.out" && break
  sleep 0.05
done
cat "$DIR/sub.out"
grep -q "hi from node1" "$DIR/sub.out" || { echo "message not delivered" >&2; exit 1; }

echo
echo "cluster of $NODES nodes is up; data and logs in $DIR"
if [ "$SMOKE" = 1 ]; then
  echo "devnet smoke check passed"
  exit 0
fi
echo "try:  $BIN cluster --api $API1     $BIN kv list --api $APIN     $BIN peers --api $APIN"
echo "Ctrl-C stops every node."
wait "${PIDS[0]}"
