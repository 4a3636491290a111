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

from koinon_gateway.limits import MAX_GPU_MEMORY_MIB, MAX_GPUS, MAX_TEXT

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


def _model(pynvml: Any, handle: object) -> str:
    """The GPU's name as a model the gateway takes (1..MAX_TEXT characters). The binding decodes
    NVML's bytes as UTF-8 and raises on others: the GPU is kept, its name read with U+FFFD for
    what does not decode (a name is only shown and compared, never used to address the device)."""
    try:
        name = _text(pynvml.nvmlDeviceGetName(handle))
    except UnicodeDecodeError as exc:
        name = bytes(exc.object).decode(errors="replace")
        log.warning("GPU name %r is not UTF-8; reporting it as %r", bytes(exc.object), name)
    return name[:MAX_TEXT] or "NVIDIA GPU"


def _describe(pynvml: Any, handle: object) -> GpuInfo:
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuInfo(
        _model(pynvml, handle),
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
        except (pynvml.NVMLError, UnicodeDecodeError) as exc:  # the latter: a UUID that is not UTF-8
            log.warning("skipping MIG instance %d of GPU %d: %s", slot, index, exc)
    return found


def _indices_are_nvml_indices(found: list[tuple[int, GpuInfo]], count: int) -> bool:
    """Whether CUDA numbers this host's GPUs as NVML does (PCI bus order), so that a device index in
    CUDA_VISIBLE_DEVICES is an NVML index.

    CUDA numbers devices fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, by a heuristic of its
    own that is not guessed here: that order is taken to be NVML's only when one card is listed or
    all are the same model with the same memory (which that heuristic cannot tell apart). A card
    NVML could not describe (lost) or in MIG mode (whose whole card is not in `found`) may differ
    from the others, so then the order is unknown.
    """
    if os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID" or count <= 1:
        return True
    cards = [gpu for _, gpu in found if not gpu.device.startswith("MIG-")]
    return len(cards) == count and len({(gpu.model, gpu.memory_mib) for gpu in cards}) == 1


def _select_visible(found: list[tuple[int, GpuInfo]], visible: str, by_nvml_index: bool) -> list[GpuInfo]:
    """The devices CUDA_VISIBLE_DEVICES names, in its order: NVML indices or (prefixes of) UUIDs.

    As CUDA does, the list ends at the first entry that names no device. NVML lists every device
    whatever that variable says, so without this a volunteer sharing one of two GPUs offered both
    (and Ray refused to start with more GPUs than the variable lists).

    Raises ValueError for a device index CUDA reads when not `by_nvml_index` (_indices_are_nvml_indices):
    taking it as an NVML index lent (and pinned Ray to, by UUID) a GPU other than the one the
    volunteer's own CUDA programs see under that index, e.g. the one they meant to keep.
    """
    chosen: list[GpuInfo] = []
    for entry in (part.strip() for part in visible.split(",")):
        if entry.isdigit():
            if not by_nvml_index:
                raise ValueError(
                    f"CUDA_VISIBLE_DEVICES: entry {entry!r} is a device index, and CUDA numbers this host's"
                    " GPUs fastest first (CUDA_DEVICE_ORDER is not PCI_BUS_ID) while they are not all the"
                    " same model and memory (or NVML cannot describe each one whole), so which GPU it means"
                    " cannot be told; name GPUs by UUID (`nvidia-smi -L` lists them) or set"
                    " CUDA_DEVICE_ORDER=PCI_BUS_ID (indices are then nvidia-smi's)"
                )
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
    """GPUs this volunteer's jobs may use; [] when NVML or the driver is missing (a CPU-only volunteer).

    Raises ValueError when CUDA_VISIBLE_DEVICES names a GPU by an index whose GPU cannot be told
    (_select_visible): the agent then exits 2 with that message rather than lend a GPU the
    volunteer may not have meant to."""
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
            except (pynvml.NVMLError, UnicodeDecodeError) as exc:
                # A GPU that fell off the bus or is being reset (or whose UUID, which names it to
                # CUDA, does not decode): offer the others rather than none.
                log.warning("skipping GPU %d: %s", index, exc)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            chosen = [gpu for _, gpu in found]
        else:
            chosen = _select_visible(found, visible, _indices_are_nvml_indices(found, count))
        return _within_limits(chosen)
    finally:
        pynvml.nvmlShutdown()


def _within_limits(found: list[GpuInfo]) -> list[GpuInfo]:
    """The GPUs the gateway takes (koinon_gateway.limits): one it would refuse would fail the whole
    join (or, at Register, be clamped while Ray is given another count), so it is left out here
    and neither reported nor handed to Ray. After the CUDA_VISIBLE_DEVICES selection: a GPU left
    out must not end the list the way an entry naming no device does."""
    kept = []
    for gpu in found:
        if not 0 < gpu.memory_mib <= MAX_GPU_MEMORY_MIB:
            log.warning(
                "leaving out GPU %s (%s): NVML reports %d MiB, outside 1..%d",
                gpu.device,
                gpu.model,
                gpu.memory_mib,
                MAX_GPU_MEMORY_MIB,
            )
            continue
        kept.append(gpu)
    if len(kept) > MAX_GPUS:
        log.warning("found %d GPUs; offering the first %d (the most a node may report)", len(kept), MAX_GPUS)
    return kept[:MAX_GPUS]
