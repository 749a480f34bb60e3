#!/usr/bin/env python3
"""Static checks of tickfleet's packaging: Kubernetes manifests, the Helm chart, docker-compose.yml,
the Dockerfile and kind files. Run by scripts/check-packaging.sh (which installs the Python tools);
exits 1 when any check fails. Nothing here needs Docker, a cluster or the network.

Each check prints PASS or FAIL with what it looked at; the last line sums them up.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import compose_spec
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "tickfleet"
# Kubernetes versions manifests are validated against: the oldest the chart supports (Chart.yaml
# kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ["1.25", kubernetes_validate.utils.latest_version()]
# Kinds from other projects' CRDs that the chart may render: no schema ships offline, so only their
# apiVersion/kind and a few required fields are checked.
FOREIGN_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["spec.selector", "spec.endpoints"],
    ("monitoring.coreos.com/v1", "PodMonitor"): ["spec.selector", "spec.podMetricsEndpoints"],
    ("monitoring.coreos.com/v1", "PrometheusRule"): ["spec.groups"],
}
# Binary that issue 3 (the gRPC api) adds; until its crate exists, references to it are reported
# but not failed. Once api/Cargo.toml exists the check is strict.
PENDING_BINARIES = {"tickfleet-api": ROOT / "api" / "Cargo.toml"}
# Crates whose clap `env = "..."` names each binary reads (its own crate, the shared ones).
BINARY_CRATES = {
    "tickfleet-worker": ["worker", "service", "store"],
    "tickfleet-operator": ["operator", "service"],
    "tickctl": ["cli", "worker", "service", "store"],
    "tickfleet-api": ["api", "service", "store"],
    "tickfleet-connector": ["connector", "service"],
}
# Read by libraries rather than by clap.
GENERIC_ENV = {"RUST_LOG", "RUST_BACKTRACE"}

results: list[tuple[bool, str]] = []


def check(name: str):
    """Decorator: run a check, record PASS/FAIL; a check returns notes or raises AssertionError."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                note = fn(*args, **kwargs)
                results.append((True, name))
                print(f"PASS {name}" + (f" ({note})" if note else ""), flush=True)
            except AssertionError as e:
                results.append((False, name))
                print(f"FAIL {name}\n     {str(e).replace(chr(10), chr(10) + '     ')}", flush=True)

        return run

    return wrap


def warn(msg: str) -> None:
    print(f"WARN {msg}", flush=True)


