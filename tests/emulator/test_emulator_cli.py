"""The ``koinon-kube-emulator`` command: kubeconfig, URL on stdout, clean stop, state file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)


def _start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "koinon_emulator.main", "--kubeconfig", str(tmp_path / "kubeconfig"), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), process.stderr.read() if process.stderr else ""
    return process, url


def _stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0


def test_cli_serves_writes_kubeconfig_and_keeps_state(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    process, url = _start(tmp_path, "--state-file", str(state))
    try:
        config = yaml.safe_load((tmp_path / "kubeconfig").read_text())
        assert config["current-context"] == "koinon-local"
        assert config["clusters"][0]["cluster"]["server"] == url
        assert config["contexts"][0]["context"]["namespace"] == "default"
        request = urllib.request.Request(
            f"{url}/api/v1/namespaces/default/configmaps",
            method="POST",
            data=json.dumps({"metadata": {"name": "kept"}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 201
    finally:
        _stop(process)
    process, url = _start(tmp_path, "--state-file", str(state))
    try:
        with urllib.request.urlopen(f"{url}/api/v1/namespaces/default/configmaps/kept", timeout=5) as response:
            assert json.load(response)["metadata"]["name"] == "kept"
    finally:
        _stop(process)
