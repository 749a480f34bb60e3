#!/usr/bin/env bash
# Installs what tickfleet's tests need on a fresh Debian machine, starts a real redis-server, a Redis
# Cluster (3 primaries, 3 replicas: scripts/redis-cluster.sh), PostgreSQL (scripts/postgres.sh) and
# Apache Kafka (one KRaft broker, tests/kafka/kafka.sh, fetched from Maven Central with mvn) on free
# loopback ports, builds the
# binaries, runs formatting and lint checks and every workspace test (unit, conformance and
# end-to-end), stops them all, and exits with the tests' status.
#
# TICKFLEET_TEST_KAFKA=HOST:PORT already set: the tests use that Kafka and none is started. Tests that
# kill, restart or secure a broker start dedicated ones through the same script; the dev broker
# (`tickctl dev-broker`) serves the tests that are about it. Every broker JVM the run starts is recorded
# (TICKFLEET_KAFKA_LEDGER, by pid and start time); one still running once the tests are over fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# redis-server for the store tests; openssl for the TLS tests' certificates; libssl-dev and pkg-config
# to build librdkafka and the Redis client with TLS; prometheus for the metrics proof (tests/metrics.rs
# runs a server of its own on a free loopback port; the daemon the package may start is not used)
# and promtool (alerts.yml checks and unit tests).
need=()
{ command -v redis-server && command -v redis-cli; } >/dev/null || need+=(redis-server)
command -v openssl >/dev/null || need+=(openssl)
command -v pkg-config >/dev/null || need+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
{ command -v prometheus && command -v promtool; } >/dev/null || need+=(prometheus)
# PostgreSQL for the PostgreSQL store's tests (scripts/postgres.sh runs its own server from the
# package's binaries; the cluster the package may create and start is not used).
[ -n "$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path "*/bin/initdb" 2>/dev/null)" ] && command -v psql >/dev/null || need+=(postgresql)
# A JDK and Maven for Apache Kafka (the broker is Java; its jars come from Maven Central).
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]} (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

work=$(mktemp -d)
export TICKFLEET_KAFKA_LEDGER="$work/kafka-ledger"
: >"$TICKFLEET_KAFKA_LEDGER"
redis_pid=""
cluster_dir=""
kafka_dir=""
pg_dir=""
declare -A bg_pid=()
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  for job in "${!bg_pid[@]}"; do kill "${bg_pid[$job]}" 2>/dev/null || true; wait "${bg_pid[$job]}" 2>/dev/null || true; done
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  if [ -n "$cluster_dir" ]; then bash scripts/redis-cluster.sh stop "$cluster_dir" || true; fi
  if [ -n "$kafka_dir" ]; then bash tests/kafka/kafka.sh stop "$kafka_dir" || true; fi
  if [ -n "$pg_dir" ]; then bash scripts/postgres.sh stop "$pg_dir/pg" || true; rm -rf "$pg_dir"; fi
  rm -rf "$work"
}
trap cleanup EXIT

# What mostly waits on the network (Maven Central, PyPI) runs in the background while the Rust build
# below keeps both cores busy. Fetched into empty caches, one after the other, as this script did
# before: Kafka's jars 69 s (mvn), schemathesis 79 s and the packaging tools 101 s (pip) — 249 s
# that now overlap each other and the build (minutes on an empty target). Each job's output goes to a
# log of its own, shown when the job is waited for; a job that failed fails the run there.
background() { # NAME COMMAND...
  local name=$1; shift
  "$@" >"$work/$name.log" 2>&1 &
  bg_pid[$name]=$!
}
await() { # NAME
  local name=$1 rc=0
  wait "${bg_pid[$name]}" || rc=$?
  unset "bg_pid[$name]"
  cat "$work/$name.log"
  if [ "$rc" -ne 0 ]; then echo "$name failed (exit $rc)" >&2; exit "$rc"; fi
}
# schemathesis (PyPI) for tests/rest.rs, in a venv beside the packaging tools', reinstalled when the
# pinned version changes; the run itself takes about 15 s.
st_venv=${TICKFLEET_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tickfleet}/schemathesis-venv
st_version=4.32.5
# shellcheck disable=SC2317  # run in the background by `background`
install_schemathesis() {
  if [ "$("$st_venv/bin/schemathesis" --version 2>/dev/null | grep -o '[0-9][0-9.]*' | head -1)" != "$st_version" ]; then
    log "installing schemathesis $st_version into $st_venv"
    rm -rf "$st_venv"
    mkdir -p "$(dirname "$st_venv")"
    python3 -m venv "$st_venv"
    "$st_venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$st_version"
  fi
}
log "in the background: Kafka's jars (mvn), schemathesis (pip), the packaging checks (scripts/check-packaging.sh)"
[ -n "${TICKFLEET_TEST_KAFKA:-}" ] || background kafka-jars bash tests/kafka/kafka.sh jars
background schemathesis install_schemathesis
# manifests, Helm chart, docker-compose, Dockerfile, shellcheck (no Docker needed); its venv of tools
# comes from PyPI on a first run
background packaging bash scripts/check-packaging.sh