class StrictLoader(yaml.SafeLoader):
    """Rejects duplicate mapping keys, as Kubernetes' and Helm's YAML decoders do (PyYAML keeps the
    last one silently)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_all_text(text: str, where: str) -> list[dict]:
    try:
        return [d for d in yaml.load_all(text, Loader=StrictLoader) if d]
    except yaml.YAMLError as e:
        raise AssertionError(f"{where} is not valid YAML:\n{e}") from None


def load_all(path: Path) -> list[dict]:
    return load_all_text(path.read_text(), rel(path))


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


# ---------------------------------------------------------------------------------------------
# Kubernetes objects


def crd_spec_schema() -> dict:
    crd = load_all(ROOT / "manifests" / "crd.yaml")[0]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return strict_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]["properties"]["spec"]))


def strict_schema(s: dict) -> dict:
    """The API server rejects unknown fields (kubectl's default field validation is Strict): mirror
    that by closing every object schema that lists its properties."""
    if isinstance(s, dict):
        if (
            s.get("type") == "object"
            and "properties" in s
            and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")
        ):
            s["additionalProperties"] = False
        if s.get("nullable"):
            t = s.get("type")
            if isinstance(t, str):
                s["type"] = [t, "null"]
        for v in list(s.values()):
            if isinstance(v, dict):
                strict_schema(v)
            elif isinstance(v, list):
                for item in v:
                    strict_schema(item)
        if isinstance(s.get("properties"), dict):
            for v in s["properties"].values():
                strict_schema(v)
    return s


def validate_objects(docs: list[tuple[str, dict]]) -> list[str]:
    """Validates Kubernetes objects; returns problems. Built-in kinds: kubernetes-validate, strict,
    at every KUBE_VERSIONS; TickPipeline: the spec against the CRD's schema; foreign CRD kinds:
    required fields only; anything else is a problem."""
    problems = []
    spec_schema = crd_spec_schema()
    for where, doc in docs:
        kind, api = doc.get("kind"), doc.get("apiVersion")
        name = f"{where}: {kind}/{doc.get('metadata', {}).get('name')}"
        if (api, kind) == ("tickfleet.io/v1alpha1", "TickPipeline"):
            errors = sorted(jsonschema.Draft7Validator(spec_schema).iter_errors(doc.get("spec", {})), key=str)
            problems += [f"{name}: spec.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
            extra = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
            if extra:
                problems.append(f"{name}: unexpected top-level fields {sorted(extra)}")
            n = doc.get("metadata", {}).get("name", "")
            if len(n) > 56:
                problems.append(f"{name}: metadata.name longer than 56 characters (CRD rule)")
            continue
        if (api, kind) in FOREIGN_KINDS:
            for path in FOREIGN_KINDS[(api, kind)]:
                node = doc
                for part in path.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                if not node:
                    problems.append(f"{name}: {path} is missing or empty")
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(map(str, e.path))
                problems.append(f"{name} (Kubernetes {version}): {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{name}: no schema for {api} {kind} in Kubernetes {version}")
    return problems


@check("manifests/ validate (kubernetes-validate --strict; TickPipelines against the CRD schema)")
def check_manifests():
    files = sorted((ROOT / "manifests").rglob("*.yaml"))
    docs = [(rel(f), d) for f in files for d in load_all(f)]
    problems = validate_objects(docs)
    assert not problems, "\n".join(problems)
    return f"{len(docs)} objects in {len(files)} files, Kubernetes {' and '.join(KUBE_VERSIONS)}"


@check("manifests/crd.yaml equals the chart's crds/ copy")
def check_crd_copy():
    a = ROOT / "manifests" / "crd.yaml"
    b = CHART / "crds" / "tickpipelines.tickfleet.io.yaml"
    assert b.exists(), f"{rel(b)} is missing"
    assert a.read_bytes() == b.read_bytes(), f"{rel(b)} differs from {rel(a)}: cp {rel(a)} {rel(b)}"
    others = [p.name for p in (CHART / "crds").iterdir() if p != b]
    assert not others, f"unexpected files in crds/: {others}"


# ---------------------------------------------------------------------------------------------
# Helm chart


def helm_binary() -> str | None:
    return shutil.which("helm")


def helm_render(chart: Path, values: dict, namespace: str = "tickfleet-system") -> dict[str, str]:
    """Renders the chart's templates like `helm template` (the helm binary when on PATH, else Helm's
    library through helm-python-sdk); returns {template path: manifest text}."""
    if helm_binary():
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(values, f)
        try:
            out = subprocess.run(
                [helm_binary(), "template", "tf", str(chart), "-n", namespace, "-f", f.name],
                capture_output=True, text=True,
            )
        finally:
            os.unlink(f.name)
        assert out.returncode == 0, out.stderr
        rendered: dict[str, str] = {}
        for part in re.split(r"^---\s*$", out.stdout, flags=re.M):
            m = re.search(r"^# Source: (.+)$", part, flags=re.M)
            if m and part.strip():
                rendered[m.group(1)] = rendered.get(m.group(1), "") + "\n---\n" + part
        return rendered
    from helm_python import chart as hchart
    from helm_python import errors as herrors

    try:
        c = hchart.Chart.load(str(chart))
        return c.render(values, name="tf", namespace=namespace, is_install=True)
    except herrors.HelmError as e:
        raise AssertionError(f"rendering failed: {e}") from None


def rendered_docs(rendered: dict[str, str]) -> list[tuple[str, dict]]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [(path, d) for d in load_all_text(text, path)]
    return docs


@check("helm lint (strict): no errors or warnings")
def check_lint():
    if helm_binary():
        out = subprocess.run([helm_binary(), "lint", "--strict", str(CHART)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        return "helm binary"
    from helm_python import chart as hchart

    report = hchart.lint(str(CHART), strict=True)
    bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    assert not bad and not report.get("errors"), json.dumps(report, indent=2)
    infos = [f"{m['path']}: {m['error']}" for m in report.get("messages", [])]
    return "Helm library via helm-python-sdk" + (f"; info: {'; '.join(infos)}" if infos else "")


@check("values.yaml validates against values.schema.json (and the schema rejects typos)")
def check_values_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(values)]
    assert not errors, "\n".join(errors)
    # every key of values.yaml is described by the schema, and the schema is closed where it should be
    for bad, what in [
        ({"operator": {"replicaz": 2}}, "an unknown key"),
        ({"operator": {"replicas": "two"}}, "a wrong type"),
        ({"image": {"pullPolicy": "Sometimes"}}, "a bad enum value"),
        ({"pipelines": [{"name": "Has_Upper", "spec": {"kafka": {}, "store": {}}}]}, "a bad pipeline name"),
    ]:
        merged = copy.deepcopy(values)
        for k, v in bad.items():
            merged[k] = {**merged[k], **v} if isinstance(v, dict) else v
        assert not jsonschema.Draft7Validator(schema).is_valid(merged), f"the schema accepts {what}: {bad}"
    if not helm_binary():
        from helm_python import chart as hchart
        from helm_python import errors as herrors

        c = hchart.Chart.load(str(CHART))
        c.validate_schema({})  # Helm's own validator on the defaults
        try:
            c.validate_schema({"operator": {"replicaz": 2}})
            raise AssertionError("Helm's schema validation accepts an unknown key")
        except herrors.HelmError:
            pass


def full_values() -> dict:
    return {
        "image": {"digest": "sha256:" + "a" * 64},
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
            "podMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
        },
        "dashboards": {"enabled": True, "annotations": {"grafana_folder": "tickfleet"}},
        "networkPolicy": {"enabled": True, "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
        "pipelines": [{
            "name": "btc",
            "namespace": "markets",
            "spec": {
                "kafka": {"bootstrapServers": "kafka.markets.svc:9092", "topic": "ticks", "partitions": 6},
                "store": {"redis": {"url": "redis://redis.markets.svc:6379"}},
                "workers": {"replicas": 2},
                "sources": [{"exchange": "binance", "symbols": ["BTC-USDT", "ETH-USDT", "SOL-USDT"]}],
                "polling": {"replicas": 2, "providers": {
                    "finnhub": {"apiKeySecretRef": {"name": "finnhub-api-key", "key": "token"}},
                    "yahoo": {}}},
            },
        }],
    }


@check("helm template (defaults, and every option on) gives valid objects")
def check_template():
    rendered = helm_render(CHART, {})
    docs = rendered_docs(rendered)
    kinds = sorted(d["kind"] for _, d in docs)
    for want in ["ClusterRole", "ClusterRoleBinding", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Role", "RoleBinding", "Service", "ServiceAccount"]:
        assert want in kinds, f"default render has no {want}: {kinds}"
    assert not {"ServiceMonitor", "PodMonitor", "PrometheusRule", "TickPipeline", "ConfigMap"} & set(kinds), f"optional objects rendered by default: {kinds}"
    problems = validate_objects(docs)

    # every option on, against a copy of the chart carrying one dashboard and one rules file, so the
    # .Files wiring is exercised whether or not dashboards/ and prometheus/alerts.yml exist yet
    with tempfile.TemporaryDirectory() as tmp:
        copy_ = Path(tmp) / "tickfleet"
        shutil.copytree(CHART, copy_, symlinks=False)
        (copy_ / "files" / "dashboards").mkdir(parents=True, exist_ok=True)
        (copy_ / "files" / "prometheus").mkdir(parents=True, exist_ok=True)
        (copy_ / "files" / "dashboards" / "zz-fixture.json").write_text('{"title": "fixture", "panels": []}\n')
        alerts = copy_ / "files" / "prometheus" / "alerts.yml"
        if not alerts.exists():
            alerts.write_text("groups:\n  - name: fixture\n    rules:\n      - alert: Fixture\n        expr: vector(1)\n")
        want_groups = yaml.safe_load(alerts.read_text())["groups"]
        full = helm_render(copy_, full_values())
    full_docs = rendered_docs(full)
    problems += validate_objects(full_docs)
    by_kind = {}
    for _, d in full_docs:
        by_kind.setdefault(d["kind"], []).append(d)
    for want in ["ServiceMonitor", "PodMonitor", "PrometheusRule", "TickPipeline", "ConfigMap"]:
        assert want in by_kind, f"full render has no {want}"
    (cm,) = by_kind["ConfigMap"]
    assert cm["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboards ConfigMap lacks grafana_dashboard: \"1\""
    assert json.loads(cm["data"]["zz-fixture.json"])["title"] == "fixture", "fixture dashboard not in the ConfigMap"
    size = sum(len(v.encode()) for v in cm["data"].values())
    assert size < 900 * 1024, f"dashboards ConfigMap holds {size} bytes; Kubernetes caps a ConfigMap at 1 MiB"
    assert by_kind["PrometheusRule"][0]["spec"]["groups"] == want_groups, "PrometheusRule groups differ from alerts.yml"
    (tp,) = by_kind["TickPipeline"]
    assert tp["metadata"]["namespace"] == "markets" and tp["spec"]["image"] == "ghcr.io/tickfleet/tickfleet@sha256:" + "a" * 64, tp
    (dep,) = [d for d in by_kind["Deployment"]]
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith("@sha256:" + "a" * 64)
    assert problems == [], "\n".join(problems)
    notes = full.get("tickfleet/templates/NOTES.txt", "")
    assert "kubectl" in notes, "NOTES.txt did not render"
    return f"{len(docs)} objects by default, {len(full_docs)} with every option; {'helm binary' if helm_binary() else 'helm-python-sdk'}"


@check("chart RBAC equals manifests/rbac.yaml (same least-privilege rules)")
def check_rbac_same():
    def rules(docs):
        return {d["kind"]: d["rules"] for d in docs if d["kind"] in ("ClusterRole", "Role")}

    manifest = rules(load_all(ROOT / "manifests" / "rbac.yaml"))
    chart = rules(d for _, d in rendered_docs(helm_render(CHART, {})))
    # the Lease name is the release's in the chart; compare the rest
    for r in chart.get("Role", []):
        if "resourceNames" in r:
            r["resourceNames"] = ["tickfleet-operator"]
    assert manifest == chart, f"manifests: {json.dumps(manifest)}\nchart:     {json.dumps(chart)}"


# ---------------------------------------------------------------------------------------------
# Binaries, env vars and the Dockerfile


def cargo_bins() -> set[str]:
    out = subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--locked", "--offline"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    meta = json.loads(out.stdout)
    return {t["name"] for p in meta["packages"] for t in p["targets"] if "bin" in t["kind"]}


def known_env(binary: str) -> set[str]:
    names = set(GENERIC_ENV)
    for crate in BINARY_CRATES.get(binary, []):
        for f in (ROOT / crate).rglob("*.rs"):
            names |= set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', f.read_text()))
    return names


def binary_problems(refs: dict[str, list[str]], bins: set[str]) -> list[str]:
    problems = []
    for binary, where in sorted(refs.items()):
        if binary in bins or binary == "tickfleet-probe":
            continue
        marker = PENDING_BINARIES.get(binary)
        if marker is not None and not marker.exists():
            warn(f"{binary} is referenced ({', '.join(sorted(set(where)))}) but not built yet: {rel(marker)} does not exist (issue 3)")
            continue
        problems.append(f"{binary} (used in {', '.join(sorted(set(where)))}) is not a binary of the workspace: {sorted(bins)}")
    return problems


def env_problems(binary: str, env: list[str], where: str) -> list[str]:
    marker = PENDING_BINARIES.get(binary)
    if marker is not None and not marker.exists():
        return []
    known = known_env(binary)
    return [f"{where}: {binary} reads no variable {e}" for e in env if e not in known]


def desired_files() -> list[Path]:
    """The operator's desired-state sources: operator/src/desired.rs, or the files of operator/src/desired/."""
    single = ROOT / "operator" / "src" / "desired.rs"
    return [single] if single.exists() else sorted((ROOT / "operator" / "src" / "desired").rglob("*.rs"))


