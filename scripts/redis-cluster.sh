#!/usr/bin/env bash
# A Redis Cluster on loopback for the tests: 3 primaries and 3 replicas of Debian's redis-server, no
# persistence, cluster-node-timeout 1000 ms (a dead primary's replica is promoted within a few seconds).
#
#   scripts/redis-cluster.sh start DIR   starts it in DIR (created), waits for cluster_state:ok, and prints
#                                        the nodes' URLs, comma-separated (seed URLs for --redis-url)
#   scripts/redis-cluster.sh stop DIR    stops the nodes it started in DIR (by pid) and removes DIR
#
# Each node's pid is in DIR/NODE_PORT/pid and its log in DIR/NODE_PORT/log; DIR/ports lists the ports in
# start order (the first three were created as primaries).
set -euo pipefail

cmd=${1:?usage: redis-cluster.sh start|stop DIR}
dir=${2:?usage: redis-cluster.sh start|stop DIR}

# A free port below 55536 whose cluster-bus port (port + 10000) is free too.
free_port() {
  python3 -c '
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    if p > 55535:
        continue
    try:
        b = socket.socket(); b.bind(("127.0.0.1", p + 10000)); b.close()
    except OSError:
        continue
    print(p); break'
}

case "$cmd" in
start)
  mkdir -p "$dir"
  : >"$dir/ports"
  nodes=()
  ports=()
  for _ in 1 2 3 4 5 6; do
    port=$(free_port)
    mkdir -p "$dir/$port"
    redis-server --bind 127.0.0.1 --port "$port" --cluster-enabled yes \
      --cluster-config-file "$dir/$port/nodes.conf" --cluster-node-timeout 1000 \
      --dir "$dir/$port" --save "" --appendonly no --logfile "$dir/$port/log" --daemonize no \
      </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/$port/pid"
    echo "$port" >>"$dir/ports"
    nodes+=("127.0.0.1:$port")
    ports+=("$port")
  done
  for port in "${ports[@]}"; do
    for _ in $(seq 1 100); do
      redis-cli -p "$port" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  for port in "${ports[@]}"; do
    redis-cli -p "$port" ping >/dev/null 2>&1 || { echo "redis node $port did not start; see $dir/$port/log" >&2; exit 1; }
  done
  { yes yes || true; } | redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 >"$dir/create.log" 2>&1
  for port in "${ports[@]}"; do
    for _ in $(seq 1 200); do
      redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && break
      sleep 0.1
    done
    redis-cli -p "$port" cluster info | grep -q '^cluster_state:ok' || {
      echo "redis cluster did not come up (node $port); see $dir" >&2
      exit 1
    }
  done
  # Every replica attached and its replication link up (initial sync done), so a failover test starts
  # from a replicated cluster: a replica that never synced cannot be promoted.
  replicas=0
  for _ in $(seq 1 300); do
    replicas=0
    for port in "${ports[@]}"; do
      redis-cli -p "$port" info replication 2>/dev/null | grep -q '^master_link_status:up' && replicas=$((replicas + 1))
    done
    [ "$replicas" -eq 3 ] && break
    sleep 0.1
  done
  [ "$replicas" -eq 3 ] || { echo "only $replicas of 3 replicas in sync; see $dir" >&2; exit 1; }
  sed 's|^|redis://127.0.0.1:|' "$dir/ports" | paste -sd, -
  ;;
stop)
  [ -d "$dir" ] || exit 0
  for pidfile in "$dir"/*/pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
  done
  for pidfile in "$dir"/*/pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  rm -rf "$dir"
  ;;
*)
  echo "usage: redis-cluster.sh start|stop DIR" >&2
  exit 2
  ;;
esac
