#!/usr/bin/env bash
# End-to-end test of tickfleet on a real Kubernetes cluster (kind). Needs docker, kind, kubectl and
# helm on PATH; grpcurl is optional (without it the api is queried from a pod in the cluster).
# It does not run in CI (no Docker engine there); run it on a workstation:
#
#   bash tests/e2e/kind.sh
#
# What it does, failing at the first step that does not hold:
#   1. creates the kind cluster from kind-config.yaml (or reuses one of that name);
#   2. builds the image (Dockerfile) and `kind load`s it;
#   3. `helm install`s charts/tickfleet (CRD, RBAC, two operator replicas with leader election);
#   4. applies the dev namespace, single-node KRaft Kafka and Redis (manifests/dev/);
#   5. applies the TickPipeline (manifests/dev/pipeline.yaml) and waits for condition Ready;
#   6. produces TICKS ticks at RATE/s from a pod (tickctl produce, with a report);
#   7. while that runs: queries the api over gRPC (reflection, health, ListAssets), scales the
#      pipeline to 3 workers with `kubectl scale tp/btc --replicas=3`, checks that asking for more
#      workers than partitions is capped (WorkersCapped), and deletes a worker pod mid-stream;
#   8. when the producer is done, `tickctl verify` checks Redis against the report: every tick
#      stored exactly once, in order (retried while the workers catch up);
#   9. deletes the TickPipeline (its children are garbage-collected) and uninstalls the chart;
#  10. deletes the cluster (KEEP_CLUSTER=1 keeps it, for poking around).
#
# Knobs: KIND_CLUSTER (tickfleet), IMAGE (ghcr.io/tickfleet/tickfleet:dev), TICKS (120000),
# RATE (2000), SKIP_BUILD=1 (use an image already built), KEEP_CLUSTER=1,
# TICKFLEET_E2E_MONITORING=1 (also installs kube-prometheus-stack with Grafana on localhost:3000,
# and enables the chart's ServiceMonitor, PodMonitor, PrometheusRule and dashboards).
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${KIND_CLUSTER:-tickfleet}
IMAGE=${IMAGE:-ghcr.io/tickfleet/tickfleet:dev}
TICKS=${TICKS:-120000}
RATE=${RATE:-2000}
NS=markets
OP_NS=tickfleet-system
RELEASE=tickfleet
CTX="kind-$CLUSTER"
KAFKA=kafka.$NS.svc.cluster.local:9092
REDIS=redis://redis.$NS.svc.cluster.local:6379

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
k() { kubectl --context "$CTX" "$@"; }

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || die "$tool is not on PATH (this test needs docker, kind, kubectl and helm)"
done

diagnostics() {
  log "diagnostics"
  k get nodes -o wide || true
  k get tp -A -o wide || true
  k -n "$NS" describe tp btc || true
  k get pods -A -o wide || true
  k -n "$OP_NS" logs -l app.kubernetes.io/component=operator --tail=100 --prefix || true
  k -n "$NS" logs -l app.kubernetes.io/component=worker --tail=50 --prefix || true
  k -n "$NS" logs -l app.kubernetes.io/component=api --tail=50 --prefix || true
  k -n "$NS" get events --sort-by=.lastTimestamp | tail -40 || true
}
finish() {
  rc=$?
  if [ "$rc" -ne 0 ]; then diagnostics; fi
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    log "keeping cluster $CLUSTER (kind delete cluster --name $CLUSTER)"
  else
    log "deleting cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" || true
  fi
  if [ "$rc" -eq 0 ]; then echo "kind e2e: PASSED"; else echo "kind e2e: FAILED ($rc)"; fi
  exit "$rc"
}
trap finish EXIT

log "1. kind cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "reusing the existing cluster"
else
  kind create cluster --name "$CLUSTER" --config kind-config.yaml --wait 120s
fi

log "2. image $IMAGE"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  DOCKER_BUILDKIT=1 docker build -t "$IMAGE" .
fi
kind load docker-image "$IMAGE" --name "$CLUSTER"

