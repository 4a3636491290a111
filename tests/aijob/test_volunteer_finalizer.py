"""The operator keeps its finalizer off the VolunteerNodes the gateway owns: deleting one revokes the
volunteer, and must not wait for the operator. A real operator process against the API emulator (no
Ray: the operator's VolunteerNode timer finds Ray unreachable and changes nothing)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_dev.cluster import operator_process
from koinon_emulator.kubeconfig import write_kubeconfig
from koinon_emulator.server import KubeEmulator
from koinon_gateway.kube_client import KubeClient, load_kubeconfig
from koinon_gateway.kube_registry import KubeNodeRegistry
from koinon_operator.api.constants import FINALIZER

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
VN = "koinon.dev/v1alpha1", "VolunteerNode"


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[tuple[KubeEmulator, Path]]:
    emulator = KubeEmulator()
    url = await emulator.start()
    for path in sorted((REPO / "manifests" / "crds").glob("*.yaml")):
        emulator.apply_crd(yaml.safe_load(path.read_text()))
    try:
        yield emulator, write_kubeconfig(tmp_path / "kubeconfig", url)
    finally:
        await emulator.stop()


async def _eventually(probe: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)
    return value


def _finalizers(emulator: KubeEmulator, name: str) -> list[str]:
    return list(emulator.get(*VN, name)["metadata"].get("finalizers") or [])


async def test_gateway_owned_volunteernodes_get_no_operator_finalizer(
    emulator: tuple[KubeEmulator, Path], tmp_path: Path
) -> None:
    kube, kubeconfig = emulator
    client = KubeClient(load_kubeconfig(kubeconfig))
    registry = KubeNodeRegistry(client)
    try:
        await registry.create("vn-gw", {"owner": "alice"}, {})
        # A gateway-owned node that an older operator already put its finalizer on.
        await registry.create("vn-old", {"owner": "bob"}, {})
        kube.patch(*VN, "vn-old", {"metadata": {"finalizers": [FINALIZER]}})
        # A node that joined Ray directly: the operator keeps its status, so its timer runs on it.
        kube.create({"apiVersion": VN[0], "kind": VN[1], "metadata": {"name": "vn-ray"},
                     "spec": {"owner": "carol"}})  # fmt: skip

        operator = operator_process(
            kubeconfig, "http://127.0.0.1:9", tmp_path / "logs", poll_interval_seconds=0.5, tmp_dir=tmp_path / "tmp"
        )
        operator.start()
        try:
            await _eventually(lambda: FINALIZER in _finalizers(kube, "vn-ray"))
            await _eventually(lambda: not _finalizers(kube, "vn-old"))  # an old one is taken off
            await asyncio.sleep(1.0)  # time for a (wrong) finalizer on vn-gw to show
            assert _finalizers(kube, "vn-gw") == []
        finally:
            await asyncio.to_thread(operator.stop, 5)
            print(f"--- operator log tail ---\n{operator.log_tail(3000)}")

        # With the operator down, deleting a gateway-owned node removes it at once.
        assert await registry.delete("vn-gw")
        assert await registry.delete("vn-old")
        assert await registry.get("vn-gw") is None and await registry.get("vn-old") is None
    finally:
        await client.close()
