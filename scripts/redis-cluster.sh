#!/usr/bin/env bash
# A Redis Cluster on loopback for the tests: 3 primaries and 3 replicas of Debian's redis-server, no
# persistence, cluster-node-timeout REDIS_CLUSTER_NODE_TIMEOUT ms (default 15000, Redis's own: a node
# stalled by a loaded machine is not failed over; the failover tests set 1000, so a dead primary's
# replica is promoted within a few seconds).
#
#   scripts/redis-cluster.sh start DIR [N]  starts it in DIR (created), waits for cluster_state:ok, and
#                                           prints the nodes' URLs, comma-separated (seed URLs for
#                                           --redis-url). N primaries (default 3), one replica each.
#   scripts/redis-cluster.sh stop DIR       stops the nodes it started in DIR (by pid) and removes DIR
#
# Each node's pid is in DIR/NODE_PORT/pid and its log in DIR/NODE_PORT/log; DIR/ports lists the ports in
# start order (the first N were created as primaries). `redis-cli --cluster create` needs 3 primaries at
# least; with fewer (scripts/bench.sh's 1-primary cluster) the slots are assigned with CLUSTER
# ADDSLOTSRANGE and the replicas attached with CLUSTER REPLICATE.
#
# With REDIS_CLUSTER_TLS=DIR (holding ca.pem, server.pem, server.key) every node speaks only TLS, to
# clients, replicas and the cluster bus alike (--tls-cluster, --tls-replication), and requires a client
# certificate signed by that CA (the nodes present server.pem to each other); the URLs are rediss://.
set -euo pipefail

cmd=${1:?usage: redis-cluster.sh start|stop DIR}
dir=${2:?usage: redis-cluster.sh start|stop DIR}
primaries=${3:-3}
tls=${REDIS_CLUSTER_TLS:-}
node_timeout=${REDIS_CLUSTER_NODE_TIMEOUT:-15000}
tls_cli=()
node_args=()
scheme=redis
if [ -n "$tls" ]; then
  tls=$(cd "$tls" && pwd)
  tls_cli=(--tls --cacert "$tls/ca.pem" --cert "$tls/server.pem" --key "$tls/server.key")
  scheme=rediss
fi
# redis-cli with the nodes' TLS settings.
cli() { redis-cli "${tls_cli[@]}" "$@"; }

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
  dir=$(cd "$dir" && pwd) # redis-server resolves its files after chdir to --dir
  : >"$dir/ports"
  nodes=()
  ports=()
  for _ in $(seq 1 $((primaries * 2))); do
    port=$(free_port)
    mkdir -p "$dir/$port"
    if [ -n "$tls" ]; then
      node_args=(--port 0 --tls-port "$port" --tls-cluster yes --tls-replication yes
        --tls-cert-file "$tls/server.pem" --tls-key-file "$tls/server.key" --tls-ca-cert-file "$tls/ca.pem"
        --tls-auth-clients yes)
    else
      node_args=(--port "$port")
    fi
    redis-server --bind 127.0.0.1 "${node_args[@]}" --cluster-enabled yes \
      --cluster-config-file "$dir/$port/nodes.conf" --cluster-node-timeout "$node_timeout" \
      --dir "$dir/$port" --save "" --appendonly no --logfile "$dir/$port/log" --daemonize no \
      </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/$port/pid"
    echo "$port" >>"$dir/ports"
    nodes+=("127.0.0.1:$port")
    ports+=("$port")
  done
  for port in "${ports[@]}"; do
    for _ in $(seq 1 100); do
      cli -p "$port" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  for port in "${ports[@]}"; do
    cli -p "$port" ping >/dev/null 2>&1 || { echo "redis node $port did not start; see $dir/$port/log" >&2; exit 1; }
  done
  if [ "$primaries" -ge 3 ]; then
    { yes yes || true; } | cli --cluster create "${nodes[@]}" --cluster-replicas 1 >"$dir/create.log" 2>&1
  else
    # Primary i owns the i-th equal share of the 16384 slots; node primaries+i replicates primary i.
    for i in $(seq 0 $((primaries - 1))); do
      p=${ports[$i]}
      cli -p "$p" cluster set-config-epoch $((i + 1)) >/dev/null
      cli -p "$p" cluster addslotsrange $((16384 * i / primaries)) $((16384 * (i + 1) / primaries - 1)) >/dev/null
    done
    for port in "${ports[@]:1}"; do cli -p "$port" cluster meet 127.0.0.1 "${ports[0]}" >/dev/null; done
    for i in $(seq 0 $((primaries - 1))); do
      id=$(cli -p "${ports[$i]}" cluster myid)
      r=${ports[$((primaries + i))]}
      for _ in $(seq 1 100); do
        [ "$(cli -p "$r" cluster replicate "$id" 2>&1)" = OK ] && break
        sleep 0.1 # until the replica has heard of its primary through the cluster bus
      done
    done
  fi
  for port in "${ports[@]}"; do
    for _ in $(seq 1 200); do
      cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && break
      sleep 0.1
    done
    cli -p "$port" cluster info | grep -q '^cluster_state:ok' || {
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
      cli -p "$port" info replication 2>/dev/null | grep -q '^master_link_status:up' && replicas=$((replicas + 1))
    done
    [ "$replicas" -eq "$primaries" ] && break
    sleep 0.1
  done
  [ "$replicas" -eq "$primaries" ] || { echo "only $replicas of $primaries replicas in sync; see $dir" >&2; exit 1; }
  sed "s|^|$scheme://127.0.0.1:|" "$dir/ports" | paste -sd, -
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
