#!/usr/bin/env bash
# Replicated-write benchmark: a 3-voter agentmesh cluster and a 3-member etcd
# cluster on 127.0.0.1, the same closed-loop load (wrk, one request in flight per
# connection, a fresh key and a 256-byte value per request) at 1, 16 and 64
# clients, sent to each cluster's leader. Prints writes/s and p50/p99 latency side
# by side, with the CPU time the three members of each cluster used per write
# (user + system, all three processes). Needs etcd (Debian: etcd-server) and wrk.
#
#   scripts/kvbench.sh                 # 10 s per run
#   DURATION=30s scripts/kvbench.sh
#   AGENTMESH_BIN=/path/to/agentmesh scripts/kvbench.sh   # another build, for an A/B
#   CLIENTS="1 16" scripts/kvbench.sh
#   KEEP=1 AGENTMESH_LOG=info scripts/kvbench.sh  # the nodes' RUST_LOG; keep their logs
set -euo pipefail

DURATION=${DURATION:-10s}
CLIENTS=${CLIENTS:-"1 16 64"}
cd "$(dirname "$0")/.."
for tool in etcd wrk curl; do
  command -v "$tool" >/dev/null || { echo "kvbench needs $tool (apt-get install etcd-server wrk curl)" >&2; exit 1; }
done
if [ -n "${AGENTMESH_BIN:-}" ]; then
  BIN=$(realpath "$AGENTMESH_BIN")
else
  cargo build --release --locked -q -p agentmesh
  BIN=$PWD/target/release/agentmesh
fi
DIR=$(mktemp -d -t agentmesh-kvbench.XXXXXX)
PIDS=()
ETCD_PIDS=()
AM_PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "logs kept in $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT INT TERM

wait_for() { # what command...
  local what=$1; shift
  for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for $what" >&2; exit 1
}

# etcd: 3 members, default durability (WAL fsync before acknowledging).
CLUSTER=""
for i in 1 2 3; do CLUSTER+="e$i=http://127.0.0.1:$((12380 + i)),"; done
CLUSTER=${CLUSTER%,}
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$DIR/etcd$i" \
    --listen-peer-urls "http://127.0.0.1:$((12380 + i))" --initial-advertise-peer-urls "http://127.0.0.1:$((12380 + i))" \
    --listen-client-urls "http://127.0.0.1:$((12370 + i))" --advertise-client-urls "http://127.0.0.1:$((12370 + i))" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new --log-level error >"$DIR/etcd$i.log" 2>&1 &
  PIDS+=($!)
  ETCD_PIDS+=($!)
done
etcd_leader=""
for _ in $(seq 300); do
  for i in 1 2 3; do
    st=$(curl -fs -X POST "http://127.0.0.1:$((12370 + i))/v3/maintenance/status" -d '{}' 2>/dev/null || true)
    me=$(echo "$st" | sed -n 's/.*"member_id":"\([0-9]*\)".*/\1/p')
    leader=$(echo "$st" | sed -n 's/.*"leader":"\([0-9]*\)".*/\1/p')
    if [ -n "$me" ] && [ "$me" = "$leader" ]; then etcd_leader="127.0.0.1:$((12370 + i))"; fi
  done
  [ -n "$etcd_leader" ] && break
  sleep 0.1
done
[ -n "$etcd_leader" ] || { echo "etcd elected no leader" >&2; tail "$DIR"/etcd*.log >&2; exit 1; }

# agentmesh: node 1 founds, 2 and 3 join with tokens; node 1 stays the leader.
for i in 1 2 3; do
  args=(start --name "k$i" --data-dir "$DIR/k$i" --api "127.0.0.1:$((12270 + i))"
        --listen "/ip4/127.0.0.1/tcp/$((12260 + i))")
  if [ "$i" -gt 1 ]; then
    token=$("$BIN" token --api 127.0.0.1:12271 2>/dev/null | tail -1)
    peer=$(sed -n 's/^ *"peer_id": "\(.*\)",$/\1/p' "$DIR/k1/node.json")
    args+=(--bootstrap "/ip4/127.0.0.1/tcp/12261/p2p/$peer" --join "$token")
  fi
  RUST_LOG=${AGENTMESH_LOG:-warn} "$BIN" "${args[@]}" >"$DIR/k$i.log" 2>&1 &
  PIDS+=($!)
  AM_PIDS+=($!)
  wait_for "k$i" curl -fs "http://127.0.0.1:$((12270 + i))/readyz"
done
wait_for "three voters" sh -c "curl -fs http://127.0.0.1:12271/v1/cluster | grep -q '\"voters\":\[\"[0-9a-f]*\",\"[0-9a-f]*\",\"[0-9a-f]*\"\]'"

cpu_ticks() { # pids... -> user+system clock ticks used so far
  local t=0 pid
  for pid in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done
  echo "$t"
}

run() { # url script clients pids... -> "writes/s p50 p99 cpu-µs-per-write"
  local out url=$1 script=$2 clients=$3
  shift 3
  local t0
  t0=$(cpu_ticks "$@")
  out=$(wrk -t "$(( clients < 2 ? 1 : 2 ))" -c "$clients" -d "$DURATION" --latency -s "$script" "$url" 2>&1)
  if echo "$out" | grep -q "Non-2xx"; then echo "errors in run: $out" >&2; exit 1; fi
  local rps p50 p99
  rps=$(echo "$out" | awk '/Requests\/sec/ {printf "%.0f", $2}')
  p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  local ticks requests
  ticks=$(( $(cpu_ticks "$@") - t0 ))
  requests=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$rps $p50 $p99 $(awk -v t="$ticks" -v n="$requests" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.0f", t / hz * 1e6 / n }')"
}

printf "%-8s | %-35s | %-35s | %s\n" clients "agentmesh writes/s p50 p99 cpu/write" "etcd writes/s p50 p99 cpu/write" "ratio"
for c in $CLIENTS; do
  read -r a_rps a_p50 a_p99 a_cpu < <(run "http://127.0.0.1:12271" scripts/bench/agentmesh_put.lua "$c" "${AM_PIDS[@]}")
  read -r e_rps e_p50 e_p99 e_cpu < <(run "http://$etcd_leader" scripts/bench/etcd_put.lua "$c" "${ETCD_PIDS[@]}")
  ratio=$(awk -v a="$a_rps" -v e="$e_rps" 'BEGIN { printf "%.2fx", a / e }')
  printf "%-8s | %8s %8s %8s %6sµs | %8s %8s %8s %6sµs | %s\n" "$c" "$a_rps" "$a_p50" "$a_p99" "$a_cpu" "$e_rps" "$e_p50" "$e_p99" "$e_cpu" "$ratio"
done
