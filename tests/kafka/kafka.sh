#!/usr/bin/env bash
# Apache Kafka's own broker for tickfleet's tests: KRaft combined mode (broker + controller in one JVM),
# the release pinned in pom.xml beside this script, fetched from Maven Central with `mvn` (cached in ~/.m2
# and in a jar directory), no install and no download of a distribution.
#
#   kafka.sh jars                     fetch the jars (once) and print their directory
#   kafka.sh start DIR [options]      format DIR (first start only) and start; prints the bootstrap servers
#       --host ADDR                   address of the client listener, bound and advertised (127.0.0.1);
#                                     e.g. a node address that pods of a local Kubernetes cluster reach
#       --port P                      its port (a free one)
#       --nodes N                     N combined nodes (one KRaft quorum of N voters) in DIR/node-1..N;
#                                     replication factor N, min.insync.replicas 2 when N >= 3
#       --sasl-ssl                    the client listener speaks SASL_SSL with SCRAM-SHA-512; needs
#       --tls-cert FILE --tls-key FILE   the broker's certificate and PKCS#8 key (PEM) and
#       --tls-ca FILE                 the CA (PEM) that signed it, and
#       --scram USER:PASSWORD         users (repeatable), created at format time by Kafka's StorageTool;
#                                     the first one is also the brokers' own inter-broker login
#       --config KEY=VALUE            any broker property (repeatable; wins over the defaults here)
#       --heap SIZE                   JVM heap bound per node (512m; 384m each with --nodes > 1)
#       --owner PID                   SIGKILL the broker when process PID exits (a test that dies
#                                     without cleaning up — panic, abort, SIGKILL of its whole
#                                     process group — leaves no JVM behind); the watch runs in a
#                                     session of its own, so it outlives the owner's process group
#   kafka.sh stop DIR                 SIGTERM (controlled shutdown), SIGKILL after 30 s; waits for the exit
#   kafka.sh kill DIR                 SIGKILL, waits for the exit
#   kafka.sh restart DIR              start again (stopping it first if it runs) on the same ports, config
#                                     and log dirs — data on disk survives; prints the bootstrap servers
#   kafka.sh bootstrap DIR | pid DIR  what a started DIR records
#   kafka.sh class CLASS ARGS...      run a class of the Kafka jars (e.g. org.apache.kafka.tools.ConsumerPerformance)
#   kafka.sh survivors LEDGER         the brokers recorded in LEDGER (see below) that still run, one
#                                     "PID START_TIME DIR" a line
#
# DIR is a node directory (server.properties, data/, server.log, pid, bootstrap) or, with --nodes, a
# cluster directory whose node-K subdirectories are nodes; stop/kill/restart/pid on a cluster directory act
# on every node, on DIR/node-K on that one. Only processes whose command line names DIR's own
# server.properties are ever signalled.
#
# A start that fails (a node exits or does not start in time) SIGKILLs the nodes it launched.
#
# Environment: TICKFLEET_KAFKA_JARS (jar directory, default ~/.cache/tickfleet/kafka-VERSION),
# TICKFLEET_KAFKA_START_TIMEOUT (seconds to wait for a node to start, default 120),
# TICKFLEET_KAFKA_LEDGER (a file: every JVM launched appends "PID START_TIME DIR" to it, so a test
# run can tell afterwards whether any broker it started outlived it — scripts/test.sh does).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")
jars=${TICKFLEET_KAFKA_JARS:-$HOME/.cache/tickfleet/kafka-$version}

die() { echo "kafka.sh: $*" >&2; exit 1; }

