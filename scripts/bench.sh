#!/usr/bin/env bash
# Measures tickfleet's ingest against the machine's ceilings and a peer, all in one run on one machine:
#   1. redis-benchmark: pipelined ZADD on the same Redis (the store's ceiling);
#   2+3. on two brokers, the same backlog (TICKS ticks over ASSETS assets in PARTITIONS partitions) on
#      each: the dev broker (librdkafka's mock cluster, `tickctl dev-broker`) and Apache Kafka (one KRaft
#      node, tests/kafka/kafka.sh, the release the tests use), REPEAT rounds, the brokers alternating
#      within a round so both see the same machine:
#      - tickctl bench ingest: 1 and 2 tickfleet-worker processes storing the backlog;
#      - tickctl bench consume: librdkafka's raw consume rate of the backlog (the Kafka side's ceiling);
#      - on Apache Kafka also the broker's own consumer tool on the same topic,
#        org.apache.kafka.tools.ConsumerPerformance (kafka-consumer-perf-test), its fetch rate;
#      medians over the rounds are reported, and ratios of medians;
#   4. scripts/bench_peer.py: a plain Python consumer (confluent-kafka + redis-py) storing it too;
#   5. memory: 1 worker on a backlog of several million ticks (64 partitions), peak RSS;
#   6. the api: GetLatest flat out and at 5k rps, REST GET /v1/prices/latest at 5k rps, ListTicks(limit
#      1000), 16 clients, over what the last
#      ingest stored;
#   7. candle rollups (tickctl bench rollups, one client on the same Redis): the store's write of the
#      same ROLLUP_WRITE_TICKS ticks of one asset in batches of 500 with the pre-rollup raw-ticks script
#      and with rollups (ticks/s, Redis CPU per tick), then GetCandles 1m over a day of ROLLUP_TICKS ticks
#      of one asset through the api on loopback (p50/p99 of 100 queries) and the same candles computed
#      the way the api did before rollups (every raw tick read and folded; 3 runs).
#      7b. ingest with and without rollups on the same dev-broker backlog (TICKS ticks over ASSETS
#      assets): tickctl bench ingest, 1 and 2 workers, with this tree's worker and with the worker of
#      ROLLUP_BASELINE (default 30abb5a, the commit before rollups landed; built from a git worktree
#      into the same target dir, so only tickfleet's own crates compile twice), REPEAT rounds, the two
#      alternating within a round (ROLLUP_BASELINE_WORKER: that worker, already built, instead);
#   8. Redis Cluster (scripts/redis-cluster.sh): one cluster of 1 primary and one of 3 primaries, each
#      primary with one replica, beside the standalone Redis; CLUSTER_WORKERS workers store the same
#      dev-broker backlog on each, at 0 and at 1 replica acks (--redis-min-replica-acks, WAIT 1 after
#      every batch), REPEAT rounds. Per run: ticks/s, each node's CPU (INFO cpu before and after) and
#      the ticks it holds (SCAN + ZCARD of the run's keys), so Redis CPU per tick per primary; and the
#      workers' mean store-write latency per batch (the cost of WAIT 1 is the difference); cluster.md.
#   9. PostgreSQL (a server of the run's own, scripts/postgres.sh): on the dev broker, one backlog of TICKS
#      ticks stored by 1 and 2 workers with --store redis, --store postgres and --store both, REPEAT rounds,
#      the stores alternating within a round; and PostgreSQL's own ceiling for the same insert shape:
#      pgbench (1 and 2 clients, PG_SECONDS each) running one multi-row INSERT ... ON CONFLICT DO NOTHING
#      of BATCH ticks (the worker's --batch-size default) into a table made by the store's own migration.
# Results go to bench-results/<timestamp>/ (summary.md has the table quoted in BENCHMARKS.md).
# Settings: TICKS (default 1000000), ASSETS (100), PARTITIONS (16), BIG_TICKS (4000000), REPEAT (3),
# ROLLUP_TICKS (5000000), ROLLUP_WRITE_TICKS (1000000), ROLLUP_BASELINE (30abb5a), CLUSTER_WORKERS (2), BATCH (1000), PG_SECONDS (15),
# PART (all; brokers: only steps 2+3; api: only step 6, after an ingest of API_TICKS (200000) ticks by 1 worker;
# rollups: only step 7; cluster: only step 8; postgres: only step 9), PROFILE (release, or debug: the debug binaries of
# `cargo build --workspace --bins`, where a release build is not possible; absolute figures then say
# little, ratios between the brokers still do).
set -euo pipefail
cd "$(dirname "$0")/.."