chart_args=()
if [ "${TICKFLEET_E2E_MONITORING:-0}" = 1 ]; then
  log "2b. kube-prometheus-stack (Grafana on http://localhost:3000, admin/admin)"
  helm repo add prometheus-community https://prometheus-community.github.io/helm-charts >/dev/null
  helm repo update prometheus-community >/dev/null
  helm --kube-context "$CTX" upgrade --install kps prometheus-community/kube-prometheus-stack \
    -n monitoring --create-namespace --wait --timeout 10m \
    --set grafana.service.type=NodePort --set grafana.service.nodePort=30300 \
    --set grafana.adminPassword=admin \
    --set grafana.sidecar.dashboards.enabled=true --set grafana.sidecar.dashboards.searchNamespace=ALL \
    --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false \
    --set prometheus.prometheusSpec.podMonitorSelectorNilUsesHelmValues=false \
    --set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false
  chart_args+=(--set metrics.serviceMonitor.enabled=true --set metrics.podMonitor.enabled=true
    --set metrics.prometheusRule.enabled=true --set dashboards.enabled=true)
fi

log "3. helm install $RELEASE (charts/tickfleet)"
helm --kube-context "$CTX" upgrade --install "$RELEASE" charts/tickfleet -n "$OP_NS" --create-namespace \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=IfNotPresent \
  ${chart_args[@]+"${chart_args[@]}"} --wait --timeout 5m
k get crd tickpipelines.tickfleet.io >/dev/null
k -n "$OP_NS" rollout status deploy/"$RELEASE-operator" --timeout=3m
# one of the two replicas holds the leader Lease
for _ in $(seq 1 30); do
  holder=$(k -n "$OP_NS" get lease "$RELEASE-operator" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
  [ -n "$holder" ] && break
  sleep 2
done
[ -n "$holder" ] || die "no operator replica took the leader Lease"
echo "leader: $holder"

log "4. dev Kafka (KRaft) and Redis in namespace $NS"
k apply -f manifests/dev/namespace.yaml -f manifests/dev/kafka.yaml -f manifests/dev/redis.yaml
k -n "$NS" rollout status statefulset/kafka --timeout=5m
k -n "$NS" rollout status deploy/redis --timeout=3m

log "5. TickPipeline btc"
k apply -f manifests/dev/pipeline.yaml
k -n "$NS" wait --for=condition=Ready tp/btc --timeout=5m
k -n "$NS" get tp btc
# children exist and are owned by the pipeline
for child in deploy/btc-worker deploy/btc-api svc/btc-api configmap/btc-config pdb/btc-worker; do
  owner=$(k -n "$NS" get "$child" -o jsonpath='{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}')
  [ "$owner" = TickPipeline/btc ] || die "$child is owned by '$owner', not TickPipeline/btc"
done

log "6. producing $TICKS ticks at $RATE/s"
k apply -f - <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: e2e-reports, namespace: $NS}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 64Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: e2e-produce, namespace: $NS, labels: {app: e2e}}
spec:
  restartPolicy: Never
  securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532, fsGroup: 65532, seccompProfile: {type: RuntimeDefault}}
  containers:
    - name: produce
      image: $IMAGE
      imagePullPolicy: IfNotPresent
      command: [/usr/local/bin/tickctl, produce, --brokers=$KAFKA, --topic=ticks, --assets=50,
                --rate=$RATE, --count=$TICKS, --seed=42, --report=/reports/report.json]
      securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
      volumeMounts: [{name: reports, mountPath: /reports}]
  volumes: [{name: reports, persistentVolumeClaim: {claimName: e2e-reports}}]
EOF
k -n "$NS" wait --for=jsonpath='{.status.phase}'=Running pod/e2e-produce --timeout=3m

log "7a. query the api"
grpc() {
  if command -v grpcurl >/dev/null; then
    # through kind-config.yaml's port mapping and the btc-api-nodeport Service
    grpcurl -plaintext "$@" localhost:50051 "${method[@]}"
  else
    k -n "$NS" run "grpcurl-$RANDOM" --rm -i --restart=Never --quiet --image=fullstorydev/grpcurl:v1.9.3 -- \
      -plaintext "$@" btc-api.$NS.svc.cluster.local:50051 "${method[@]}"
  fi
}
method=(list); services=$(grpc)
echo "$services"
grep -qx tickfleet.v1.TickService <<<"$services" || die "the api does not list tickfleet.v1.TickService"
method=(grpc.health.v1.Health/Check); grpc | grep -q SERVING || die "the api is not SERVING"
sleep 5  # let some ticks land
method=(tickfleet.v1.TickService/ListAssets); assets=$(grpc -d '{}')
grep -q A0000 <<<"$assets" || die "ListAssets does not return the produced assets: $assets"

