#!/usr/bin/env bash
# End-to-end test of tickfleet on a real one-node Kubernetes v1.28 (the kit in $TICKFLEET_K8S_DIR,
# default ../shared/k8s next to the repository: kube-apiserver, controller-manager, scheduler, kubelet
# and kube-proxy with Debian's etcd, containerd, runc and CNI plugins). Needs root (or sudo). Run by
# scripts/test.sh when the kit is there; prints "SKIP" and why, and exits 0, when it is not.
#
#   bash tests/e2e/local-cluster.sh
#
# What it does, failing at the first step that does not hold (the cluster is always stopped):
#   1. builds the binaries (release unless TICKFLEET_E2E_PROFILE=debug) and an image of them (the
#      Dockerfile's binaries in /usr/local/bin, user 65532);
#   2. starts the cluster and imports the image;
#   3. starts Redis (TLS only, client certificates required) and Apache Kafka (tests/kafka/kafka.sh,
#      KRaft) on the node address 10.244.0.1, the one address the pods can reach;
#   4. installs charts/tickfleet with Helm (the helm binary, else Helm's Go library from PyPI): the
#      operator runs IN the cluster, two replicas with leader election;
#   5. applies a TickPipeline whose workers and api use TLS Secrets and whose spec.polling runs two
#      poll connector pods against a fixture Finnhub on the node (its API key from an offered
#      Secret), waits for condition Ready;
#   6. checks the real pods: probes answer, the root filesystem is read-only, the process runs as
#      uid 65532, the Secrets are mounted (the api serves gRPC over TLS through its Service);
#   7. produces ticks from the host, `kubectl scale tp` 1 -> 3 while they flow and waits for the
#      workers to join; deletes a worker pod mid-stream and checks from its last container status
#      that it drained and exited 0 within its grace period; `tickctl verify`: 0 lost, 0 doubled;
#   7b. a polling job created over REST: the fixture's quote reaches the api's cache and, as a tick
#      through Kafka and a worker, the store; the fixture saw only the Secret's key;
#   8. applies a second pipeline whose Kafka accepts connections and never answers: a
#      KafkaUnreachable Event, Degraded/TopicUnavailable, few librdkafka lines in the operator's log,
#      and the leader operator pod deleted while a Kafka call is in flight exits 0 within 5 s;
#      then the new leader is frozen (SIGSTOP) and a standby must take the Lease between the lease
#      duration and one retry period after its last renewal (the failover figure is printed);
#   9. deletes the pipeline with --cascade=foreground (returns once every child is gone) and
#      uninstalls the chart.
#
# Knobs: TICKFLEET_K8S_DIR, TICKFLEET_E2E_PROFILE (release; debug uses the binaries scripts/test.sh
# built), TICKS (60000), RATE (3000), KEEP_LOGS=DIR (copy logs there).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
K8S=${TICKFLEET_K8S_DIR:-$ROOT/../shared/k8s}
TICKS=${TICKS:-60000}
# release (what the Dockerfile ships) or debug (what scripts/test.sh has already built)
PROFILE=${TICKFLEET_E2E_PROFILE:-release}
RATE=${RATE:-3000}
NODE_IP=10.244.0.1
IMAGE=localhost/tickfleet:e2e
NS=markets
OP_NS=tickfleet-system
RELEASE=tickfleet
TP=e2e
T0=$SECONDS

