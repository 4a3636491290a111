"""GPU inventory: the real NVML binding on this GPU-less machine, and NVML's answers for GPUs.

No GPU or NVIDIA driver exists here or in CI, so the cases with GPUs use a stand-in ``pynvml``
module that answers as the binding does (names as bytes in old versions, str in new ones; memory in
bytes; NVMLError subclasses for a lost GPU).
"""

from __future__ import annotations

import ctypes.util
import logging
import sys
import types
from dataclasses import dataclass

import pytest
from koinon_agent import gpus


def test_no_driver_means_no_gpus_and_no_error() -> None:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this machine has the NVIDIA driver")
    import pynvml  # the real binding: nvmlInit fails with "NVML Shared Library Not Found"

    with pytest.raises(pynvml.NVMLError):
        pynvml.nvmlInit()
    assert gpus.detect() == []


class FakeNVMLError(Exception):
    pass


@dataclass
class Memory:
    total: int


def fake_nvml(devices: list[tuple[object, int] | Exception], init_error: bool = False) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error:
            raise FakeNVMLError("Driver Not Loaded")

    def handle(index: int) -> int:
        entry = devices[index]
        if isinstance(entry, Exception):
            raise entry
        return index

    def name(index: int) -> object:
        entry = devices[index]
        assert not isinstance(entry, Exception)
        return entry[0]

    def memory(index: int) -> Memory:
        entry = devices[index]
        assert not isinstance(entry, Exception)
        return Memory(entry[1])

    module.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = name  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    return module


def test_each_gpu_with_its_model_and_memory_in_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml([(b"NVIDIA GeForce RTX 4090", 25_757_220_864), ("NVIDIA A100-SXM4-80GB", 85_899_345_920)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpus.detect() == [
        gpus.GpuInfo("NVIDIA GeForce RTX 4090", 24564),
        gpus.GpuInfo("NVIDIA A100-SXM4-80GB", 81920),
    ]
    assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]


def test_a_lost_gpu_is_skipped_and_the_others_offered(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    nvml = fake_nvml([FakeNVMLError("GPU is lost"), ("NVIDIA L4", 24_152_899_584)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with caplog.at_level(logging.WARNING):
        assert gpus.detect() == [gpus.GpuInfo("NVIDIA L4", 23034)]
    assert "skipping GPU 0: GPU is lost" in caplog.text
    assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]


def test_driver_not_loaded_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([("x", 1)], init_error=True))
    assert gpus.detect() == []