TICKS=${TICKS:-1000000}
ASSETS=${ASSETS:-100}
PARTITIONS=${PARTITIONS:-16}
BIG_TICKS=${BIG_TICKS:-4000000}
REPEAT=${REPEAT:-3}
ROLLUP_TICKS=${ROLLUP_TICKS:-5000000}
ROLLUP_WRITE_TICKS=${ROLLUP_WRITE_TICKS:-1000000}
ROLLUP_BASELINE=${ROLLUP_BASELINE:-30abb5a}
PART=${PART:-all}
API_TICKS=${API_TICKS:-200000}
PROFILE=${PROFILE:-release}
CLUSTER_WORKERS=${CLUSTER_WORKERS:-2}
BATCH=${BATCH:-1000}
PG_SECONDS=${PG_SECONDS:-15}
# Where cargo builds (honours CARGO_TARGET_DIR, as cargo does), made absolute for the baseline build.
target_dir=$(realpath -m "${CARGO_TARGET_DIR:-target}")
case $PART in all | brokers | api | rollups | cluster | postgres) ;; *) echo "PART is all, brokers, api, rollups, cluster or postgres" >&2; exit 2 ;; esac
log() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi
venv="$HOME/.cache/tickfleet/bench-venv"
if [ "$PART" = all ] && [ ! -x "$venv/bin/python" ]; then
  log "creating the peer's Python environment ($venv)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q confluent-kafka redis grpcio-tools
fi

if { [ "$PART" = all ] || [ "$PART" = rollups ]; } && [ -n "${ROLLUP_BASELINE_WORKER:-}" ]; then
  baseline_worker="$(mktemp -d)/tickfleet-worker-before-rollups"
  cp "$ROLLUP_BASELINE_WORKER" "$baseline_worker"
elif [ "$PART" = all ] || [ "$PART" = rollups ]; then
  # 7b's "without rollups" worker, built first: the build of this tree below then has the last word
  # on target/$PROFILE/tickfleet-worker.
  log "building the worker of $ROLLUP_BASELINE (before rollups) for 7b"
  base_tree=$(mktemp -d)
  git worktree add --detach "$base_tree" "$ROLLUP_BASELINE" >/dev/null
  profile_flag=(); [ "$PROFILE" = release ] && profile_flag=(--release)
  (cd "$base_tree" && CARGO_TARGET_DIR="$target_dir" cargo build --locked "${profile_flag[@]}" --bin tickfleet-worker -p tickfleet-worker)
  baseline_worker="$(mktemp -d)/tickfleet-worker-before-rollups"
  cp "$target_dir/$PROFILE/tickfleet-worker" "$baseline_worker"
  git worktree remove --force "$base_tree"
fi
if [ "$PROFILE" = release ] && [ "$PART" = rollups ]; then
  log "building the release tickctl and worker (PART=rollups needs nothing else)"
  cargo build --release --locked --bin tickctl -p tickfleet-cli --bin tickfleet-worker -p tickfleet-worker
  bin=$target_dir/release
elif [ "$PROFILE" = release ] && [ "$PART" = postgres ]; then
  log "building the release tickctl and tickfleet-worker (PART=postgres needs nothing else)"
  cargo build --release --locked --bin tickctl --bin tickfleet-worker -p tickfleet-cli -p tickfleet-worker
  bin=$target_dir/release
elif [ "$PROFILE" = release ]; then
  log "building release binaries"
  cargo build --release --locked --bins -p tickfleet-cli -p tickfleet-worker -p tickfleet-api
  bin=$target_dir/release
else
  log "building debug binaries (PROFILE=$PROFILE)"
  cargo build --locked --workspace --bins
  bin=$target_dir/debug
fi
tickctl=$bin/tickctl

out="bench-results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
pids=()
kafka_dir="$out/kafka"
pg_dir=""
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -d "$kafka_dir" ]; then bash tests/kafka/kafka.sh stop "$kafka_dir" || true; rm -rf "$kafka_dir/data"; fi
  for c in "$out/cluster1" "$out/cluster3"; do
    if [ -d "$c" ]; then bash scripts/redis-cluster.sh stop "$c" || true; fi
  done
  if [ -n "$pg_dir" ]; then bash scripts/postgres.sh stop "$pg_dir/pg" || true; rm -rf "$pg_dir"; fi
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --daemonize no >"$out/redis.log" 2>&1 &
pids+=($!)
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
redis="redis://127.0.0.1:$port"

# every part uses the dev broker (rollups: step 7b)
"$tickctl" dev-broker --topic "bench:$PARTITIONS" --topic big:64 --topic "pgbench:$PARTITIONS" \
  --topic "rollup-ingest:$PARTITIONS" --bootstrap-file "$out/bootstrap" >/dev/null &