log() { printf '\n==> [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
skip() { echo "SKIP local-cluster e2e: $*"; exit 0; }

[ -x "$K8S/cluster-up.sh" ] || skip "no Kubernetes kit at $K8S (set TICKFLEET_K8S_DIR to a directory with cluster-up.sh)"
if [ "$(id -u)" -ne 0 ]; then
  sudo -n true 2>/dev/null || skip "the kit needs root (kubelet, containerd, a bridge, iptables) and sudo is not available"
  exec sudo -E bash "$0" "$@"
fi
K8S=$(cd "$K8S" && pwd)
# one cluster per machine (the kubelet, the bridge and iptables are machine-wide)
if [ -e /run/tickfleet-k8s.state ]; then
  skip "a cluster of the kit is already running on this machine ($(cat /run/tickfleet-k8s.state)); it allows one per machine"
fi
KAFKA_SH=${KAFKA_SH:-$ROOT/tests/kafka/kafka.sh}
[ -f "$KAFKA_SH" ] || die "no $KAFKA_SH (Apache Kafka for the tests)"

work=$(mktemp -d /tmp/tf-e2e.XXXXXX)
S=$(mktemp -d /tmp/k8s.XXXXXX)   # short: containerd's unix socket path must fit in 108 bytes
cluster_up=0
kafka_dir=""
pids=()
diagnostics() {
  log "diagnostics"
  kubectl get nodes -o wide || true
  kubectl get tp -A -o wide || true
  kubectl -n "$NS" describe tp "$TP" || true
  kubectl get pods -A -o wide || true
  kubectl -n "$OP_NS" logs -l app.kubernetes.io/component=operator --tail=60 --prefix || true
  kubectl -n "$NS" logs -l app.kubernetes.io/component=worker --tail=30 --prefix || true
  kubectl -n "$NS" logs -l app.kubernetes.io/component=api --tail=30 --prefix || true
  kubectl -n "$NS" logs -l app.kubernetes.io/component=poller --tail=30 --prefix || true
  kubectl get events -A --sort-by=.lastTimestamp | tail -40 || true
  tail -20 "$work"/*.log 2>/dev/null || true
}
finish() {
  rc=$?
  trap - EXIT
  if [ "$rc" -ne 0 ] && [ "$cluster_up" = 1 ]; then diagnostics; fi
  if [ -n "${KEEP_LOGS:-}" ]; then
    mkdir -p "$KEEP_LOGS"
    cp -r "$work"/*.log "$S/logs" "$KEEP_LOGS/" 2>/dev/null || true
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "$kafka_dir" ]; then bash "$KAFKA_SH" stop "$kafka_dir" >/dev/null 2>&1 || true; fi
  if [ "$cluster_up" = 1 ]; then
    t=$SECONDS
    "$K8S/cluster-down.sh" "$S" >"$work/cluster-down.log" 2>&1 || { echo "cluster-down.sh failed:"; tail -20 "$work/cluster-down.log"; rc=1; }
    echo "cluster down in $((SECONDS - t)) s"
  fi
  rm -rf "$work" "$S"
  if [ "$rc" -eq 0 ]; then echo "local-cluster e2e: PASSED in $((SECONDS - T0)) s"; else echo "local-cluster e2e: FAILED ($rc) after $((SECONDS - T0)) s"; fi
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

# waits until "$@" succeeds, at most $1 seconds (a command substitution in the arguments is
# evaluated once, before the first try: pass a function that reads what changes)
until_ok() {
  local limit=$1; shift
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 1
  done
}

# deletes pod $2 in namespace $1 and prints "EXIT_CODE SECONDS REASON" of its container's final
# state: the kubelet writes it into the pod before the pod goes away, so the pod is watched
delete_and_watch() {
  local ns=$1 pod=$2 out deleted watch_pid
  out=$(mktemp "$work/watch.XXXXXX")
  kubectl -n "$ns" get pod "$pod" --watch -o json >"$out" 2>/dev/null &
  watch_pid=$!
  sleep 1
  deleted=$(date -u +%s.%N)
  kubectl -n "$ns" delete pod "$pod" --wait=true --timeout=2m >/dev/null
  # let the watch write the last event (the pod's deletion) before it is stopped
  sleep 1
  kill "$watch_pid" 2>/dev/null || true
  wait "$watch_pid" 2>/dev/null || true
  python3 -c '
import datetime, json, sys
text = open(sys.argv[1]).read()
dec, objs, i = json.JSONDecoder(), [], 0
while i < len(text):
    if text[i].isspace():
        i += 1
        continue
    try:
        obj, i = dec.raw_decode(text, i)
    except json.JSONDecodeError:
        # the watch was stopped while it wrote an object: the objects before it are whole
        break
    objs.append(obj)
for obj in reversed(objs):
    for c in obj.get("status", {}).get("containerStatuses", []):
        t = c.get("state", {}).get("terminated") or c.get("lastState", {}).get("terminated")
        if t:
            finished = datetime.datetime.strptime(t["finishedAt"], "%Y-%m-%dT%H:%M:%SZ")
            took = finished.replace(tzinfo=datetime.timezone.utc).timestamp() - float(sys.argv[2])
            print(t["exitCode"], max(0, round(took)), t.get("reason", "-"))
            sys.exit(0)
sys.exit("no terminated state of the container was seen")
' "$out" "$deleted"
}

# the Events about object $1 in $NS, "REASON: NOTE" per line
events() { kubectl -n "$NS" get events.events.k8s.io --field-selector "regarding.name=$1" -o jsonpath='{range .items[*]}{.reason}: {.note}{"\n"}{end}'; }

log "1. $PROFILE binaries and the image $IMAGE"
t=$SECONDS
# the Dockerfile's build (every binary of the workspace) plus its healthcheck helper
# (the list of binaries from cargo's own messages, as the Dockerfile takes it)
flags=(--locked --workspace --bins --message-format=json-render-diagnostics)
[ "$PROFILE" = release ] && flags+=(--release)
mapfile -t bins < <(cargo build "${flags[@]}" | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | sort -u)
[ ${#bins[@]} -gt 0 ] || die "cargo built no binaries"
release=$(dirname "${bins[0]}")
TICKCTL=$release/tickctl
if [ "$PROFILE" = debug ]; then
  # debug binaries carry ~1 GB of DWARF between them: the image gets copies without it (symbols
  # stay, so a panic's backtrace still names functions); the code is the same
  mkdir -p "$work/bin"
  for b in "${bins[@]}"; do objcopy --strip-debug "$b" "$work/bin/${b##*/}"; done
  bins=("$work/bin"/*)
  release=$work/bin
fi
rustc --edition 2024 -O -C strip=symbols -D warnings -o "$release/tickfleet-probe" docker/healthprobe.rs
bins+=("$release/tickfleet-probe")
echo "$PROFILE build: $((SECONDS - t)) s; binaries: ${bins[*]##*/} ($(du -shc "${bins[@]}" | tail -1 | cut -f1))"

log "2. cluster up ($K8S)"
# the kit's kubelet evicts every pod when less than 1% of the disk is free (evictionHard
# nodefs.available); the image and the pods' logs need about 1 GB beyond that
read -r disk_kb free_kb < <(df -Pk /var/lib | awk 'NR == 2 {print $2, $4}')
[ "$free_kb" -gt $((disk_kb / 100 + 1024 * 1024)) ] ||
  die "only $((free_kb / 1024)) MB free on the disk of /var/lib: the kubelet evicts pods below $((disk_kb / 100 / 1024)) MB; free some space"
t=$SECONDS
cluster_up=1
KUBECONFIG=$("$K8S/cluster-up.sh" "$S" 2>"$work/cluster-up.log") || { tail -30 "$work/cluster-up.log"; die "cluster-up.sh failed"; }
export KUBECONFIG
echo "cluster up in $((SECONDS - t)) s"
t=$SECONDS
# the Dockerfile's image: every binary in /usr/local/bin, user 65532:65532, `tickctl --help` when no
# command is given (pods always name theirs)
STATE_DIR=$S IMAGE_USER=65532:65532 "$K8S/image-from-binaries.sh" "$IMAGE" '["/usr/local/bin/tickctl","--help"]' "${bins[@]}"
echo "image built and imported in $((SECONDS - t)) s"

log "3. certificates, Redis (TLS) and Kafka on $NODE_IP"
certs=$work/certs
mkdir -p "$certs"
(
  cd "$certs"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=tickfleet e2e CA" -keyout ca.key -out ca.crt 2>/dev/null
  sign() { # name CN SAN
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$3" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  }
  sign redis redis "IP:$NODE_IP"
  sign client tickfleet "DNS:tickfleet"
)
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# TLS only (port 0 turns the plaintext port off), client certificates required
redis-server --bind "$NODE_IP" --port 0 --tls-port "$redis_port" --tls-cert-file "$certs/redis.crt" \
  --tls-key-file "$certs/redis.key" --tls-ca-cert-file "$certs/ca.crt" --tls-auth-clients yes \
  --protected-mode no --save "" --appendonly no --dir "$work" --logfile "$work/redis.log" --daemonize no &
pids+=($!)
rcli() { redis-cli --tls --cacert "$certs/ca.crt" --cert "$certs/client.crt" --key "$certs/client.key" -h "$NODE_IP" -p "$redis_port" "$@"; }
until_ok 10 rcli ping || die "redis-server did not start on $NODE_IP:$redis_port"
REDIS_URL=rediss://$NODE_IP:$redis_port

# Apache Kafka (KRaft), its client listener on the node address; killed if this script dies
kafka_dir=$work/kafka
t=$SECONDS
BROKERS=$(bash "$KAFKA_SH" start "$kafka_dir" --host "$NODE_IP" --owner $$ 2>"$work/kafka.log") ||
  { tail -20 "$work/kafka.log"; die "Kafka did not start on $NODE_IP"; }
echo "kafka up in $((SECONDS - t)) s"
echo "redis $REDIS_URL, kafka $BROKERS"

log "4. helm install $RELEASE (charts/tickfleet), operator in the cluster"
cat >"$work/values.json" <<EOF
{"image": {"repository": "${IMAGE%:*}", "tag": "${IMAGE##*:}", "pullPolicy": "Never"},
 "operator": {"replicas": 2, "logFormat": "text", "leaseDurationSeconds": 15, "leaseRetrySeconds": 5}}
EOF
t=$SECONDS
if command -v helm >/dev/null; then
  helm upgrade --install "$RELEASE" charts/tickfleet -n "$OP_NS" --create-namespace \
    -f "$work/values.json" --wait --timeout 3m
else
  venv=${TICKFLEET_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tickfleet}/packaging-venv
  [ -x "$venv/bin/python" ] || bash scripts/check-packaging.sh >/dev/null
  "$venv/bin/python" tests/e2e/helm.py install "$RELEASE" charts/tickfleet "$OP_NS" "$work/values.json"
fi
kubectl -n "$OP_NS" rollout status deploy/"$RELEASE-operator" --timeout=2m
has_leader() { test -n "$(kubectl -n "$OP_NS" get lease "$RELEASE-operator" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null)"; }
until_ok 60 has_leader ||
  die "no operator replica took the leader Lease"
echo "installed in $((SECONDS - t)) s; leader: $(kubectl -n "$OP_NS" get lease "$RELEASE-operator" -o jsonpath='{.spec.holderIdentity}')"

log "5. TickPipeline $TP (TLS to Redis, gRPC over TLS, polling a fixture Finnhub)"
# Finnhub's /api/v1/quote as documented, on the node address; it counts requests by whether they
# carried the key the poll connector was given from its Secret
FINNHUB_KEY=e2e-$RANDOM$RANDOM
python3 -c '
import http.server, json, sys, time
key, t = sys.argv[2], int(time.time())
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.headers.get("X-Finnhub-Token") == key
        print("good" if ok else "bad", self.path, file=sys.stderr, flush=True)
        body = json.dumps({"c": 101.25, "d": 0.5, "dp": 0.49, "h": 102, "l": 100, "o": 100.5,
                           "pc": 100.75, "t": t} if ok else {"error": "Invalid API key"}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer((sys.argv[1], 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
' "$NODE_IP" "$FINNHUB_KEY" >"$work/finnhub.port" 2>"$work/finnhub.log" &
pids+=($!)
until_ok 10 test -s "$work/finnhub.port" || die "the fixture Finnhub did not start"
FINNHUB_URL=http://$NODE_IP:$(cat "$work/finnhub.port")
kubectl create namespace "$NS"
kubectl -n "$NS" create secret generic finnhub-key --from-literal=token="$FINNHUB_KEY"
kubectl -n "$NS" create secret generic redis-ca --from-file=ca.crt="$certs/ca.crt"
kubectl -n "$NS" create secret tls redis-client --cert="$certs/client.crt" --key="$certs/client.key"
# the operator references only Secrets offered to the pipeline (the confused-deputy guard)
offer() { kubectl -n "$NS" annotate secret "$1" tickfleet.io/allowed-pipelines="$TP" >/dev/null; }
offer redis-ca
offer redis-client
offer finnhub-key
kubectl apply -f - <<EOF
apiVersion: tickfleet.io/v1alpha1
kind: TickPipeline
metadata: {name: $TP, namespace: $NS}
spec:
  image: $IMAGE
  imagePullPolicy: Never
  kafka: {bootstrapServers: "$BROKERS", topic: ticks, partitions: 4}
  store:
    redis:
      url: "$REDIS_URL"
      tls: {caSecretRef: {name: redis-ca, key: ca.crt}, clientCertSecretName: redis-client}
    keyPrefix: e2e
  workers:
    replicas: 1
    autoscaling: {enabled: false}
    drainTimeoutSeconds: 15
  api:
    replicas: 1
    tls: {secretName: $TP-api-tls}
  polling:
    replicas: 2
    providers:
      finnhub: {apiKeySecretRef: {name: finnhub-key, key: token}, baseUrl: "$FINNHUB_URL"}
    leaseTtlMs: 3000
    scanIntervalMs: 500
EOF
# the api's certificate names its Service's ClusterIP, known once the operator created the Service
until_ok 60 kubectl -n "$NS" get svc "$TP-api" || die "the operator did not create svc/$TP-api"
api_ip=$(kubectl -n "$NS" get svc "$TP-api" -o jsonpath='{.spec.clusterIP}')
api_port=$(kubectl -n "$NS" get svc "$TP-api" -o jsonpath='{.spec.ports[?(@.name=="grpc")].port}')
(
  cd "$certs"
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$TP-api" -keyout api.key -out api.csr 2>/dev/null
  printf 'subjectAltName=IP:%s,DNS:%s-api.%s.svc\nextendedKeyUsage=serverAuth\n' "$api_ip" "$TP" "$NS" >api.ext
  openssl x509 -req -in api.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile api.ext -out api.crt 2>/dev/null
)
kubectl -n "$NS" create secret tls "$TP-api-tls" --cert="$certs/api.crt" --key="$certs/api.key"
offer "$TP-api-tls"
t=$SECONDS
kubectl -n "$NS" wait --for=condition=Ready "tp/$TP" --timeout=3m
echo "Ready after $((SECONDS - t)) s"
kubectl -n "$NS" get tp "$TP" -o wide
ready_polls=$(kubectl -n "$NS" get tp "$TP" -o jsonpath='{.status.polling.pods.ready}')
[ "$ready_polls" = 2 ] || die "tp/$TP is Ready with $ready_polls ready poll connector pods, want 2"
for child in deploy/$TP-worker deploy/$TP-api deploy/$TP-poll svc/$TP-api configmap/$TP-config pdb/$TP-worker; do
  owner=$(kubectl -n "$NS" get "$child" -o jsonpath='{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}/{.metadata.ownerReferences[0].blockOwnerDeletion}')
  [ "$owner" = "TickPipeline/$TP/true" ] || die "$child: owner reference '$owner', want TickPipeline/$TP with blockOwnerDeletion"
done

log "6. the real pods: probes, read-only root, uid 65532, TLS Secrets"
ctr_() { ctr --address "$S/run/containerd.sock" -n k8s.io "$@"; }
for comp in worker api poller; do
  pod=$(kubectl -n "$NS" get pods -l "app.kubernetes.io/instance=$TP,app.kubernetes.io/component=$comp" -o jsonpath='{.items[0].metadata.name}')
  ip=$(kubectl -n "$NS" get pod "$pod" -o jsonpath='{.status.podIP}')
  port=$(kubectl -n "$NS" get pod "$pod" -o jsonpath='{.spec.containers[0].readinessProbe.httpGet.port}')
  # a named port (the probes name theirs): its number from the container's ports
  case "$port" in *[!0-9]*) port=$(kubectl -n "$NS" get pod "$pod" -o jsonpath="{.spec.containers[0].ports[?(@.name==\"$port\")].containerPort}") ;; esac
  path=$(kubectl -n "$NS" get pod "$pod" -o jsonpath='{.spec.containers[0].readinessProbe.httpGet.path}')
  [ -n "$(kubectl -n "$NS" get pod "$pod" -o jsonpath='{.spec.containers[0].livenessProbe.httpGet.path}')" ] || die "$pod has no liveness probe"
  # the kubelet's readiness probe passed (the pod is Ready) and answers the same to us
  curl -fsS "http://$ip:$port$path" >/dev/null || die "$pod: GET $path on $ip:$port failed"
  curl -fsS "http://$ip:$port/healthz" >/dev/null || die "$pod: /healthz failed"
  cid=$(kubectl -n "$NS" get pod "$pod" -o jsonpath='{.status.containerStatuses[0].containerID}')
  pid=$(ctr_ task ls | awk -v id="${cid#containerd://}" '$1 == id {print $2}')
  [ -n "$pid" ] || die "$pod: no running task for $cid"
  uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
  [ "$uid" = 65532 ] || die "$pod runs as uid $uid, not 65532"
  root_opts=$(awk '$5 == "/" {print $6}' "/proc/$pid/mountinfo" | head -1)
  case ",$root_opts," in *,ro,*) ;; *) die "$pod: root filesystem mounted '$root_opts', not read-only" ;; esac
  mounts=$(awk '{print $5}' "/proc/$pid/mountinfo")
  want=(/etc/tickfleet/redis-ca /etc/tickfleet/redis-client-tls)
  [ "$comp" = api ] && want+=(/etc/tickfleet/grpc-tls)
  for m in "${want[@]}"; do
    grep -qx "$m" <<<"$mounts" || die "$pod: no Secret mounted at $m"
    [ -n "$(ls "/proc/$pid/root$m")" ] || die "$pod: the Secret at $m is empty"
  done
  echo "$comp $pod: probes answer, uid $uid, root mounted $root_opts, Secrets at ${want[*]}"
done
# the worker reaches Redis over TLS with the mounted CA and client certificate (else it is not
# ready); the api serves gRPC with the mounted certificate, checked against our CA
"$TICKCTL" latest --api "https://$api_ip:$api_port" --ca-file "$certs/ca.crt" >/dev/null ||
  die "tickctl latest over TLS to https://$api_ip:$api_port failed"
echo "gRPC over TLS through svc/$TP-api ($api_ip:$api_port): ok"

log "7. $TICKS ticks at $RATE/s; scale 1 -> 3 and a worker pod deleted mid-stream"
"$TICKCTL" produce --brokers "$BROKERS" --topic ticks --assets 40 --count "$TICKS" --rate "$RATE" \
  --seed 7 --report "$work/report.json" >"$work/produce.log" 2>&1 &
producer=$!
pids+=("$producer")
sleep 3
kubectl -n "$NS" scale "tp/$TP" --replicas=3
t=$SECONDS
kubectl -n "$NS" wait --for=jsonpath='{.status.workers.ready}'=3 "tp/$TP" --timeout=2m
kubectl -n "$NS" rollout status "deploy/$TP-worker" --timeout=1m
echo "3 workers ready $((SECONDS - t)) s after kubectl scale"
kill -0 "$producer" 2>/dev/null || die "the producer finished before the disruption; raise TICKS"
victim=$(kubectl -n "$NS" get pods -l "app.kubernetes.io/instance=$TP,app.kubernetes.io/component=worker" -o jsonpath='{.items[0].metadata.name}')
grace=$(kubectl -n "$NS" get pod "$victim" -o jsonpath='{.spec.terminationGracePeriodSeconds}')
final=$(delete_and_watch "$NS" "$victim")
read -r code took reason <<<"$final"
echo "$victim: exit code $code ($reason), finished ${took} s after the delete (grace period ${grace} s)"
[ "$code" = 0 ] || die "$victim exited $code, not 0: it did not drain cleanly"
[ "$took" -le "$grace" ] || die "$victim took ${took} s, longer than its grace period ${grace} s"
wait "$producer" || { tail "$work/produce.log"; die "the producer failed"; }
tail -2 "$work/produce.log"
kubectl -n "$NS" wait --for=jsonpath='{.status.workers.ready}'=3 "tp/$TP" --timeout=2m
t=$SECONDS
ok=0
for _ in $(seq 1 30); do
  if "$TICKCTL" verify --report "$work/report.json" --redis-url "$REDIS_URL" --redis-prefix e2e \
    --redis-ca-file "$certs/ca.crt" --redis-client-cert-file "$certs/client.crt" --redis-client-key-file "$certs/client.key" \
    >"$work/verify.log" 2>&1; then ok=1; break; fi
  sleep 2
done
tail -3 "$work/verify.log"
[ "$ok" = 1 ] || die "tickctl verify: ticks lost, doubled or out of order"
echo "verified $((SECONDS - t)) s after the producer finished"

log "7b. a polling job over REST: fixture quote -> poll connector -> Redis cache and Kafka -> worker -> store"
t=$SECONDS
http_port=$(kubectl -n "$NS" get svc "$TP-api" -o jsonpath='{.spec.ports[?(@.name=="http")].port}')
REST=http://$api_ip:$http_port
job=$(curl -fsS -XPOST -H 'Content-Type: application/json' "$REST/v1/prices/poll" \
  -d '{"symbols":["AAPL"],"interval":"1s","provider":"finnhub"}') || die "POST /v1/prices/poll failed"
job_id=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["id"])' "$job")
price_is() { curl -fsS "$REST/v1/prices/latest?symbol=AAPL$1" | python3 -c 'import json, sys; sys.exit(json.load(sys.stdin)["price"] != "101.25")'; }
until_ok 60 price_is "&provider=finnhub" || die "no cached finnhub quote of AAPL 60 s after job $job_id: $(curl -sS "$REST/v1/polls/$job_id")"
until_ok 60 price_is "" || die "the polled AAPL tick did not reach the store through Kafka and a worker"
good=$(grep -c '^good /api/v1/quote?symbol=AAPL' "$work/finnhub.log" || true)
bad=$(grep -c '^bad' "$work/finnhub.log" || true)
if [ "$good" -lt 1 ] || [ "$bad" != 0 ]; then
  die "the fixture Finnhub saw $good requests with the Secret's key and $bad without"
fi
echo "job $job_id: AAPL 101.25 cached and stored $((SECONDS - t)) s after the POST; the fixture saw $good polls, all with the key"
curl -fsS -XDELETE "$REST/v1/polls/$job_id" || die "DELETE /v1/polls/$job_id failed"
# the LAG column without autoscaling (measured at most every 30 s)
has_lag() { test -n "$(kubectl -n "$NS" get tp "$TP" -o jsonpath='{.status.lag}')"; }
until_ok 45 has_lag || die "tp/$TP has no status.lag (the LAG column)"
kubectl -n "$NS" get tp "$TP"

log "8. a pipeline whose Kafka never answers: Events, folded logs, operator SIGTERM within 5 s"
# accepts connections and never answers: every Kafka request times out
python3 -c '
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(64)
print(s.getsockname()[1], flush=True)
held = []
while True:
    c, a = s.accept(); held.append(c); print("accepted", a, file=sys.stderr, flush=True)
' "$NODE_IP" >"$work/blackhole.port" 2>"$work/blackhole.log" &
pids+=($!)
until_ok 10 test -s "$work/blackhole.port" || die "the black hole did not start"
hole=$NODE_IP:$(cat "$work/blackhole.port")
leader=$(kubectl -n "$OP_NS" get lease "$RELEASE-operator" -o jsonpath='{.spec.holderIdentity}')
kubectl apply -f - <<EOF
apiVersion: tickfleet.io/v1alpha1
kind: TickPipeline
metadata: {name: silent, namespace: $NS}
spec:
  image: $IMAGE
  imagePullPolicy: Never
  kafka: {bootstrapServers: "$hole", topic: ticks, partitions: 2}
  store: {redis: {url: "$REDIS_URL"}, keyPrefix: silent}
  workers: {replicas: 1}
  api: {replicas: 0}
EOF
has_event() { events "$1" | grep -q "^$2"; }
until_ok 60 has_event silent KafkaUnreachable || die "no KafkaUnreachable Event for tp/silent: $(events silent)"
events silent
# (kubectl wait --for=jsonpath takes no filter expressions in v1.28)
degraded_reason() { kubectl -n "$NS" get tp silent -o jsonpath='{.status.conditions[?(@.type=="Degraded")].reason}'; }
topic_unavailable() { test "$(degraded_reason)" = TopicUnavailable; }
until_ok 60 topic_unavailable || die "tp/silent: Degraded reason '$(degraded_reason)', want TopicUnavailable"
# the retry after the backoff is a Kafka call in flight again: SIGTERM the leader during it
n=$(grep -c accepted "$work/blackhole.log" || true)
more_accepted() { [ "$(grep -c accepted "$work/blackhole.log")" -gt "$n" ]; }
until_ok 30 more_accepted || die "the operator did not retry Kafka"
lines=$(kubectl -n "$OP_NS" logs "$leader" | grep -c librdkafka || true)
echo "operator $leader: $lines librdkafka log lines so far"
final=$(delete_and_watch "$OP_NS" "$leader")
read -r code took reason <<<"$final"
echo "operator $leader: exit code $code ($reason), stopped ${took} s after the delete, with a Kafka call in flight"
[ "$code" = 0 ] || die "the operator exited $code on SIGTERM"
[ "$took" -le 5 ] || die "the operator took ${took} s to stop on SIGTERM (limit 5 s)"
[ "$lines" -le 20 ] || die "the operator wrote $lines librdkafka lines for one unreachable Kafka"
worker_lines=$(kubectl -n "$NS" logs -l app.kubernetes.io/instance=silent,app.kubernetes.io/component=worker --tail=-1 | wc -l)
echo "the worker of tp/silent: $worker_lines log lines"
kubectl -n "$NS" delete tp silent --cascade=foreground --timeout=60s

log "8b. leader failover: the leader frozen (SIGSTOP: it neither renews nor releases the Lease)"
# the chart's values above: lease 15 s, retry 5 s. The standby watches the Lease, so it takes it a
# lease duration after the frozen leader's last renewal, and never before: checked on the Lease's
# own renewTime and the new holder's acquireTime (both stamped on this node's clock)
kubectl -n "$OP_NS" rollout status deploy/"$RELEASE-operator" --timeout=2m
lease() { kubectl -n "$OP_NS" get lease "$RELEASE-operator" -o jsonpath="{.spec.$1}"; }
leader=$(lease holderIdentity)
standby=$(kubectl -n "$OP_NS" get pods -l app.kubernetes.io/component=operator -o name | grep -v "/$leader\$" | head -1)
[ -n "$standby" ] || die "no standby operator pod besides the leader $leader"
until_ok 60 bash -c "kubectl -n $OP_NS logs $standby | grep -q 'waiting to become leader'" ||
  die "$standby is not standing by"
# the host pid of the leader's process: the kubelet's cgroupfs paths name the pod's uid
uid=$(kubectl -n "$OP_NS" get pod "$leader" -o jsonpath='{.metadata.uid}')
pid=""
for f in /proc/[0-9]*/cgroup; do
  p=${f#/proc/}; p=${p%/cgroup}
  grep -q -e "pod$uid" -e "pod${uid//-/_}" "$f" 2>/dev/null || continue
  if [ "$(basename "$(readlink "/proc/$p/exe" 2>/dev/null)")" = tickfleet-operator ]; then pid=$p; fi
done
[ -n "$pid" ] || die "no host process of the leader pod $leader (uid $uid)"
kill -STOP "$pid"
# a renewal in flight when it stopped may still land: read the last one a moment later
sleep 1
renewed=$(lease renewTime)
[ "$(lease holderIdentity)" = "$leader" ] || die "the Lease changed hands before the lease expired"
lease_moved() { test "$(lease holderIdentity)" != "$leader"; }
until_ok 40 lease_moved || die "no standby took the Lease 40 s after the leader froze"
acquired=$(lease acquireTime)
echo "the frozen leader $leader (pid $pid): $(lease holderIdentity) took the Lease at $acquired, after its last renewal at $renewed"
kill -KILL "$pid"
took=$(python3 -c '
import datetime, sys
t = [datetime.datetime.fromisoformat(a.replace("Z", "+00:00")) for a in sys.argv[1:]]
print("%.3f" % (t[1] - t[0]).total_seconds())' "$renewed" "$acquired")
echo "leader failover: the Lease was taken ${took} s after the last renewal (lease 15 s, retry 5 s)"
python3 -c 'import sys; sys.exit(0 if 15 <= float(sys.argv[1]) <= 20 else 1)' "$took" ||
  die "the Lease was taken ${took} s after the last renewal: want the lease duration (15 s) to one retry period (5 s) more"

log "9. delete the pipeline (foreground: every child first), uninstall the chart"
kubectl -n "$NS" delete "tp/$TP" --cascade=foreground --timeout=2m
for kind in deploy rs pods svc configmap pdb; do
  left=$(kubectl -n "$NS" get "$kind" -l "app.kubernetes.io/instance=$TP" -o name)
  [ -z "$left" ] || die "after deleting tp/$TP, still there: $left"
done
if command -v helm >/dev/null; then
  helm uninstall "$RELEASE" -n "$OP_NS" --wait --timeout 2m
else
  "$venv/bin/python" tests/e2e/helm.py uninstall "$RELEASE" "$OP_NS"
fi
until_ok 60 bash -c "! kubectl -n $OP_NS get pods -l app.kubernetes.io/component=operator -o name | grep -q ." ||
  die "operator pods still there after the uninstall"
kubectl get crd tickpipelines.tickfleet.io >/dev/null  # Helm keeps crds/ (deleting it would delete every pipeline)