ensure_jars() {
  local stamp="$jars/.pom.sha256" want
  want=$(sha256sum "$here/pom.xml" | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    command -v mvn >/dev/null || die "mvn is missing (apt-get install maven)"
    echo "kafka.sh: fetching Apache Kafka $version with mvn into $jars" >&2
    rm -rf "$jars.tmp"
    mvn -q -B -Dstyle.color=never -f "$here/pom.xml" dependency:copy-dependencies -DoutputDirectory="$jars.tmp" >&2 \
      || die "mvn dependency:copy-dependencies failed"
    echo "$want" >"$jars.tmp/.pom.sha256"
    rm -rf "$jars"
    mv "$jars.tmp" "$jars"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (as `kafka-storage random-uuid`);
# it may start with "-", so it is passed as --cluster-id=ID.
cluster_id() { head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'; }

java_cmd() { # NODE_DIR → the JVM command line of that node, one word per line
  local dir=$1
  printf '%s\n' java "-Xms64m" "-Xmx$(cat "$dir/heap")" -XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true "-Dlog4j2.configurationFile=$here/log4j2.properties" \
    "-Dtickfleet.kafka.log=$dir/server.log" -cp "$jars/*" kafka.Kafka "$dir/server.properties"
}

# Start time of process PID (clock ticks since boot, /proc/PID/stat field 22), nothing if it is gone or
# a zombie: with the pid it names one process, whatever pid reuse happens later.
proc_start() {
  local rest f
  rest=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || return 0
  read -r -a f <<<"$rest"
  [ "${f[0]:-Z}" != Z ] || return 0
  echo "${f[19]}"
}

# The node's broker pid if it runs (and really is this node's JVM), else nothing.
node_pid() {
  local dir=$1 pid state
  pid=$(cat "$dir/pid" 2>/dev/null) || return 0
  [ -r "/proc/$pid/cmdline" ] || return 0
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
  [ "$state" = Z ] && return 0
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$dir/server.properties" || return 0
  echo "$pid"
}

nodes_of() { # DIR → its node directories
  local dir
  dir=$(cd "$1" 2>/dev/null && pwd) || die "no such directory: $1"
  if [ -f "$dir/server.properties" ]; then
    echo "$dir"
  else
    local found=0
    for n in "$dir"/node-*; do
      [ -f "$n/server.properties" ] && { echo "$n"; found=1; }
    done
    [ $found = 1 ] || die "$dir holds no broker (start it first)"
  fi
}

launch_node() { # NODE_DIR: start the JVM in the background and guard it with the owner watch
  local dir=$1 pid start owner="" owner_start=""
  [ -z "$(node_pid "$dir")" ] || die "$dir: already running (pid $(node_pid "$dir"))"
  mapfile -t cmd < <(java_cmd "$dir")
  [ ! -s "$dir/server.log" ] || mv "$dir/server.log" "$dir/server.log.1"
  [ ! -s "$dir/stdout.log" ] || mv "$dir/stdout.log" "$dir/stdout.log.1"
  setsid "${cmd[@]}" >"$dir/stdout.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$dir/pid"
  launched+=("$dir")
  start=$(proc_start "$pid")
  [ -z "${TICKFLEET_KAFKA_LEDGER:-}" ] || echo "$pid $start $dir" >>"$TICKFLEET_KAFKA_LEDGER"
  [ ! -f "$dir/owner" ] || read -r owner owner_start <"$dir/owner"
  if [ -n "$owner" ] && [ -n "$start" ]; then
    # In a session of its own: a test runner that kills the owner's whole process group (nextest
    # does on a timeout) must not take the watch with it and leave the JVM behind.
    setsid bash "$here/kafka.sh" _watch "$pid" "$start" "$owner" "$owner_start" </dev/null >/dev/null 2>&1 &
  fi
}

# _watch PID START OWNER OWNER_START: SIGKILLs the JVM (PID, START) once the owner process has exited;
# exits with the JVM.
cmd_watch() {
  local pid=$1 start=$2 owner=$3 owner_start=$4
  while [ "$(proc_start "$pid")" = "$start" ]; do
    if [ "$(proc_start "$owner")" != "$owner_start" ]; then
      kill -9 "$pid" 2>/dev/null || true
      exit 0
    fi
    sleep 1
  done
}

# Nodes this invocation launched; SIGKILLed if it fails before they all serve.
launched=()
abort_launched() {
  local n
  for n in "${launched[@]}"; do signal_node "$n" KILL 10 || true; done
}

wait_started() { # NODE_DIR
  local dir=$1 timeout=${TICKFLEET_KAFKA_START_TIMEOUT:-120} i
  for ((i = 0; i < timeout * 10; i++)); do
    if grep -q 'Kafka Server started' "$dir/server.log" 2>/dev/null; then
      return 0
    fi
    if [ -z "$(node_pid "$dir")" ]; then
      echo "kafka.sh: the broker in $dir exited while starting:" >&2
      tail -n 30 "$dir/stdout.log" "$dir/server.log" >&2 || true
      exit 1
    fi
    sleep 0.1
  done
  echo "kafka.sh: the broker in $dir did not start within ${timeout}s:" >&2
  tail -n 30 "$dir/server.log" >&2 || true
  exit 1
}

signal_node() { # NODE_DIR SIGNAL TIMEOUT_SECONDS → signals and waits; SIGKILL once the timeout passes
  local dir=$1 sig=$2 timeout=$3 pid i
  pid=$(node_pid "$dir")
  [ -n "$pid" ] || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 10; i++)); do
    [ -n "$(node_pid "$dir")" ] || return 0
    sleep 0.1
  done
  pid=$(node_pid "$dir")
  [ -z "$pid" ] || kill -9 "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    [ -n "$(node_pid "$dir")" ] || return 0
    sleep 0.1
  done
  die "$dir: pid $pid does not exit"
}

write_node() { # NODE_DIR ID → server.properties of one node (reads the start options below)
  local dir=$1 id=$2 port=$3 cport=$4 client
  mkdir -p "$dir/data"
  echo "$heap" >"$dir/heap"
  [ -z "$owner" ] || echo "$owner $owner_start" >"$dir/owner"
  if [ "$sasl_ssl" = 1 ]; then client=SASL_SSL; else client=PLAINTEXT; fi
  echo "$host:$port" >"$dir/bootstrap"
  {
    echo "# written by tests/kafka/kafka.sh: one KRaft node, broker and controller in one process"
    echo "process.roles=broker,controller"
    echo "node.id=$id"
    echo "controller.quorum.voters=$voters"
    echo "listeners=$client://$host:$port,CONTROLLER://127.0.0.1:$cport"
    echo "advertised.listeners=$client://$host:$port"
    echo "listener.security.protocol.map=$client:$client,CONTROLLER:PLAINTEXT"
    echo "controller.listener.names=CONTROLLER"
    echo "inter.broker.listener.name=$client"
    echo "log.dirs=$dir/data"
    # Topics are created on purpose (admin API, the operator or the test), never by a typo.
    echo "auto.create.topics.enable=false"
    echo "num.partitions=1"
    echo "default.replication.factor=$rf"
    echo "min.insync.replicas=$min_isr"
    echo "offsets.topic.replication.factor=$rf"
    echo "offsets.topic.num.partitions=8"
    echo "transaction.state.log.replication.factor=$rf"
    echo "transaction.state.log.min.isr=$min_isr"
    echo "transaction.state.log.num.partitions=4"
    echo "share.coordinator.state.topic.replication.factor=$rf"
    echo "share.coordinator.state.topic.min.isr=$min_isr"
    # Light on a 2-core machine shared with builds.
    echo "num.network.threads=2"
    echo "num.io.threads=2"
    echo "background.threads=2"
    echo "num.replica.fetchers=1"
    echo "num.recovery.threads.per.data.dir=1"
    echo "log.cleaner.threads=1"
    echo "log.cleaner.dedupe.buffer.size=8388608"
    # Fast group joins, and KIP-848 (group.protocol=consumer) groups that notice a dead member in
    # seconds, as the classic groups of the tests do with session.timeout.ms=6000.
    echo "group.initial.rebalance.delay.ms=0"
    echo "group.consumer.min.session.timeout.ms=6000"
    echo "group.consumer.session.timeout.ms=6000"
    echo "group.consumer.min.heartbeat.interval.ms=500"
    echo "group.consumer.heartbeat.interval.ms=1000"
    # A SIGKILLed node that restarts can register again once its old session is fenced: 4 s, not 9.
    echo "broker.heartbeat.interval.ms=1000"
    echo "broker.session.timeout.ms=4000"
    if [ "$sasl_ssl" = 1 ]; then
      local user=${scram[0]%%:*} pass=${scram[0]#*:}
      cat "$tls_key" "$tls_cert" >"$dir/keystore.pem"
      chmod 600 "$dir/keystore.pem"
      echo "sasl.enabled.mechanisms=SCRAM-SHA-512"
      echo "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512"
      echo "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"$user\" password=\"$pass\";"
      echo "ssl.keystore.type=PEM"
      echo "ssl.keystore.location=$dir/keystore.pem"
      echo "ssl.truststore.type=PEM"
      echo "ssl.truststore.location=$tls_ca"
    fi
    for kv in "${config[@]}"; do echo "$kv"; done
  } >"$dir/server.properties"
  chmod 600 "$dir/server.properties"
}

format_node() { # NODE_DIR CLUSTER_ID
  local dir=$1 id=$2 args=()
  for u in "${scram[@]}"; do
    args+=(--add-scram "SCRAM-SHA-512=[name=${u%%:*},password=${u#*:}]")
  done
  java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    "-Dlog4j2.configurationFile=$here/log4j2.properties" "-Dtickfleet.kafka.log=$dir/format.log" \
    -cp "$jars/*" kafka.tools.StorageTool format "--cluster-id=$id" -c "$dir/server.properties" "${args[@]}" \
    >"$dir/format.out" 2>&1 || { cat "$dir/format.out" >&2; die "$dir: formatting the log dirs failed"; }
}

cmd_start() {
  local dir=${1:-}
  [ -n "$dir" ] || die "usage: kafka.sh start DIR [options]"
  shift
  host=127.0.0.1 port="" nodes=1 sasl_ssl=0 tls_cert="" tls_key="" tls_ca="" heap="" owner=""
  scram=() config=()
  while [ $# -gt 0 ]; do
    case $1 in
      --host) host=$2; shift 2 ;;
      --port) port=$2; shift 2 ;;
      --nodes) nodes=$2; shift 2 ;;
      --sasl-ssl) sasl_ssl=1; shift ;;
      --tls-cert) tls_cert=$(realpath "$2"); shift 2 ;;
      --tls-key) tls_key=$(realpath "$2"); shift 2 ;;
      --tls-ca) tls_ca=$(realpath "$2"); shift 2 ;;
      --scram) scram+=("$2"); shift 2 ;;
      --config) config+=("$2"); shift 2 ;;
      --heap) heap=$2; shift 2 ;;
      --owner) owner=$2; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  if [ "$sasl_ssl" = 1 ]; then
    if [ -z "$tls_cert" ] || [ -z "$tls_key" ] || [ -z "$tls_ca" ] || [ ${#scram[@]} -eq 0 ]; then
      die "--sasl-ssl needs --tls-cert, --tls-key, --tls-ca and at least one --scram USER:PASSWORD"
    fi
  fi
  owner_start=""
  if [ -n "$owner" ]; then
    owner_start=$(proc_start "$owner")
    [ -n "$owner_start" ] || die "--owner $owner: no such process"
  fi
  [ -n "$heap" ] || { if [ "$nodes" -gt 1 ]; then heap=384m; else heap=512m; fi; }
  if [ "$nodes" -ge 3 ]; then rf=3 min_isr=2; else rf=$nodes min_isr=1; fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ -e "$dir/server.properties" ] || [ -e "$dir/node-1" ]; then
    die "$dir already holds a broker: use restart"
  fi
  ensure_jars

  local node_dirs=() ports=() cports=() i id
  for ((i = 1; i <= nodes; i++)); do
    if [ "$nodes" = 1 ]; then node_dirs+=("$dir"); else node_dirs+=("$dir/node-$i"); fi
    if [ -n "$port" ] && [ "$nodes" = 1 ]; then ports+=("$port"); else ports+=("$(free_port)"); fi
    cports+=("$(free_port)")
  done
  voters=""
  for ((i = 1; i <= nodes; i++)); do voters+="${voters:+,}$i@127.0.0.1:${cports[i - 1]}"; done
  id=$(cluster_id)
  local bootstrap="" formats=()
  for ((i = 1; i <= nodes; i++)); do
    write_node "${node_dirs[i - 1]}" "$i" "${ports[i - 1]}" "${cports[i - 1]}"
    format_node "${node_dirs[i - 1]}" "$id" &
    formats+=($!)
    bootstrap+="${bootstrap:+,}$host:${ports[i - 1]}"
  done
  for f in "${formats[@]}"; do wait "$f" || die "formatting failed"; done
  [ "$nodes" = 1 ] || echo "$bootstrap" >"$dir/bootstrap"
  trap abort_launched EXIT
  for n in "${node_dirs[@]}"; do launch_node "$n"; done
  for n in "${node_dirs[@]}"; do wait_started "$n"; done
  trap - EXIT
  echo "$bootstrap"
}