pids+=($!)
until [ -s "$out/bootstrap" ]; do sleep 0.1; done
brokers=$(cat "$out/bootstrap")
if [ "$PART" = all ] || [ "$PART" = brokers ]; then
log "starting Apache Kafka (tests/kafka/kafka.sh) with topic bench ($PARTITIONS partitions)"
kafka=$(bash tests/kafka/kafka.sh start "$kafka_dir" --owner $$)
bash tests/kafka/kafka.sh class org.apache.kafka.tools.TopicCommand --bootstrap-server "$kafka" --create \
  --topic bench --partitions "$PARTITIONS" >/dev/null
kafka_version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' tests/kafka/pom.xml)
else
kafka_version="(not run: PART=$PART)"
fi
pg_version="(not run: PART=$PART)"
if [ "$PART" = all ] || [ "$PART" = postgres ]; then
  log "starting PostgreSQL (scripts/postgres.sh: fsync off, synchronous_commit on, as in the tests)"
  # A directory the server's user can reach when this runs as root.
  pg_dir=$(mktemp -d /tmp/tickfleet-bench-pg.XXXXXX)
  chmod 711 "$pg_dir"
  pg=$(bash scripts/postgres.sh start "$pg_dir/pg")
  pg_version=$(psql "$pg" -XAtc 'SHOW server_version')
fi

{
  echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
  echo "cpu: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
  if [ "$PART" = cluster ]; then
    echo "redis: $(redis-server --version | awk '{print $3}'), broker: librdkafka mock cluster (tickctl dev-broker), $PARTITIONS partitions"
  else
    echo "redis: $(redis-server --version | awk '{print $3}'), brokers: librdkafka mock cluster (tickctl dev-broker) and Apache Kafka $kafka_version (one KRaft node, $(java -version 2>&1 | head -1)), $PARTITIONS partitions"
  fi
  echo "postgresql: $pg_version (scripts/postgres.sh: fsync=off, full_page_writes=off, synchronous_commit on); batch $BATCH"
  if [ "$PART" = api ]; then
    echo "binaries: $PROFILE; PART=api; the api serves $API_TICKS ticks over $ASSETS assets"
  else
    echo "binaries: $PROFILE; PART=$PART; $REPEAT rounds; $TICKS ticks over $ASSETS assets; rollups: $ROLLUP_TICKS ticks of one asset"
  fi
  echo "load during the run: $(cat /proc/loadavg)"
} >"$out/machine.txt"

if [ "$PART" = all ]; then
  log "1. Redis ceiling: redis-benchmark pipelined ZADD (-P 64)"
  redis-benchmark -p "$port" -P 64 -n 2000000 -r 1000000 -q ZADD bench:ceiling __rand_int__ member:__rand_int__ \
    | tee "$out/redis-benchmark.txt"
fi

if [ "$PART" = all ] || [ "$PART" = brokers ]; then
declare -A addr=([mock]="$brokers" [kafka]="$kafka")
for round in $(seq 1 "$REPEAT"); do
  for b in mock kafka; do
    log "2+3. round $round/$REPEAT, $b: 1 and 2 workers store the backlog; raw consume"
    skip=()
    if [ "$round" = 1 ]; then
      log "producing $TICKS ticks over $ASSETS assets to $b"
    else
      skip=(--skip-produce)
    fi
    # Redis holds one run's ticks at a time (the last run's stay for step 6).
    redis-cli -p "$port" flushall >/dev/null
    "$tickctl" bench ingest --brokers "${addr[$b]}" --topic bench --redis "$redis" --ticks "$TICKS" \
      --assets "$ASSETS" --workers 1,2 "${skip[@]}" --json "$out/ingest-$b-$round.json" | tee -a "$out/ingest-$b.txt"
    "$tickctl" bench consume --brokers "${addr[$b]}" --topic bench --json "$out/consume-$b-$round.json" \
      | tee -a "$out/consume-$b.txt"
  done
  log "2+3. round $round/$REPEAT: Apache Kafka's ConsumerPerformance on the same topic"
  bash tests/kafka/kafka.sh class org.apache.kafka.tools.ConsumerPerformance --bootstrap-server "$kafka" \
    --topic bench --num-records "$TICKS" --group "perf-$round-$$" --timeout 60000 \
    | tee "$out/kafka-perf-$round.txt"
done
cp "$out/ingest-kafka-$REPEAT.json" "$out/ingest.json"
fi

if [ "$PART" = all ]; then
log "4. Python peer (confluent-kafka + redis-py) on the same topic"
"$venv/bin/python" scripts/bench_peer.py --brokers "$brokers" --topic bench --redis "$redis" \
  --prefix peer --group "peer-$(date +%s)" --expect "$TICKS" | tee "$out/peer.json"

