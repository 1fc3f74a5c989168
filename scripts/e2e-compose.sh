#!/usr/bin/env bash
# End-to-end check of the docker-compose cluster on a real Docker engine: builds the image
# (scripts/docker-image.sh, no registry needed), brings the 5 nodes up, waits until they found
# one cluster, writes config, trains a model on the nodes' private shards, then kills the leader's container, cuts another node off the
# network and reconnects it, restarts a node on its volume, and checks that the cluster heals to
# one leader with every acknowledged write on every node. Cleans up with `down -v`.
#
#   scripts/e2e-compose.sh            # exit 0 when every check passed
set -euo pipefail
cd "$(dirname "$0")/.."

project=${E2E_PROJECT:-agentmesh-e2e}
export AGENTMESH_IMAGE=${AGENTMESH_IMAGE:-agentmesh:dev}
export AGENTMESH_API_PORT=${AGENTMESH_API_PORT:-17070}
deadline=$((SECONDS + ${E2E_TIMEOUT_SECS:-900}))

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  compose=(docker-compose)
fi
compose+=(-f docker/docker-compose.yml -p "$project")
nodes=(node1 node2 node3 node4 node5)

step() { printf '\n--- %s\n' "$*"; }
fail() {
  echo "FAILED: $*" >&2
  "${compose[@]}" ps >&2 || true
  for n in "${nodes[@]}"; do
    echo "---- logs of $n ----" >&2
    "${compose[@]}" logs --no-color --tail 40 "$n" >&2 || true
  done
  exit 1
}
cleanup() { "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

# `agentmesh ARGS` inside a node's container (its API key comes from the container's env).
am() {
  local node=$1
  shift
  "${compose[@]}" exec -T "$node" agentmesh "$@"
}
container() { "${compose[@]}" ps -q "$1"; }
jq_() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

# wait_for DESCRIPTION COMMAND...: retries COMMAND every second until it succeeds.
wait_for() {
  local what=$1
  shift
  local limit=$((SECONDS + 180))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > limit || SECONDS > deadline)); then
      fail "timed out waiting for $what"
    fi
    sleep 1
  done
  echo "ok: $what"
}

cluster_json() { am "$1" cluster --json; }
leader_name() {
  cluster_json "$1" | jq_ "next((m['name'] for m in d['members'] if m['leader']), '')"
}
# Every running node ready, all agreeing on one leader, with $1 active members and the
# membership settled.
healed() {
  local want=$1 leaders="" n c
  for n in "${nodes[@]}"; do
    am "$n" health --ready || return 1
    c=$(cluster_json "$n") || return 1
    leaders+="$(echo "$c" | jq_ "d['leader_peer_id'] or ''")"$'\n'
    [ "$(echo "$c" | jq_ "sum(m['state'] == 'active' for m in d['members'])")" = "$want" ] || return 1
    [ "$(echo "$c" | jq_ "d['membership_changing']")" = "False" ] || return 1
  done
  [ "$(printf '%s' "$leaders" | sort -u | grep -c .)" = 1 ]
}

written=()
write() {
  local node=$1 key=$2
  if am "$node" kv put "$key" "\"$node\"" >/dev/null; then
    written+=("$key")
  else
    fail "kv put $key on $node"
  fi
}
# Every acknowledged write is readable on every node.
all_writes_everywhere() {
  local n keys k
  for n in "${nodes[@]}"; do
    keys=$(am "$n" kv list --prefix e2e/ --json | jq_ "'\n'.join(e['key'] for e in d)") || return 1
    for k in "${written[@]}"; do
      grep -qx "$k" <<<"$keys" || { echo "$k missing on $n"; return 1; }
    done
  done
}

step "image"
scripts/docker-image.sh

step "bring up 5 nodes (bootstrap-expect 3, shared cluster key)"
cleanup
"${compose[@]}" up -d
wait_for "5 members, one leader, every node ready" healed 5
host_status=$(target/release/agentmesh cluster \
  --api "127.0.0.1:$AGENTMESH_API_PORT" --api-key-file docker/dev-secrets/api.key)
