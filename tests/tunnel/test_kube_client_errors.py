"""The gateway's Kubernetes client and token CLI as platform teams meet them: a pod started soon after
its (micro)VM booted authenticates, `token list` keeps its columns apart, and an API server that
cannot be reached is an error line, not a traceback (token CLI and gateway alike)."""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from koinon_emulator.kubeconfig import write_kubeconfig
from koinon_emulator.server import KubeEmulator
from koinon_gateway import token_cli
from koinon_gateway.kube_client import KubeClient, load_incluster_config, load_kubeconfig
from koinon_gateway.kube_tokens import KubeTokenStore

NAMESPACE = "koinon-system"


def test_service_account_token_is_sent_on_the_first_request_soon_after_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """time.monotonic() counts from boot (CLOCK_MONOTONIC). A pod started within 60 s of its
    (micro)VM booting (Fargate/Kata/Firecracker, a fresh autoscaled node) must still authenticate:
    _token_read_at starts at 0.0, so the file is not read until monotonic() > 60."""
    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "namespace").write_text(NAMESPACE)
    config = load_incluster_config({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}, tmp_path)
    monkeypatch.setattr("koinon_gateway.kube_client.time.monotonic", lambda: 12.0)  # 12 s after boot
    headers = KubeClient(config)._headers(None)
    assert headers.get("Authorization") == "Bearer sa-token"


@pytest.fixture
async def emulator_kubeconfig(tmp_path: Path) -> AsyncIterator[Path]:
    emulator = KubeEmulator()
    url = await emulator.start()
    emulator.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url, namespace=NAMESPACE)
    try:
        yield kubeconfig
    finally:
        await emulator.stop()


async def test_token_list_columns_stay_apart_for_a_default_token(
    emulator_kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``token list``: EXPIRES is printed with isoformat() ("...+00:00", 25 chars) in a 22-wide
    column, so for every token with an expiry (the default 24h) it runs into REVOKED
    ("2025-..T..:..:..+00:00false"); a 16+ char owner runs into USES the same way."""
    client = KubeClient(load_kubeconfig(emulator_kubeconfig))
    try:
        await KubeTokenStore(client, NAMESPACE).create(owner="alice@example.org", ttl=dt.timedelta(hours=24))
    finally:
        await client.close()
    args = token_cli.build_parser().parse_args([f"--kubeconfig={emulator_kubeconfig}", "list"])
    assert await token_cli.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    header, row = lines[0].split(), lines[1].split()
    assert len(row) == len(header), lines  # ID OWNER USES EXPIRES REVOKED: five separate fields


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_token_cli_reports_an_unreachable_api_server_without_a_traceback(tmp_path: Path) -> None:
    """A wrong or down API server (connection refused, TLS failure) is an operator's everyday
    error; token_cli.main catches only ValueError/KubeConfigError/TokenError/KubeApiError, so
    aiohttp's ClientConnectorError escapes as a Python traceback."""
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{_free_port()}", namespace=NAMESPACE)
    completed = subprocess.run(
        [sys.executable, "-m", "koinon_gateway.main", "token", f"--kubeconfig={kubeconfig}", "list"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr, completed.stderr[-600:]
    assert "koinon-gateway token:" in completed.stderr


def test_the_gateway_reports_an_unreachable_api_server_without_a_traceback(tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{_free_port()}", namespace=NAMESPACE)
    completed = subprocess.run(
        [sys.executable, "-m", "koinon_gateway.main", "--store=kube", f"--kubeconfig={kubeconfig}",
         f"--state-dir={tmp_path / 'state'}", "--listen=127.0.0.1:0", "--head-address=127.0.0.1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 1, completed.stderr[-600:]
    assert "Traceback" not in completed.stderr, completed.stderr[-600:]
    assert "koinon-gateway: cannot reach the Kubernetes API" in completed.stderr
