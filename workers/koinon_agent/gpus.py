"""GPU inventory through NVML, with a clean fallback when there is no GPU or driver.

What is offered is what CUDA would let this volunteer's jobs use: the GPUs named in its own
CUDA_VISIBLE_DEVICES (when set), and for a GPU in MIG mode its MIG instances rather than the whole
card. Each comes with the id CUDA_VISIBLE_DEVICES names it by, so that Ray's node is started with
exactly these devices (ray_node.ray_environment) and hands out the ones the gateway was told about.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    model: str
    memory_mib: int
    # The device's UUID (GPU-… or MIG-…), as CUDA_VISIBLE_DEVICES names it; "" for a simulated GPU.
    device: str = ""


def simulated(count: int, memory_mib: int, model: str = "Simulated GPU") -> list[GpuInfo]:
    return [GpuInfo(model, memory_mib) for _ in range(count)]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(pynvml: Any, handle: object) -> GpuInfo:
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuInfo(
        _text(pynvml.nvmlDeviceGetName(handle)),
        int(memory.total) // (1 << 20),
        _text(pynvml.nvmlDeviceGetUUID(handle)),
    )


def _mig_enabled(pynvml: Any, handle: object) -> bool:
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except pynvml.NVMLError:  # NotSupported on GPUs without MIG (most of them)
        return False
    return bool(current == pynvml.NVML_DEVICE_MIG_ENABLE)


def _mig_instances(pynvml: Any, handle: object, index: int) -> list[GpuInfo]:
    """The MIG instances of a GPU in MIG mode: CUDA sees those, never the whole card (whose memory
    NVML gives unprivileged callers no answer for)."""
    found = []
    for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            instance = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except pynvml.NVMLError:  # an empty slot (NotFound)
            continue
        try:
            found.append(_describe(pynvml, instance))
        except pynvml.NVMLError as exc:
            log.warning("skipping MIG instance %d of GPU %d: %s", slot, index, exc)
    return found


def _select_visible(found: list[tuple[int, GpuInfo]], visible: str) -> list[GpuInfo]:
    """The devices CUDA_VISIBLE_DEVICES names, in its order: NVML indices or (prefixes of) UUIDs.

    As CUDA does, the list ends at the first entry that names no device. NVML lists every device
    whatever that variable says, so without this a volunteer sharing one of two GPUs offered both
    (and Ray refused to start with more GPUs than the variable lists).
    """
    chosen: list[GpuInfo] = []
    for entry in (part.strip() for part in visible.split(",")):
        if entry.isdigit():
            matches = [gpu for index, gpu in found if index == int(entry) and not gpu.device.startswith("MIG-")]
        else:
            matches = [gpu for _, gpu in found if entry and gpu.device.startswith(entry)]
            if not matches and entry and not entry.startswith(("GPU-", "MIG-")):
                matches = [gpu for _, gpu in found if gpu.device.startswith(f"GPU-{entry}")]
        if len(matches) != 1:
            if entry:
                log.warning("CUDA_VISIBLE_DEVICES entry %r names no single GPU; the GPUs after it are not used", entry)
            break
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen


def detect() -> list[GpuInfo]:
    """GPUs this volunteer's jobs may use; [] when NVML or the driver is missing (a CPU-only volunteer)."""
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
        found: list[tuple[int, GpuInfo]] = []  # (NVML index of the card, device)
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                if _mig_enabled(pynvml, handle):
                    found.extend((index, instance) for instance in _mig_instances(pynvml, handle, index))
                else:
                    found.append((index, _describe(pynvml, handle)))
            except pynvml.NVMLError as exc:
                # A GPU that fell off the bus or is being reset: offer the others rather than none.
                log.warning("skipping GPU %d: %s", index, exc)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return [gpu for _, gpu in found] if visible is None else _select_visible(found, visible)
    finally:
        pynvml.nvmlShutdown()
