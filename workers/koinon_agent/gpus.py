"""GPU inventory through NVML, with a clean fallback when there is no GPU or driver."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    model: str
    memory_mib: int


def simulated(count: int, memory_mib: int, model: str = "Simulated GPU") -> list[GpuInfo]:
    return [GpuInfo(model, memory_mib) for _ in range(count)]


def detect() -> list[GpuInfo]:
    """GPUs NVML sees; [] when NVML or the driver is missing (a CPU-only volunteer)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("no NVIDIA GPU found (%s)", exc)
        return []
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        log.warning("NVML cannot count GPUs (%s); reporting none", exc)
        pynvml.nvmlShutdown()
        return []
    try:
        found = []
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = pynvml.nvmlDeviceGetName(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            except pynvml.NVMLError as exc:
                # A GPU that fell off the bus or is being reset: offer the others rather than none.
                log.warning("skipping GPU %d: %s", index, exc)
                continue
            model = name.decode() if isinstance(name, bytes) else str(name)
            found.append(GpuInfo(model, int(memory.total) // (1 << 20)))
        return found
    finally:
        pynvml.nvmlShutdown()
