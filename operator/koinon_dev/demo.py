"""``make demo``: bring the local control plane up, run one AIJob end to end, show it, tear down."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import yaml

from koinon_dev.binaries import ensure_binaries
from koinon_dev.cli import fetch_job_logs, report_stopped
from koinon_dev.cluster import DevCluster, kubectl

TERMINAL_PHASES = ("Succeeded", "Failed")


def _banner(text: str) -> None:
    print(f"\n=== {text}")


def read_example(example: Path) -> tuple[str, str]:
    """(name, namespace) of the AIJob in ``example``; RuntimeError naming the file and the problem
    (checked before anything is started)."""
    try:
        document = yaml.safe_load(example.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise RuntimeError(f"cannot read the AIJob example {example}: {error}") from None
    metadata = document.get("metadata") if isinstance(document, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name:
        raise RuntimeError(f"{example}: metadata.name is missing; the example must be one AIJob object")
    namespace = metadata.get("namespace", "default") if isinstance(metadata, dict) else "default"
    if not isinstance(namespace, str) or not namespace:
        raise RuntimeError(f"{example}: metadata.namespace must be a name, got {namespace!r}")
    return name, namespace


def run_demo(cluster: DevCluster, example: Path, timeout: float = 150.0) -> int:
    name, namespace = read_example(example)
    started = time.monotonic()
    _banner("starting the local control plane")
    info = cluster.up()
    watcher: subprocess.Popen[str] | None = None
    try:
        _banner(f"kubectl apply -f {example}")
        print(kubectl(info.kubeconfig, "apply", "-f", str(example)), end="")
        _banner(f"kubectl get aij {name} -w")
        watcher = subprocess.Popen(
            [str(ensure_binaries().kubectl), f"--kubeconfig={info.kubeconfig}", "get", "aij", name,
             "-n", namespace, "-w"],
            text=True,
        )  # fmt: skip
        try:
            phase = _wait_for_finish(info.kubeconfig, name, namespace, timeout)
        except TimeoutError:
            watcher.kill()
            try:
                _show_events(info.kubeconfig, name, namespace)  # why it did not finish (Unschedulable, say)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                print(f"(no events: {error})")
            raise
        time.sleep(0.5)  # let the watch print the final row
        watcher.terminate()
        watcher.wait(timeout=5)
        watcher = None
        _banner(f"koinon logs {name}")
        try:
            print(fetch_job_logs(info, name, namespace).rstrip())
        except RuntimeError as error:  # failed before reaching Ray (InvalidSpec): the events say why
            print(f"(no Ray logs: {error})")
        _banner("kubectl get aij")
        print(kubectl(info.kubeconfig, "get", "aij", "-n", namespace), end="")
        _banner("kubectl get vn")
        print(kubectl(info.kubeconfig, "get", "vn"), end="")
        _show_events(info.kubeconfig, name, namespace)
        print(f"\njob {phase} in {time.monotonic() - started:.0f}s since start")
        return 0 if phase == "Succeeded" else 1
    finally:
        if watcher is not None:
            watcher.kill()
        _banner("stopping the local control plane")
        # Printed by `down` itself, as `koinon dev down` does: a Ctrl-C or SIGTERM held back during
        # the teardown ends the demo as `down` returns, and a print after it was lost.
        cluster.down(report=report_stopped)


def _show_events(kubeconfig: Path, name: str, namespace: str) -> None:
    _banner(f"kubectl describe aij {name} (events)")
    described = kubectl(kubeconfig, "describe", "aij", name, "-n", namespace)
    print(described[described.find("Events:") :] if "Events:" in described else described, end="")


def _wait_for_finish(kubeconfig: Path, name: str, namespace: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        phase = kubectl(kubeconfig, "get", "aij", name, "-n", namespace, "-o", "jsonpath={.status.phase}").strip()
        if phase in TERMINAL_PHASES:
            return phase
        time.sleep(0.5)
    raise TimeoutError(f"AIJob {namespace}/{name} did not finish within {timeout:.0f}s")
