#!/usr/bin/env bash
# Measures tickfleet's ingest against the machine's ceilings and a peer, all in one run on one machine:
#   1. redis-benchmark: pipelined ZADD on the same Redis (the store's ceiling);
#   2. tickctl bench consume: the dev broker's raw consume rate with librdkafka (the Kafka side's ceiling);
#   3. tickctl bench ingest: 1 and 2 tickfleet-worker processes storing the same pre-produced backlog;
#   4. scripts/bench_peer.py: a plain Python consumer (confluent-kafka + redis-py) storing it too;
#   5. memory: 1 worker on a backlog of several million ticks (64 partitions), peak RSS;
#   6. the api: GetLatest flat out and at 5k rps, ListTicks(limit 1000), 16 clients, over what step 3 stored.
# Results go to bench-results/<timestamp>/ (summary.md has the table quoted in BENCHMARKS.md).
# Settings: TICKS (default 1000000), ASSETS (100), PARTITIONS (16), BIG_TICKS (4000000).
set -euo pipefail
cd "$(dirname "$0")/.."

TICKS=${TICKS:-1000000}
ASSETS=${ASSETS:-100}
PARTITIONS=${PARTITIONS:-16}
BIG_TICKS=${BIG_TICKS:-4000000}
log() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi
venv="$HOME/.cache/tickfleet/bench-venv"
if [ ! -x "$venv/bin/python" ]; then
  log "creating the peer's Python environment ($venv)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q confluent-kafka redis grpcio-tools
fi

log "building release binaries"
cargo build --release --locked --bins -p tickfleet-cli -p tickfleet-worker -p tickfleet-api
tickctl=target/release/tickctl

out="bench-results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --daemonize no >"$out/redis.log" 2>&1 &
pids+=($!)
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
redis="redis://127.0.0.1:$port"

"$tickctl" dev-broker --topic "bench:$PARTITIONS" --topic big:64 --bootstrap-file "$out/bootstrap" >/dev/null &
pids+=($!)
until [ -s "$out/bootstrap" ]; do sleep 0.1; done
brokers=$(cat "$out/bootstrap")

{
  echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
  echo "cpu: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "redis: $(redis-server --version | awk '{print $3}'), broker: librdkafka mock cluster (tickctl dev-broker), $PARTITIONS partitions"
  echo "load during the run: $(cat /proc/loadavg)"
} >"$out/machine.txt"

log "1. Redis ceiling: redis-benchmark pipelined ZADD (-P 64)"
redis-benchmark -p "$port" -P 64 -n 2000000 -r 1000000 -q ZADD bench:ceiling __rand_int__ member:__rand_int__ \
  | tee "$out/redis-benchmark.txt"

log "2+3. tickfleet: produce $TICKS ticks over $ASSETS assets, then 1 and 2 workers store them"
"$tickctl" bench ingest --brokers "$brokers" --topic bench --redis "$redis" --ticks "$TICKS" \
  --assets "$ASSETS" --workers 1,2 --json "$out/ingest.json" | tee "$out/ingest.txt"
"$tickctl" bench consume --brokers "$brokers" --topic bench --json "$out/consume.json" | tee "$out/consume.txt"

log "4. Python peer (confluent-kafka + redis-py) on the same topic"
"$venv/bin/python" scripts/bench_peer.py --brokers "$brokers" --topic bench --redis "$redis" \
  --prefix peer --group "peer-$(date +%s)" --expect "$TICKS" | tee "$out/peer.json"

log "5. memory: 1 worker, backlog of $BIG_TICKS ticks in 64 partitions"
"$tickctl" bench ingest --brokers "$brokers" --topic big --redis "$redis" --ticks "$BIG_TICKS" \
  --assets "$ASSETS" --workers 1 --json "$out/memory.json" | tee "$out/memory.txt"

log "6. api load (16 clients, 10 s each)"
prefix=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["prefix"])' "$out/ingest.json")
gport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
aport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
RUST_LOG=warn target/release/tickfleet-api --grpc-addr "127.0.0.1:$gport" --admin-addr "127.0.0.1:$aport" \
  --redis-url "$redis" --redis-prefix "$prefix" &
pids+=($!)
until curl -sf "http://127.0.0.1:$aport/readyz" >/dev/null 2>&1; do sleep 0.1; done
api="http://127.0.0.1:$gport"
"$tickctl" bench api --api "$api" --method latest --clients 16 --seconds 10 --json "$out/api-latest-max.json"
"$tickctl" bench api --api "$api" --method latest --clients 16 --rps 5000 --seconds 10 --json "$out/api-latest-5k.json"
"$tickctl" bench api --api "$api" --method ticks --limit 1000 --clients 16 --seconds 10 --json "$out/api-ticks.json"

python3 - "$out" <<'PY'
import json, re, sys, pathlib
out = pathlib.Path(sys.argv[1])
zadd = float(re.search(r"([\d.]+) requests per second", (out / "redis-benchmark.txt").read_text()).group(1))
ingest = {r["workers"]: r for r in json.loads((out / "ingest.json").read_text())}
consume = json.loads((out / "consume.json").read_text())["messages_per_second"]
peer = json.loads((out / "peer.json").read_text().strip().splitlines()[-1])["ticks_per_second"]
mem = json.loads((out / "memory.json").read_text())[0]
one, two = ingest[1], ingest[2]
rows = [
    ("Redis pipelined ZADD ceiling (redis-benchmark -P 64)", f"{zadd:,.0f} ops/s", ""),
    ("broker raw consume (librdkafka, no store)", f"{consume:,.0f} msg/s", ""),
    ("tickfleet, 1 worker", f"{one['ticks_per_second']:,.0f} ticks/s",
     f"{one['cpu_seconds']:.1f} CPU s, peak RSS {one['peak_rss_mib']:.0f} MiB"),
    ("tickfleet, 2 workers", f"{two['ticks_per_second']:,.0f} ticks/s",
     f"{two['cpu_seconds']:.1f} CPU s, peak RSS {two['peak_rss_mib']:.0f} MiB (max of the two)"),
    ("Python peer (confluent-kafka + redis-py)", f"{peer:,.0f} ticks/s", ""),
    (f"1 worker on a {mem['ticks']:,}-tick backlog (64 partitions)", f"{mem['ticks_per_second']:,.0f} ticks/s",
     f"peak RSS {mem['peak_rss_mib']:.0f} MiB"),
]
best = max(one["ticks_per_second"], two["ticks_per_second"])
ratios = [
    ("tickfleet (best of 1 and 2 workers) / Redis ZADD ceiling", best / zadd),
    ("tickfleet 1 worker / Python peer", one["ticks_per_second"] / peer),
    ("tickfleet 2 workers / 1 worker", two["ticks_per_second"] / one["ticks_per_second"]),
]
for name, label in [("api-latest-max", "GetLatest, flat out"), ("api-latest-5k", "GetLatest at 5k rps"),
                    ("api-ticks", "ListTicks(limit 1000), flat out")]:
    a = json.loads((out / f"{name}.json").read_text())
    rows.append((f"api {label}, {a['clients']} clients", f"{a['rps']:,.0f} req/s",
                 f"p50 {a['p50_ms']:.2f} ms, p99 {a['p99_ms']:.2f} ms, p999 {a['p999_ms']:.2f} ms, {a['errors']} errors"))
lines = ["| what | rate | notes |", "|---|---|---|"]
lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
lines += ["", "| ratio | value |", "|---|---|"]
lines += [f"| {a} | {v:.2f} |" for a, v in ratios]
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text((out / "machine.txt").read_text() + "\n" + text)
print(text)
PY
log "results in $out"
