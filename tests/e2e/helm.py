#!/usr/bin/env python3
"""`helm install` / `helm uninstall` through Helm's Go library (PyPI helm-python-sdk), for machines
without a helm binary. Used by tests/e2e/local-cluster.sh with the venv that
scripts/check-packaging.sh installs; KUBECONFIG selects the cluster.

    helm.py install RELEASE CHART NAMESPACE VALUES.json   # creates the namespace, waits for readiness
    helm.py uninstall RELEASE NAMESPACE                    # waits until the release's objects are gone
"""

from __future__ import annotations

import json
import sys

from helm_python import config as hconfig
from helm_python import errors as herrors

TIMEOUT_SECONDS = 180


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "install" and len(argv) == 5:
        _, release, chart, namespace, values_file = argv
        with open(values_file, encoding="utf-8") as f:
            values = json.load(f)
        cfg = hconfig.Config(namespace=namespace)
        rel = cfg.install(
            chart, release, values, namespace=namespace, create_namespace=True,
            wait="watcher", timeout=TIMEOUT_SECONDS,
        )
        print(f"installed {release} in {namespace}: revision {rel.get('revision')}, {rel.get('status')}")
        return 0
    if len(argv) >= 1 and argv[0] == "uninstall" and len(argv) == 3:
        _, release, namespace = argv
        cfg = hconfig.Config(namespace=namespace)
        cfg.uninstall(release, wait="watcher", timeout=TIMEOUT_SECONDS)
        print(f"uninstalled {release} from {namespace}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except herrors.HelmError as e:
        print(f"helm: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