log "5. memory: 1 worker, backlog of $BIG_TICKS ticks in 64 partitions"
"$tickctl" bench ingest --brokers "$brokers" --topic big --redis "$redis" --ticks "$BIG_TICKS" \
  --assets "$ASSETS" --workers 1 --json "$out/memory.json" | tee "$out/memory.txt"
fi

if [ "$PART" = all ] || [ "$PART" = api ]; then
if [ "$PART" = api ]; then
  log "6. (PART=api) the data the api serves: $API_TICKS ticks over $ASSETS assets stored by 1 worker"
  "$tickctl" bench ingest --brokers "$brokers" --topic bench --redis "$redis" --ticks "$API_TICKS" \
    --assets "$ASSETS" --workers 1 --json "$out/api-ingest.json" | tee "$out/api-ingest.txt"
  served="$out/api-ingest.json"
else
  served="$out/ingest.json"
fi
log "6. api load (16 clients, 10 s each)"
prefix=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["prefix"])' "$served")
gport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
aport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
hport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
RUST_LOG=warn "$bin/tickfleet-api" --grpc-addr "127.0.0.1:$gport" --admin-addr "127.0.0.1:$aport" \
  --http-addr "127.0.0.1:$hport" \
  --redis-url "$redis" --redis-prefix "$prefix" &
pids+=($!)
until curl -sf "http://127.0.0.1:$aport/readyz" >/dev/null 2>&1; do sleep 0.1; done
api="http://127.0.0.1:$gport"
"$tickctl" bench api --api "$api" --method latest --clients 16 --seconds 10 --json "$out/api-latest-max.json"
"$tickctl" bench api --api "$api" --method latest --clients 16 --rps 5000 --seconds 10 --json "$out/api-latest-5k.json"
"$tickctl" bench api --api "$api" --http "127.0.0.1:$hport" --method rest-latest --clients 16 --rps 5000 --seconds 10 --json "$out/api-rest-latest-5k.json"
"$tickctl" bench api --api "$api" --method ticks --limit 1000 --clients 16 --seconds 10 --json "$out/api-ticks.json"
fi

if [ "$PART" = all ] || [ "$PART" = rollups ]; then
  log "7. candle rollups: write cost, GetCandles 1m over a day of $ROLLUP_TICKS ticks"
  redis-cli -p "$port" flushall >/dev/null
  "$tickctl" bench rollups --redis "$redis" --ticks "$ROLLUP_TICKS" --write-ticks "$ROLLUP_WRITE_TICKS" \
    --json "$out/rollups.json" | tee "$out/rollups.txt"
fi

if [ "$PART" = all ] || [ "$PART" = rollups ]; then
  for round in $(seq 1 "$REPEAT"); do
    for side in without with; do
      log "7b. round $round/$REPEAT: 1 and 2 workers $side rollups on the same backlog"
      skip=(--skip-produce)
      [ "$round$side" = 1without ] && skip=()
      worker=$bin/tickfleet-worker; [ $side = without ] && worker=$baseline_worker
      redis-cli -p "$port" flushall >/dev/null
      "$tickctl" bench ingest --brokers "$brokers" --topic rollup-ingest --redis "$redis" --ticks "$TICKS" \
        --assets "$ASSETS" --workers 1,2 --worker-bin "$worker" "${skip[@]}" \
        --json "$out/ingest-rollups-$side-$round.json" | tee -a "$out/ingest-rollups-$side.txt"
    done
  done
  rm -f "$baseline_worker"
fi