def desired_text() -> str:
    return "\n".join(f.read_text() for f in desired_files())


@check("Dockerfile builds the same binaries with the same cargo flags as CI (scripts/test.sh)")
def check_dockerfile():
    docker = (ROOT / "Dockerfile").read_text()
    ci = (ROOT / "scripts" / "test.sh").read_text()

    def cargo_builds(text: str) -> list[list[str]]:
        cmds = []
        code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
        for m in re.finditer(r"cargo build[^;&|\n>]*", code):
            cmds.append(shlex.split(m.group(0)))
        return cmds

    d, c = cargo_builds(docker), cargo_builds(ci)
    assert len(d) == 1, f"expected one `cargo build` in the Dockerfile, found {d}"
    assert len(c) == 1, f"expected one `cargo build` in scripts/test.sh, found {c}"
    # the image builds with --release (and reads cargo's JSON messages to find the binaries); every
    # other flag must be CI's
    ignore = lambda a: a == "--release" or a.startswith("--message-format")  # noqa: E731
    dflags = sorted(a for a in d[0][2:] if not ignore(a))
    cflags = sorted(a for a in c[0][2:] if not ignore(a))
    assert dflags == cflags, f"Dockerfile: cargo build {' '.join(dflags)}\nCI:         cargo build {' '.join(cflags)}"
    assert "--release" in d[0], "the image should build --release"
    assert "--workspace" in dflags and "--bins" in dflags and "--locked" in dflags, dflags

    # toolchain: the builder image's Rust is the workspace's rust-version
    rust_version = re.search(r'^rust-version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
    arg = re.search(r"^ARG RUST_VERSION=(\S+)", docker, re.M)
    assert arg and arg.group(1) == rust_version, f"Dockerfile RUST_VERSION {arg and arg.group(1)} != rust-version {rust_version}"

    # runtime user: the uid the operator puts in pod security contexts
    uid = re.search(r"IMAGE_UID: i64 = (\d+)", desired_text()).group(1)
    user = re.findall(r"^USER (\S+)", docker, re.M)
    assert user and user[-1] == f"{uid}:{uid}", f"final USER {user[-1:]} != {uid}:{uid} (operator IMAGE_UID)"
    assert re.search(r"^FROM \S+:nonroot\s*$", docker, re.M), "runtime stage is not a nonroot distroless image"

    # binaries the Dockerfile insists on exist in the workspace
    bins = cargo_bins()
    listed = re.search(r"for bin in ([^;]+); do test -x", docker).group(1).split()
    missing = [b for b in listed if b not in bins]
    assert not missing, f"Dockerfile requires {missing}, which the workspace does not build"

    # .dockerignore keeps everything the build needs
    ignores = [l.strip().rstrip("/") for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    members = re.search(r"^members\s*=\s*\[([^\]]*)\]", (ROOT / "Cargo.toml").read_text(), re.M).group(1)
    needed = ["Cargo.toml", "Cargo.lock", "tests/harness/mod.rs", "docker/healthprobe.rs"] + [
        m for m in re.findall(r'"([^"]+)"', members) if m != "."
    ]
    hit = [(n, p) for n in needed for p in ignores if fnmatch.fnmatch(n, p) or n.startswith(p + "/")]
    assert not hit, f".dockerignore excludes what the build needs: {hit}"
    return f"cargo build --release {' '.join(dflags)}; binaries now: {', '.join(sorted(bins))}"


@check("image binaries and env vars referenced by compose, chart, manifests and operator exist")
def check_binary_refs():
    bins = cargo_bins()
    refs: dict[str, list[str]] = {}
    files = [ROOT / "docker-compose.yml", *desired_files(), ROOT / "tests" / "e2e" / "kind.sh"]
    files += sorted((ROOT / "manifests").rglob("*.yaml")) + sorted((CHART / "templates").glob("*"))
    for f in files:
        if f.exists():
            for b in re.findall(r"/usr/local/bin/([A-Za-z0-9_{}-]+)", f.read_text()):
                if "{" not in b:
                    refs.setdefault(b, []).append(rel(f))
    for f in desired_files():
        for b in re.findall(r'binary:\s*"([^"]+)"', f.read_text()):
            refs.setdefault(b, []).append(rel(f))
    problems = binary_problems(refs, bins)

    # env vars: compose services and the chart's operator Deployment
    compose = load_compose()
    for name, svc in compose["services"].items():
        ep = svc.get("entrypoint") or []
        if ep and ep[0].startswith("/usr/local/bin/"):
            binary = ep[0].rsplit("/", 1)[1]
            problems += env_problems(binary, list((svc.get("environment") or {}).keys()), f"docker-compose.yml {name}")
    for _, d in rendered_docs(helm_render(CHART, {})):
        if d["kind"] == "Deployment":
            c = d["spec"]["template"]["spec"]["containers"][0]
            binary = c["command"][0].rsplit("/", 1)[1]
            problems += env_problems(binary, [e["name"] for e in c.get("env", [])], f"chart {d['kind']}")
    for f in [ROOT / "manifests" / "operator.yaml"]:
        for d in load_all(f):
            if d["kind"] == "Deployment":
                c = d["spec"]["template"]["spec"]["containers"][0]
                problems += env_problems(c["command"][0].rsplit("/", 1)[1], [e["name"] for e in c.get("env", [])], rel(f))
    assert not problems, "\n".join(problems)
    return ", ".join(sorted(refs))


@check("tickfleet-probe (docker/healthprobe.rs) builds as the Dockerfile builds it and tells 2xx from the rest")
def check_probe():
    docker = (ROOT / "Dockerfile").read_text()
    m = re.search(r"(rustc [^;\n]*docker/healthprobe\.rs)", docker)
    assert m, "the Dockerfile does not build docker/healthprobe.rs with rustc"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tickfleet-probe"
        cmd = shlex.split(m.group(1))
        cmd[cmd.index("-o") + 1] = str(out)
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200 if self.path == "/readyz" else 503)
                self.end_headers()
                self.wfile.write(b"ok\n")

            def log_message(self, *a):
                pass

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        port = srv.server_address[1]
        try:
            cases = [(f"http://127.0.0.1:{port}/readyz", 0), (f"http://127.0.0.1:{port}/other", 1)]
            srv2 = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
            closed = srv2.server_address[1]
            srv2.server_close()
            cases += [(f"http://127.0.0.1:{closed}/readyz", 1), ("https://127.0.0.1/readyz", 1)]
            for url, want in cases:
                got = subprocess.run([str(out), url], capture_output=True, timeout=10).returncode
                assert got == want, f"tickfleet-probe {url}: exit {got}, want {want}"
        finally:
            srv.shutdown()


# ---------------------------------------------------------------------------------------------
# docker-compose, Prometheus, Grafana, kind


def interpolate(text: str) -> str:
    """Compose's variable interpolation with an empty environment: ${VAR:-default}, ${VAR-default},
    ${VAR} (empty), $$ (a literal $)."""

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return m.group(2) or ""

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}", sub, text)


