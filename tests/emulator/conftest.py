from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from koinon_emulator import KubeEmulator

from .helpers import EmulatorThread, Kubectl, find_kubectl, widget_crd


@pytest.fixture
async def emulator() -> AsyncIterator[KubeEmulator]:
    server = KubeEmulator(bookmark_interval_s=0.2, history_limit=50)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http(emulator: KubeEmulator) -> AsyncIterator[aiohttp.ClientSession]:
    assert emulator.url is not None
    async with aiohttp.ClientSession(base_url=emulator.url) as session:
        yield session


@pytest.fixture
async def with_widgets(emulator: KubeEmulator) -> KubeEmulator:
    emulator.apply_crd(widget_crd())
    return emulator


@pytest.fixture(scope="session")
def kubectl_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return find_kubectl(tmp_path_factory.mktemp("kubectl-bin"))


@pytest.fixture(scope="module")
def threaded_emulator() -> Iterator[EmulatorThread]:
    server = EmulatorThread(bookmark_interval_s=1.0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def kubectl(
    kubectl_binary: Path, threaded_emulator: EmulatorThread, tmp_path_factory: pytest.TempPathFactory
) -> Kubectl:
    return Kubectl(kubectl_binary, threaded_emulator.url, tmp_path_factory.mktemp("kubectl-home"))
