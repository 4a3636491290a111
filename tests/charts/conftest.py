from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from koinon_dev.binaries import ensure_binaries

from .helpers import Tools


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Tools:
    binaries = ensure_binaries()
    return Tools(helm=binaries.helm, kubectl=binaries.kubectl, home=tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="module")
def emulator_kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Kubernetes API emulator in its own process (as a developer would start it: HTTPS, and the
    kubeconfig carries its certificate and token)."""
    kubeconfig = tmp_path_factory.mktemp("emulator") / "kubeconfig"
    command = [
        str(Path(sys.executable).parent / "koinon-kube-emulator"),
        "--port",
        "0",
        "--kubeconfig",
        str(kubeconfig),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()  # printed once the kubeconfig is written and it serves
        if not url.startswith(("https://", "http://")):
            error = process.stderr.read() if process.stderr and process.poll() is not None else ""
            pytest.fail(f"koinon-kube-emulator did not start: {url!r} {error}")
        yield kubeconfig
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