# cargo-nextest from crates.io, built here: without its default features (self-update, which brings
# an HTTP client, rustls and aws-lc's C build, and USDT probes), neither of which a test run uses: 292
# crates instead of 334. Measured on this shared 2-core machine into empty target dirs: 1139 CPU
# seconds with the defaults, 811 without (wall time there said nothing: load 4 to 38).
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest (no default features)"
  cargo install cargo-nextest --version 0.9.151 --locked --no-default-features
fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log "starting redis-server on 127.0.0.1:$port"
redis-server --bind 127.0.0.1 --port "$port" --dir "$work" --save "" --appendonly no \
  --logfile "$work/redis.log" --daemonize no &
redis_pid=$!
for _ in $(seq 1 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -p "$port" ping >/dev/null
export TICKFLEET_TEST_REDIS_URL="redis://127.0.0.1:$port"
# The store conformance suite's cluster target and the cluster e2e tests (which start clusters of their
# own for resharding and failover) read the seed URLs from TICKFLEET_TEST_REDIS_CLUSTER_URLS (~3 s).
log "starting a Redis Cluster (3 primaries, 3 replicas) on loopback"
cluster_dir="$work/redis-cluster"
TICKFLEET_TEST_REDIS_CLUSTER_URLS=$(bash scripts/redis-cluster.sh start "$cluster_dir")
export TICKFLEET_TEST_REDIS_CLUSTER_URLS
echo "Redis Cluster at $TICKFLEET_TEST_REDIS_CLUSTER_URLS"
# PostgreSQL (initdb in a temp dir the server's user can reach, a free loopback port; ~5 s), shared by
# the conformance suite and tests/postgres.rs (each test in a schema of its own; the crash test starts
# its own server).
log "starting PostgreSQL on loopback (scripts/postgres.sh)"
pg_dir=$(mktemp -d /tmp/tickfleet-pg.XXXXXX)
chmod 711 "$pg_dir"
TICKFLEET_TEST_POSTGRES_URL=$(bash scripts/postgres.sh start "$pg_dir/pg")
export TICKFLEET_TEST_POSTGRES_URL
echo "PostgreSQL at $TICKFLEET_TEST_POSTGRES_URL"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "building the binaries the end-to-end tests run"
cargo build --workspace --bins --locked
log "the packaging checks (scripts/check-packaging.sh, run in the background)"
await packaging
if [ -z "${TICKFLEET_TEST_KAFKA:-}" ]; then
  log "Kafka's jars (tests/kafka/kafka.sh jars, fetched in the background)"
  await kafka-jars
  log "starting Apache Kafka (tests/kafka/kafka.sh, KRaft)"
  kafka_dir="$work/kafka"
  TICKFLEET_TEST_KAFKA=$(bash tests/kafka/kafka.sh start "$kafka_dir" --owner $$)
  echo "Kafka at $TICKFLEET_TEST_KAFKA (pid $(bash tests/kafka/kafka.sh pid "$kafka_dir"))"
else
  log "using the Kafka at TICKFLEET_TEST_KAFKA=$TICKFLEET_TEST_KAFKA"
fi
export TICKFLEET_TEST_KAFKA
log "schemathesis (installed in the background)"
await schemathesis
export TICKFLEET_SCHEMATHESIS="$st_venv/bin/schemathesis"
log "running the tests"
status=0
cargo nextest run --workspace --locked --profile ci || status=$?

# The operator and the pods on a real Kubernetes (tests/e2e/local-cluster.sh, about 4 minutes): run
# when the cluster kit is there (TICKFLEET_K8S_DIR, default ../shared/k8s next to the repository);
# the script itself prints "SKIP local-cluster e2e: <why>" and succeeds when it is not, or when it
# cannot have root. It stops the cluster on any exit (its trap runs cluster-down.sh) and its own
# Kafka (recorded in the ledger below like every other). Its image is made of the debug binaries
# built above (a release build of the workspace took over 50 minutes on the shared 2-core machine);
# TICKFLEET_E2E_PROFILE=release for the Dockerfile's profile.
log "Kubernetes e2e on the local cluster kit (tests/e2e/local-cluster.sh)"
TICKFLEET_E2E_PROFILE=${TICKFLEET_E2E_PROFILE:-debug} bash tests/e2e/local-cluster.sh || status=$?

# No broker JVM started by this run may outlive it: each was SIGKILLed by its test (on drop or by its
# owner watch, within a second or two of the test process exiting) or is the shared one, stopped here.
if [ -n "$kafka_dir" ]; then bash tests/kafka/kafka.sh stop "$kafka_dir"; kafka_dir=""; fi
log "checking that no broker started by this run still runs ($(wc -l <"$TICKFLEET_KAFKA_LEDGER") started)"
left=""
for _ in $(seq 1 50); do
  left=$(bash tests/kafka/kafka.sh survivors "$TICKFLEET_KAFKA_LEDGER")
  [ -n "$left" ] || break
  sleep 0.2
done
if [ -n "$left" ]; then
  echo "broker JVMs started by this run are still running (pid, start time, dir):" >&2
  echo "$left" >&2
  while read -r pid _ _; do kill -9 "$pid" 2>/dev/null || true; done <<<"$left"
  [ "$status" -ne 0 ] || status=1
fi
exit "$status"