if [ "$PART" = all ] || [ "$PART" = cluster ]; then
  log "8. Redis Cluster: 1 and 3 primaries (one replica each), $CLUSTER_WORKERS workers, 0 and 1 replica acks"
  declare -A seeds=([standalone]="$redis")
  seeds[cluster1]=$(bash scripts/redis-cluster.sh start "$out/cluster1" 1)
  seeds[cluster3]=$(bash scripts/redis-cluster.sh start "$out/cluster3" 3)
  declare -A node_ports=([standalone]="$port")
  node_ports[cluster1]=$(paste -sd' ' "$out/cluster1/ports")
  node_ports[cluster3]=$(paste -sd' ' "$out/cluster3/ports")
  # A node's CPU seconds so far (all its threads), and the ticks it holds of the keys under a prefix.
  cpu() { redis-cli -p "$1" info cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.3f", s}'; }
  held() {
    redis-cli -p "$1" --scan --pattern "$2:{*}:ticks" | sed 's/^/ZCARD /' | redis-cli -p "$1" \
      | awk '{s += $1} END {print s + 0}'
  }
  role() { redis-cli -p "$1" info replication | tr -d '\r' | sed -n 's/^role://p'; }
  produced=""
  for round in $(seq 1 "$REPEAT"); do
    for run in standalone:0 cluster1:0 cluster3:0 cluster1:1 cluster3:1; do
      target=${run%:*} acks=${run#*:}
      name="$target-acks$acks"
      log "8. round $round/$REPEAT: $name"
      for p in ${node_ports[$target]}; do
        if [ "$(role "$p")" = master ]; then redis-cli -p "$p" flushall >/dev/null; fi
      done
      wargs=("--worker-arg=--redis-min-replica-acks=$acks")
      [ "$target" = standalone ] || wargs+=("--worker-arg=--redis-mode=cluster")
      skip=()
      [ -n "$produced" ] && skip=(--skip-produce)
      declare -A before=()
      for p in ${node_ports[$target]}; do before[$p]=$(cpu "$p"); done
      "$tickctl" bench ingest --brokers "$brokers" --topic bench --redis "${seeds[$target]}" --ticks "$TICKS" \
        --assets "$ASSETS" --workers "$CLUSTER_WORKERS" "${skip[@]}" "${wargs[@]}" \
        --json "$out/cluster-$name-$round.json" | tee -a "$out/cluster-$name.txt"
      produced=yes
      prefix=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["prefix"])' "$out/cluster-$name-$round.json")
      for p in ${node_ports[$target]}; do
        echo "$p $(role "$p") ${before[$p]} $(cpu "$p") $(held "$p" "$prefix")"
      done >"$out/cluster-$name-$round.nodes"
    done
  done
  for c in cluster1 cluster3; do bash scripts/redis-cluster.sh stop "$out/$c"; done
  python3 - "$out" "$REPEAT" "$CLUSTER_WORKERS" <<'PY'
import json, sys, pathlib, statistics
out, repeat, workers = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
med = statistics.median
names = ["standalone-acks0", "cluster1-acks0", "cluster3-acks0", "cluster1-acks1", "cluster3-acks1"]
label = {"standalone": "standalone Redis", "cluster1": "cluster, 1 primary", "cluster3": "cluster, 3 primaries"}
res = {}
rows = ["| run | ticks/s (median) | runs | Redis CPU µs per tick, each primary | primaries' share of ticks | replicas' CPU µs per tick | mean batch | mean write per batch |",
        "|---|---|---|---|---|---|---|---|"]
for n in names:
    tps, per_primary, share, repl, batch, write = [], [], [], [], [], []
    for i in range(1, repeat + 1):
        run = json.loads((out / f"cluster-{n}-{i}.json").read_text())[0]
        tps.append(run["ticks_per_second"])
        batch.append(run["mean_batch_ticks"])
        write.append(run["mean_write_ms"])
        nodes = [l.split() for l in (out / f"cluster-{n}-{i}.nodes").read_text().splitlines()]
        prim = [(float(a) - float(b), int(t)) for _, r, b, a, t in nodes if r == "master"]
        total = sum(t for _, t in prim)
        per_primary.append([c / t * 1e6 if t else 0.0 for c, t in prim])
        share.append([t / total if total else 0.0 for _, t in prim])
        rcpu = sum(float(a) - float(b) for _, r, b, a, _ in nodes if r != "master")
        repl.append(rcpu / total * 1e6 if total else 0.0)
    cols = list(zip(*per_primary))
    res[n] = {"tps": med(tps), "write": med(write)}
    target, acks = n.split("-")
    k = acks[4:]
    rows.append(f"| {label[target]}, {k} replica ack{'' if k == '1' else 's'} | {med(tps):,.0f} | "
                + ", ".join(f"{x:,.0f}" for x in tps) + " | "
                + " / ".join(f"{med(c):.2f}" for c in cols) + " | "
                + " / ".join(f"{med(c):.0%}" for c in zip(*share)) + " | "
                + (f"{med(repl):.2f}" if target != "standalone" else "–") + " | "
                + f"{med(batch):,.0f} ticks | {med(write):.2f} ms |")
ratios = [
    ("3 primaries / 1 primary, ticks/s, 0 acks", res["cluster3-acks0"]["tps"] / res["cluster1-acks0"]["tps"]),
    ("3 primaries / 1 primary, ticks/s, 1 ack", res["cluster3-acks1"]["tps"] / res["cluster1-acks1"]["tps"]),
    ("cluster of 1 primary / standalone, ticks/s", res["cluster1-acks0"]["tps"] / res["standalone-acks0"]["tps"]),
    ("1 ack / 0 acks, ticks/s, 1 primary", res["cluster1-acks1"]["tps"] / res["cluster1-acks0"]["tps"]),
    ("1 ack / 0 acks, ticks/s, 3 primaries", res["cluster3-acks1"]["tps"] / res["cluster3-acks0"]["tps"]),
    ("WAIT 1: mean write per batch, 1 ack − 0 acks, 1 primary (ms)", res["cluster1-acks1"]["write"] - res["cluster1-acks0"]["write"]),
    ("WAIT 1: mean write per batch, 1 ack − 0 acks, 3 primaries (ms)", res["cluster3-acks1"]["write"] - res["cluster3-acks0"]["write"]),
]
text = f"Redis Cluster, {workers} workers, medians of {repeat} rounds\n\n" + "\n".join(rows)
text += "\n\n| ratio / difference (of medians) | value |\n|---|---|\n" + "".join(f"| {a} | {v:.2f} |\n" for a, v in ratios)
(out / "cluster.md").write_text((out / "machine.txt").read_text() + "\n" + text)
print(text)
PY
fi

if [ "$PART" = all ] || [ "$PART" = postgres ]; then
  log "9. PostgreSQL: ceiling (pgbench, the same multi-row INSERT ... ON CONFLICT DO NOTHING of $BATCH ticks)"
  # The table is the store's own (its migration, in a schema of its own), with today's day partition.
  day_ns=86400000000000
  today=$(( $(date +%s) / 86400 ))  # whole UTC days since the epoch
  lo=$(( today * day_ns ))
  psql "$pg" -XqAt -v ON_ERROR_STOP=1 -c 'CREATE SCHEMA ceiling' >/dev/null
  { echo 'SET search_path = ceiling;'; cat store/src/postgres/migrations/0001_ticks.sql; } |
    psql "$pg" -XqAt -v ON_ERROR_STOP=1 >/dev/null
  psql "$pg" -XqAt -v ON_ERROR_STOP=1 -c "SELECT ceiling.ensure_partitions(ARRAY[$lo]::bigint[], ARRAY[$((lo + day_ns))]::bigint[])" >/dev/null
  # One statement per transaction: BATCH new ticks of 100 assets (a random base keeps them new), the
  # values built server-side (cheaper than the worker's arrays of text sent from the client: a ceiling).
  cat >"$out/pgbench-insert.sql" <<SQL
\set base random(1, 1000000000000)
INSERT INTO ceiling.ticks (asset, event_time_ns, seq, price, size, source)
SELECT 'B' || (i % 100), $lo + (:base::bigint * $BATCH + i) % $day_ns, :base::bigint * $BATCH + i,
    (100 + (i % 997) / 100.0)::numeric, (1 + i % 7)::numeric, 'bench'
FROM generate_series(1, $BATCH) AS i
ON CONFLICT DO NOTHING;
SQL
  for c in 1 2; do
    pgbench -n -c "$c" -j "$c" -T "$PG_SECONDS" -f "$out/pgbench-insert.sql" "$pg" | tee "$out/pgbench-$c.txt"
  done
  log "9. PostgreSQL: $TICKS ticks over $ASSETS assets on the dev broker, stored with --store redis|postgres|both"
  for round in $(seq 1 "$REPEAT"); do
    for store in redis postgres both; do
      log "9. round $round/$REPEAT, --store $store: 1 and 2 workers"
      skip=(--skip-produce)
      [ "$round" = 1 ] && [ "$store" = redis ] && skip=()
      redis-cli -p "$port" flushall >/dev/null
      "$tickctl" bench ingest --brokers "$brokers" --topic pgbench --redis "$redis" --ticks "$TICKS" \
        --assets "$ASSETS" --workers 1,2 "${skip[@]}" --worker-arg="--store=$store" \
        --worker-arg="--postgres-url=$pg" --worker-arg="--batch-size=$BATCH" \
        --json "$out/pg-ingest-$store-$round.json" | tee -a "$out/pg-ingest-$store.txt"
    done
  done
fi
echo "load at the end: $(cat /proc/loadavg)" >>"$out/machine.txt"

[ "$PART" = cluster ] || python3 - "$out" "$REPEAT" "$BATCH" <<'PY'
import json, re, sys, pathlib, statistics
out, repeat, batch = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
med = statistics.median
def ingest(b, w):
    return [next(r for r in json.loads((out / f"ingest-{b}-{i}.json").read_text()) if r["workers"] == w)
            for i in range(1, repeat + 1)]
def consume(b):
    return [json.loads((out / f"consume-{b}-{i}.json").read_text())["messages_per_second"]
            for i in range(1, repeat + 1)]
def perf():
    rates = []
    for i in range(1, repeat + 1):
        lines = [l for l in (out / f"kafka-perf-{i}.txt").read_text().splitlines() if "," in l]
        head = [h.strip() for h in lines[0].split(",")]
        vals = [v.strip() for v in lines[-1].split(",")]
        rates.append(float(vals[head.index("fetch.nMsg.sec")]))
    return rates
def runs(xs):
    return ", ".join(f"{x:,.0f}" for x in xs)
rows, ratios = [], []
rate = {}
for b, name in [] if not (out / "ingest.json").exists() else [("mock", "dev broker (librdkafka mock)"), ("kafka", "Apache Kafka")]:
    c = consume(b)
    rate[b, "consume"] = med(c)
    rows.append((f"{name}: raw consume (librdkafka, no store: tickctl bench consume)", f"{med(c):,.0f} msg/s",
                 f"runs: {runs(c)}"))
    for w in (1, 2):
        rs = ingest(b, w)
        tps = [r["ticks_per_second"] for r in rs]
        rate[b, w] = med(tps)
        rows.append((f"{name}: tickfleet, {w} worker{'s' if w > 1 else ''}", f"{med(tps):,.0f} ticks/s",
                     f"runs: {runs(tps)}; median {med([r['cpu_seconds'] for r in rs]):.1f} CPU s, "
                     f"peak RSS {max(r['peak_rss_mib'] for r in rs):.0f} MiB"))
p = perf() if (out / "ingest.json").exists() else None
if p:
    rows.append(("Apache Kafka: its own consumer (ConsumerPerformance, fetch rate)", f"{med(p):,.0f} msg/s",
                 f"runs: {runs(p)}"))
    ratios += [
        ("Apache Kafka / dev broker, tickfleet 1 worker", rate["kafka", 1] / rate["mock", 1]),
        ("Apache Kafka / dev broker, tickfleet 2 workers", rate["kafka", 2] / rate["mock", 2]),
        ("Apache Kafka / dev broker, raw consume", rate["kafka", "consume"] / rate["mock", "consume"]),
        ("Apache Kafka: raw consume (librdkafka) / ConsumerPerformance", rate["kafka", "consume"] / med(p)),
        ("Apache Kafka: tickfleet 1 worker / raw consume", rate["kafka", 1] / rate["kafka", "consume"]),
        ("Apache Kafka: tickfleet 2 workers / 1 worker", rate["kafka", 2] / rate["kafka", 1]),
    ]
if (out / "peer.json").exists():
    zadd = float(re.search(r"([\d.]+) requests per second", (out / "redis-benchmark.txt").read_text()).group(1))
    peer = json.loads((out / "peer.json").read_text().strip().splitlines()[-1])["ticks_per_second"]
    mem = json.loads((out / "memory.json").read_text())[0]
    rows.insert(0, ("Redis pipelined ZADD ceiling (redis-benchmark -P 64)", f"{zadd:,.0f} ops/s", ""))
    rows.append(("Python peer (confluent-kafka + redis-py), dev broker", f"{peer:,.0f} ticks/s", ""))
    rows.append((f"1 worker on a {mem['ticks']:,}-tick backlog (64 partitions), dev broker",
                 f"{mem['ticks_per_second']:,.0f} ticks/s", f"peak RSS {mem['peak_rss_mib']:.0f} MiB"))
    best = max(rate["mock", 1], rate["mock", 2])
    ratios += [
        ("tickfleet (best of 1 and 2 workers, dev broker) / Redis ZADD ceiling", best / zadd),
        ("tickfleet 1 worker / Python peer (dev broker)", rate["mock", 1] / peer),
    ]
if (out / "api-latest-5k.json").exists():
    for name, label in [("api-latest-max", "GetLatest, flat out"), ("api-latest-5k", "GetLatest at 5k rps"),
                        ("api-rest-latest-5k", "REST GET /v1/prices/latest at 5k rps"),
                        ("api-ticks", "ListTicks(limit 1000), flat out")]:
        a = json.loads((out / f"{name}.json").read_text())
        rows.append((f"api {label}, {a['clients']} clients", f"{a['rps']:,.0f} req/s",
                     f"p50 {a['p50_ms']:.2f} ms, p99 {a['p99_ms']:.2f} ms, p999 {a['p999_ms']:.2f} ms, {a['errors']} errors"))
if (out / "rollups.json").exists():
    r = json.loads((out / "rollups.json").read_text())
    raw, rolled = r["raw_only"], r["with_rollups"]
    what = f"{r['write_ticks']:,} ticks of one asset, batches of {r['batch']}, one client"
    rows.append((f"rollups: store write, raw ticks only (the pre-rollup script), {what}",
                 f"{raw['ticks_per_s']:,.0f} ticks/s", f"Redis {raw['redis_us_per_tick']:.2f} µs CPU/tick"))
    rows.append((f"rollups: store write with rollups (RedisStore::write_batch), {what}",
                 f"{rolled['ticks_per_s']:,.0f} ticks/s", f"Redis {rolled['redis_us_per_tick']:.2f} µs CPU/tick"))
    q, rq = r["rollup_query_ms"], r["raw_query_ms"]
    rows.append((f"rollups: GetCandles 1m over a day of {r['day_ticks']:,} ticks ({r['candles']} candles), api on loopback",
                 f"p50 {q['p50']:.2f} ms", f"p99 {q['p99']:.2f} ms ({q['n']} queries)"))
    rows.append(("rollups: the same candles from the raw ticks (what the api did before rollups)",
                 f"p50 {rq['p50']:,.0f} ms", f"max {rq['max']:,.0f} ms ({rq['n']} runs)"))
    ratios += [
        ("rollups: store write ticks/s, with / without rollups", rolled["ticks_per_s"] / raw["ticks_per_s"]),
        ("rollups: Redis CPU per tick, with / without rollups", rolled["redis_us_per_tick"] / raw["redis_us_per_tick"]),
        ("rollups: GetCandles 1m over a day, raw-tick p50 / rollup p50", rq["p50"] / q["p50"]),
    ]
if (out / "pgbench-1.txt").exists():
    def pgbench(c):
        tps = float(re.search(r"tps = ([\d.]+)", (out / f"pgbench-{c}.txt").read_text()).group(1))
        return tps * batch
    ceiling = {c: pgbench(c) for c in (1, 2)}
    for c in (1, 2):
        rows.append((f"PostgreSQL ceiling: pgbench, {c} client{'s' if c > 1 else ''}, INSERT ... ON CONFLICT DO NOTHING "
                     f"of {batch} ticks per statement", f"{ceiling[c]:,.0f} ticks/s", f"{ceiling[c] / batch:,.0f} statements/s"))
    pg = {}
    for store in ("redis", "postgres", "both"):
        for w in (1, 2):
            rs = [next(r for r in json.loads((out / f"pg-ingest-{store}-{i}.json").read_text()) if r["workers"] == w)
                  for i in range(1, repeat + 1)]
            tps = [r["ticks_per_second"] for r in rs]
            pg[store, w] = med(tps)
            extra = ""
            if all("mean_write_ms" in r for r in rs):
                extra = f", mean write per batch {med([r['mean_write_ms'] for r in rs]):.1f} ms"
            rows.append((f"--store {store}: tickfleet, {w} worker{'s' if w > 1 else ''} (dev broker)",
                         f"{med(tps):,.0f} ticks/s",
                         f"runs: {runs(tps)}; median {med([r['cpu_seconds'] for r in rs]):.1f} worker CPU s, "
                         f"peak RSS {max(r['peak_rss_mib'] for r in rs):.0f} MiB{extra}"))
    best = max(ceiling.values())
    ratios += [
        ("--store postgres, 1 worker / PostgreSQL ceiling (best of 1 and 2 pgbench clients)", pg["postgres", 1] / best),
        ("--store postgres, 2 workers / PostgreSQL ceiling (best of 1 and 2 pgbench clients)", pg["postgres", 2] / best),
        ("--store postgres / --store redis, 1 worker", pg["postgres", 1] / pg["redis", 1]),
        ("--store postgres / --store redis, 2 workers", pg["postgres", 2] / pg["redis", 2]),
        ("--store both / --store postgres, 2 workers", pg["both", 2] / pg["postgres", 2]),
        ("--store postgres: 2 workers / 1 worker", pg["postgres", 2] / pg["postgres", 1]),
    ]
if (out / f"ingest-rollups-with-{repeat}.json").exists():
    for w in (1, 2):
        tps = {side: [next(r for r in json.loads((out / f"ingest-rollups-{side}-{i}.json").read_text())
                           if r["workers"] == w)["ticks_per_second"] for i in range(1, repeat + 1)]
               for side in ("without", "with")}
        for side in ("without", "with"):
            rows.append((f"rollups: ingest, {w} worker{'s' if w > 1 else ''}, {side} rollups (dev broker)",
                         f"{med(tps[side]):,.0f} ticks/s", f"runs: {runs(tps[side])}"))
        ratios.append((f"rollups: ingest ticks/s with / without rollups, {w} worker{'s' if w > 1 else ''}",
                       med(tps["with"]) / med(tps["without"])))
lines = ["| what | median | notes |", "|---|---|---|"]
lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
lines += ["", "| ratio (of medians) | value |", "|---|---|"]
lines += [f"| {a} | {v:.2f} |" for a, v in ratios]
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text((out / "machine.txt").read_text() + "\n" + text)
print(text)
PY
log "results in $out"