cmd_restart() {
  local dir=${1:-} n
  [ -n "$dir" ] || die "usage: kafka.sh restart DIR"
  ensure_jars
  mapfile -t ns < <(nodes_of "$dir")
  for n in "${ns[@]}"; do signal_node "$n" TERM 30; done
  trap abort_launched EXIT
  for n in "${ns[@]}"; do launch_node "$n"; done
  for n in "${ns[@]}"; do wait_started "$n"; done
  trap - EXIT
  cmd_bootstrap "$dir"
}

cmd_survivors() { # LEDGER
  local pid start dir
  [ -f "$1" ] || return 0
  while read -r pid start dir; do
    [ -n "$start" ] && [ "$(proc_start "$pid")" = "$start" ] && echo "$pid $start $dir"
  done <"$1"
  return 0
}

cmd_bootstrap() {
  local dir
  dir=$(cd "${1:?usage: kafka.sh bootstrap DIR}" && pwd)
  cat "$dir/bootstrap" 2>/dev/null || die "$dir holds no broker"
}

case ${1:-} in
  jars) ensure_jars; echo "$jars" ;;
  start) shift; cmd_start "$@" ;;
  stop) mapfile -t ns < <(nodes_of "${2:?usage: kafka.sh stop DIR}"); for n in "${ns[@]}"; do signal_node "$n" TERM 30; done ;;
  kill) mapfile -t ns < <(nodes_of "${2:?usage: kafka.sh kill DIR}"); for n in "${ns[@]}"; do signal_node "$n" KILL 10; done ;;
  restart) shift; cmd_restart "$@" ;;
  bootstrap) cmd_bootstrap "${2:-}" ;;
  survivors) cmd_survivors "${2:?usage: kafka.sh survivors LEDGER}" ;;
  _watch) shift; cmd_watch "$@" ;;
  pid) mapfile -t ns < <(nodes_of "${2:?usage: kafka.sh pid DIR}"); for n in "${ns[@]}"; do node_pid "$n"; done ;;
  class) shift; ensure_jars; exec java -Xmx256m -XX:+UseSerialGC "-Dlog4j2.configurationFile=$here/log4j2.properties" \
    "-Dtickfleet.kafka.log=/dev/null" -cp "$jars/*" "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
