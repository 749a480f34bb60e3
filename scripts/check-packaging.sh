#!/usr/bin/env bash
# Static checks of tickfleet's packaging, no Docker or cluster needed (scripts/check_packaging.py
# says what each check does): Kubernetes manifests against the Kubernetes schemas (strict), the
# Helm chart (lint, template rendering with defaults and with every option, values schema, RBAC the
# same as manifests/, CRD copy), docker-compose.yml (Compose spec, mounts, dependencies), the
# Dockerfile (same cargo build as CI, toolchain, user), the healthcheck probe, kind files, and
# a shellcheck run over the shell scripts.
#
# Python tools go into a venv under ~/.cache/tickfleet (TICKFLEET_TOOLS_DIR overrides), reinstalled
# when scripts/packaging-requirements.txt changes. Uses a helm binary instead of Helm's library
# when one is on PATH. Exits non-zero when any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=${TICKFLEET_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tickfleet}
venv=$tools/packaging-venv
req=scripts/packaging-requirements.txt
stamp=$venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing the packaging check tools into $venv"
  rm -rf "$venv"
  mkdir -p "$tools"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  echo "$want" >"$stamp"
fi

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v shellcheck >/dev/null; then
  echo "==> installing shellcheck (apt)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null 2>&1 || {
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null
  }
fi

status=0
if shellcheck scripts/*.sh tests/e2e/*.sh tests/kafka/*.sh .ci/run; then
  echo "PASS shellcheck (scripts/*.sh, tests/e2e/*.sh, tests/kafka/*.sh, .ci/run)"
else
  echo "FAIL shellcheck"
  status=1
fi
# promtool comes with Debian's prometheus package (which the metrics tests install); when present it
# checks compose's Prometheus config and the alert rules it loads
if command -v promtool >/dev/null; then
  if promtool check config --syntax-only prometheus/prometheus.yml >/dev/null &&
    { [ ! -f prometheus/alerts.yml ] || promtool check rules prometheus/alerts.yml >/dev/null; }; then
    echo "PASS promtool check config prometheus/prometheus.yml (and rules, when present)"
  else
    echo "FAIL promtool check config prometheus/prometheus.yml"
    status=1
  fi
  # the alert rules' unit tests: each alert fires on its condition after its for:, not on look-alikes
  if promtool test rules prometheus/tests/alerts-test.yml >/dev/null; then
    echo "PASS promtool test rules prometheus/tests/alerts-test.yml"
  else
    promtool test rules prometheus/tests/alerts-test.yml || true
    echo "FAIL promtool test rules prometheus/tests/alerts-test.yml"
    status=1
  fi
else
  echo "SKIP promtool check config (no promtool on PATH; apt-get install prometheus)"
fi
# Helm's library logs an INFO line for each symlink it follows (files/dashboards, files/prometheus)
"$venv/bin/python" scripts/check_packaging.py "$@" 2> >(grep -v 'found symbolic link in path' >&2) || status=1
exit "$status"