echo "$host_status"
grep -q "leader:" <<<"$host_status" || fail "node1's published API"

step "write config through every node"
for i in 1 2 3 4 5; do write "node$i" "e2e/a$i"; done

step "train a model on the nodes' private shards"
trainers() { [ "$(cluster_json node1 | jq_ "len(d['trainers'])")" = 5 ]; }
wait_for "5 trainers registered" trainers
job=$(am node2 job submit --aggregator trimmed_mean --trim-ratio 0.2 --rounds 10 \
  --min-participants 4 --round-timeout-secs 30 --json | jq_ "d['id']") || fail "job submit"
echo "job $job"
job_json() { am node1 job status "$job" --json; }
job_done() { [ "$(job_json | jq_ "d['state']")" = done ]; }
wait_for "job $job to finish 10 rounds" job_done
accuracy=$(job_json | jq_ "d['last_round']['accuracy']")
echo "held-out accuracy after 10 rounds: $accuracy"
python3 -c "import sys; sys.exit(0 if float('$accuracy') >= 0.85 else 1)" ||
  fail "job accuracy $accuracy < 0.85"
am node3 job verify "$job" || fail "job verify on node3"

step "start a long job to run through the failures below"
job2=$(am node1 job submit --aggregator median --rounds 120 --min-participants 3 \
  --round-timeout-secs 10 --json | jq_ "d['id']") || fail "job submit"
echo "job $job2"
job2_started() { [ "$(am node1 job status "$job2" --json | jq_ "d['rounds_done']")" -ge 1 ]; }
wait_for "job $job2 under way" job2_started

step "docker kill the leader"
leader=$(leader_name node1)
[ -n "$leader" ] || fail "no leader known"
echo "leader is $leader"
docker kill "$(container "$leader")" >/dev/null
survivor=node1
[ "$leader" = node1 ] && survivor=node2
new_leader() {
  local l
  l=$(leader_name "$survivor")
  [ -n "$l" ] && [ "$l" != "$leader" ]
}
wait_for "a new leader without $leader" new_leader
for i in 1 2 3; do write "$survivor" "e2e/b$i"; done
docker start "$(container "$leader")" >/dev/null
wait_for "the old leader back and following" healed 5

step "disconnect a node from the network, write, reconnect"
cut=node3
[ "$(leader_name node1)" = node3 ] && cut=node4
network="${project}_mesh"
docker network disconnect "$network" "$(container "$cut")"
for i in 1 2 3; do write node1 "e2e/c$i"; done
docker network connect --alias "$cut" "$network" "$(container "$cut")"
wait_for "$cut reconnected and caught up" all_writes_everywhere

step "restart a node on its volume"
restart=node5
peer_before=$(am "$restart" status --json | jq_ "d['peer_id']")
"${compose[@]}" restart "$restart" >/dev/null
wait_for "$restart back as itself" healed 5
peer_after=$(am "$restart" status --json | jq_ "d['peer_id']")
[ "$peer_before" = "$peer_after" ] || fail "$restart came back as $peer_after, not $peer_before"
write "$restart" e2e/d1

step "the long job finishes"
job2_done() { [ "$(am node1 job status "$job2" --json | jq_ "d['state']")" = done ]; }
wait_for "job $job2 to finish 120 rounds" job2_done
am node1 job status "$job2" --json |
  jq_ "'{} rounds, {} failed attempts, accuracy {:.3f}'.format(d['rounds_done'], sum(1 for r in d['history'] if r['failed']), d['last_round']['accuracy'])"

step "final state"
wait_for "one leader and 5 members" healed 5
wait_for "all ${#written[@]} acknowledged writes on every node" all_writes_everywhere
echo
echo "e2e-compose passed: 5-node cluster founded by key; trained a model to $accuracy on private"
echo "shards (verified on another node); a 120-round job finished through killing the leader ($leader),"
echo "disconnecting $cut and restarting $restart; ${#written[@]} acknowledged writes on every node"