log "7b. kubectl scale tp/btc --replicas=3"
k -n "$NS" scale tp/btc --replicas=3
k -n "$NS" wait --for=jsonpath='{.status.workers.ready}'=3 tp/btc --timeout=3m
k -n "$NS" rollout status deploy/btc-worker --timeout=3m
# more workers than the topic's 6 partitions: capped, and a condition says why
k -n "$NS" scale tp/btc --replicas=10
k -n "$NS" wait --for=condition=WorkersCapped tp/btc --timeout=2m
k -n "$NS" scale tp/btc --replicas=3
k -n "$NS" wait --for=jsonpath='{.status.workers.ready}'=3 tp/btc --timeout=3m

log "7c. deleting a worker pod mid-stream"
phase=$(k -n "$NS" get pod e2e-produce -o jsonpath='{.status.phase}')
[ "$phase" = Running ] || die "the producer is already $phase; raise TICKS so the disruption is mid-stream"
victim=$(k -n "$NS" get pods -l app.kubernetes.io/instance=btc,app.kubernetes.io/component=worker \
  -o jsonpath='{.items[0].metadata.name}')
k -n "$NS" delete pod "$victim" --wait=false
echo "deleted $victim"

log "8. waiting for the producer, then tickctl verify"
k -n "$NS" wait --for=jsonpath='{.status.phase}'=Succeeded pod/e2e-produce --timeout="$((TICKS / RATE + 180))s"
k -n "$NS" logs e2e-produce | tail -5
k -n "$NS" wait --for=jsonpath='{.status.workers.ready}'=3 tp/btc --timeout=3m
ok=0
for attempt in $(seq 1 12); do
  k -n "$NS" delete pod e2e-verify --ignore-not-found --wait=true >/dev/null
  k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: e2e-verify, namespace: $NS, labels: {app: e2e}}
spec:
  restartPolicy: Never
  securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532, fsGroup: 65532, seccompProfile: {type: RuntimeDefault}}
  containers:
    - name: verify
      image: $IMAGE
      imagePullPolicy: IfNotPresent
      command: [/usr/local/bin/tickctl, verify, --report=/reports/report.json, --redis-url=$REDIS, --redis-prefix=tf]
      securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
      volumeMounts: [{name: reports, mountPath: /reports, readOnly: true}]
  volumes: [{name: reports, persistentVolumeClaim: {claimName: e2e-reports}}]
EOF
  k -n "$NS" wait --for=jsonpath='{.status.phase}'=Succeeded pod/e2e-verify --timeout=60s >/dev/null 2>&1 || true
  phase=$(k -n "$NS" get pod e2e-verify -o jsonpath='{.status.phase}')
  k -n "$NS" logs e2e-verify | tail -3
  if [ "$phase" = Succeeded ]; then ok=1; break; fi
  echo "attempt $attempt: $phase; the workers may still be catching up (lag: $(k -n "$NS" get tp btc -o jsonpath='{.status.lag}'))"
  sleep 10
done
[ "$ok" = 1 ] || die "tickctl verify did not pass: ticks lost, duplicated or out of order"

log "9. delete the pipeline (children are garbage-collected) and uninstall the chart"
k -n "$NS" delete pod e2e-produce e2e-verify --ignore-not-found
k -n "$NS" delete pvc e2e-reports --ignore-not-found
k -n "$NS" delete tp btc --wait=true --timeout=2m
k -n "$NS" wait --for=delete deploy/btc-worker deploy/btc-api --timeout=2m
helm --kube-context "$CTX" uninstall "$RELEASE" -n "$OP_NS" --wait --timeout 3m
if k -n "$OP_NS" get deploy "$RELEASE-operator" >/dev/null 2>&1; then die "the operator is still there after helm uninstall"; fi
# Helm never deletes CRDs from crds/ (that would delete every TickPipeline): it is left in place
k get crd tickpipelines.tickfleet.io >/dev/null