def load_compose() -> dict:
    return yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text()))


@check("docker-compose.yml follows the Compose spec; every mount, build file and dependency exists")
def check_compose():
    d = load_compose()
    try:
        compose_spec.PyCompose.from_json(json.dumps(d)).validate()
    except Exception as e:  # the bindings raise ValueError with the spec's message
        raise AssertionError(f"not a valid Compose file: {e}") from None
    problems = []
    services = d["services"]
    mounts = 0
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            ctx = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = ctx / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            if not dockerfile.exists():
                problems.append(f"{name}: build file {rel(dockerfile)} does not exist")
        for v in svc.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith((".", "/")):
                mounts += 1
                if not (ROOT / src).exists():
                    problems.append(f"{name}: mounts {src}, which does not exist")
            elif src and src not in (d.get("volumes") or {}):
                problems.append(f"{name}: named volume {src} is not declared")
        for f in svc.get("env_file", []) if isinstance(svc.get("env_file"), list) else [svc.get("env_file")] if svc.get("env_file") else []:
            if not (ROOT / f).exists():
                problems.append(f"{name}: env_file {f} does not exist")
        deps = svc.get("depends_on") or {}
        for dep, cond in (deps.items() if isinstance(deps, dict) else [(x, {}) for x in deps]):
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
                continue
            condition = (cond or {}).get("condition", "service_started")
            if condition == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
            if condition == "service_completed_successfully" and services[dep].get("restart", "no") != "no":
                problems.append(f"{name}: waits for {dep} to complete, but {dep} restarts")
    long_running = [n for n, s in services.items() if s.get("restart") != "no" and "tools" not in s.get("profiles", [])]
    unhealthy = [n for n in long_running if "healthcheck" not in services[n]]
    if unhealthy:
        problems.append(f"services without a healthcheck: {unhealthy}")
    for want in ["kafka", "redis", "worker", "api", "generator", "prometheus", "grafana"]:
        if want not in services:
            problems.append(f"no {want} service")
    if services.get("worker", {}).get("deploy", {}).get("replicas", 1) < 2:
        problems.append("fewer than two workers")
    kafka_env = services.get("kafka", {}).get("environment", {})
    if "controller" not in str(kafka_env.get("KAFKA_PROCESS_ROLES", "")) or any("zookeeper" in s for s in services):
        problems.append("Kafka is not in KRaft mode")

    # Prometheus scrapes services that exist; Grafana's provisioning reads the dashboards mount
    prom = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    for job in prom["scrape_configs"]:
        hosts = [t.split(":")[0] for sc in job.get("static_configs", []) for t in sc["targets"]]
        hosts += [n for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        for h in hosts:
            if h != "localhost" and h not in services:
                problems.append(f"prometheus.yml job {job['job_name']} scrapes {h}, which is not a service")
    provider = yaml.safe_load((ROOT / "grafana" / "provisioning" / "dashboards" / "tickfleet.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    if not any(isinstance(v, str) and v.split(":")[1] == path for v in services["grafana"].get("volumes", [])):
        problems.append(f"grafana mounts nothing at the provisioned dashboards path {path}")
    assert not problems, "\n".join(problems)
    dashboards = len(list((ROOT / "dashboards").glob("*.json")))
    alerts = (ROOT / "prometheus" / "alerts.yml").exists()
    return f"{len(services)} services, {mounts} bind mounts; dashboards/*.json: {dashboards}, prometheus/alerts.yml: {'yes' if alerts else 'not yet'}"


@check("kind-config.yaml maps the NodePorts the dev manifests and the e2e use")
def check_kind():
    cfg = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4", cfg
    mapped = {m["containerPort"]: m["hostPort"] for n in cfg["nodes"] for m in n.get("extraPortMappings", [])}
    node_ports = {p["nodePort"] for f in (ROOT / "manifests" / "dev").glob("*.yaml") for d in load_all(f)
                  if d["kind"] == "Service" for p in d["spec"]["ports"] if "nodePort" in p}
    e2e = (ROOT / "tests" / "e2e" / "kind.sh").read_text()
    node_ports |= {int(p) for p in re.findall(r"nodePort=(\d+)", e2e)}
    unmapped = sorted(node_ports - set(mapped))
    assert not unmapped, f"NodePorts {unmapped} are not in kind-config.yaml's extraPortMappings {mapped}"
    assert 50051 in mapped.values() and 3000 in mapped.values(), f"api (50051) and Grafana (3000) not mapped: {mapped}"
    r = subprocess.run(["bash", "-n", str(ROOT / "tests" / "e2e" / "kind.sh")], capture_output=True, text=True)
    assert r.returncode == 0, f"tests/e2e/kind.sh: {r.stderr}"
    return f"host ports {sorted(mapped.values())}; tests/e2e/kind.sh parses (bash -n)"


def main() -> int:
    only = set(sys.argv[1:])
    checks = [check_manifests, check_crd_copy, check_lint, check_values_schema, check_template,
              check_rbac_same, check_dockerfile, check_binary_refs, check_probe, check_compose, check_kind]
    for c in checks:
        if not only or any(o in c.__name__ for o in only):
            c()
    failed = sum(1 for ok, _ in results if not ok)
    print(f"packaging: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
