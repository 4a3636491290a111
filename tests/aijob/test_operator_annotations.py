"""What the real operator process (kopf, as main.py configures it) writes into every AIJob's
metadata: kopf's diff-base annotation is a second full copy of the spec (plus the user's labels and
annotations), though the operator has no create/update handler that could use it. A real API server
caps an object's annotations at 256 KiB in total: an AIJob applied with `kubectl apply` (which keeps
its own copy, last-applied-configuration) and a spec over ~128 KiB then has kopf's patches refused,
including the one that takes the finalizer off on deletion (kopf stores the diff-base in the same
patch), so the AIJob could not be deleted. The emulator enforces the cap as kube-apiserver does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_emulator import write_kubeconfig

from tests.emulator.helpers import EmulatorThread, Kubectl, find_kubectl

ROOT = Path(__file__).resolve().parents[2]
TOTAL_ANNOTATION_SIZE_LIMIT = 256 * 1024  # k8s.io/apimachinery ValidateAnnotations
pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def _size(annotations: dict[str, str]) -> int:
    return sum(len(k) + len(v) for k, v in annotations.items())


def test_kopf_does_not_keep_a_second_copy_of_the_spec_in_annotations(tmp_path: Path) -> None:
    server = EmulatorThread(bookmark_interval_s=1.0)
    url = server.start()
    operator = None
    try:
        crds = [yaml.safe_load(path.read_text()) for path in sorted((ROOT / "manifests" / "crds").glob("*.yaml"))]
        server.call(lambda e: [e.apply_crd(crd) for crd in crds])
        kubectl = Kubectl(find_kubectl(tmp_path), url, tmp_path)
        kubeconfig = write_kubeconfig(tmp_path / "kc", url)
        log = (tmp_path / "operator.log").open("w")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": "operator:workers:proto:examples"}  # fmt: skip
        operator = subprocess.Popen(
            [sys.executable, "-m", "koinon_operator.main", f"--kubeconfig={kubeconfig}",
             "--ray-dashboard=http://127.0.0.1:9", "--poll-interval=0.5"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        # ~140 KB of env_vars (a config passed to the driver): well under the 1.5 MB object limit.
        big = "x" * 140_000
        job = {"apiVersion": "koinon.dev/v1alpha1", "kind": "AIJob",
               "metadata": {"name": "big", "namespace": "default"},
               "spec": {"entrypoint": "python x.py", "runtimeEnv": {"env_vars": {"CONFIG": big}}}}  # fmt: skip
        kubectl.run("apply", "-f", "-", stdin=json.dumps(job))
        deadline = time.monotonic() + 60
        current: dict[str, Any] = {}
        while time.monotonic() < deadline:
            current = server.call(lambda e: e.get("koinon.dev/v1alpha1", "AIJob", "big", "default"))
            if current.get("status", {}).get("phase") and current["metadata"].get("finalizers"):
                time.sleep(3)  # let kopf's change processing finish too
                current = server.call(lambda e: e.get("koinon.dev/v1alpha1", "AIJob", "big", "default"))
                break
            time.sleep(0.3)
        assert current.get("status", {}).get("phase"), (tmp_path / "operator.log").read_text()[-3000:]
        annotations = current["metadata"].get("annotations") or {}
        ours = {k: len(v) for k, v in annotations.items() if k.startswith("koinon.dev/")}
        assert _size(annotations) <= TOTAL_ANNOTATION_SIZE_LIMIT, (
            f"annotations total {_size(annotations)} bytes > 256 KiB (a real API server refuses kopf's "
            f"patch); operator-written: {ours}"
        )
        # The finalizer still comes off on deletion (kopf's deletion handling works without it).
        kubectl.run("delete", "aijob", "big", "--timeout=30s")
        assert kubectl.run("get", "aijob", "big", check=False).returncode != 0
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(timeout=15)
            except subprocess.TimeoutExpired:
                operator.kill()
        server.stop()
