"""Relative speed of volunteer GPUs: how long a job takes on a node, from its GPU models.

Volunteers lend anything from a T4 to an A100, and the same job runs several times longer on the
slowest than on the fastest. The scheduler reads a GPU's speed from a table of relative training
throughput keyed by model name (`ScoringConfig.gpu_speeds`, RTX 4090 = 1.0); NVML names such as
"NVIDIA GeForce RTX 4090" match the key "4090". A node is as fast as its slowest GPU (replicas of a
multi-GPU job wait for each other); an unknown model gets `unknown_gpu_speed`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from functools import lru_cache
from typing import Protocol


class HasModel(Hashable, Protocol):
    """A GPU as the scheduler's types describe it (`types.Gpu`)."""

    @property
    def model(self) -> str: ...


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


@lru_cache(maxsize=256)
def gpu_speed(model: str, table: tuple[tuple[str, float], ...], unknown: float) -> float:
    """Relative speed of one GPU model (1.0 = RTX 4090)."""
    name = _normalise(model)
    # Longest key first, so "a100" wins over "a10" and "4090" over "40".
    for key, speed in sorted(table, key=lambda kv: -len(kv[0])):
        if _normalise(key) in name:
            return speed
    return unknown


def node_speed(models: Iterable[str], table: tuple[tuple[str, float], ...], unknown: float) -> float:
    """Speed of a node: its slowest GPU's (a node without GPUs counts as `unknown`)."""
    speeds = [gpu_speed(m, table, unknown) for m in models]
    return min(speeds) if speeds else unknown


def node_speeds(
    fleet: Iterable[tuple[HasModel, ...]], table: tuple[tuple[str, float], ...], unknown: float
) -> list[float]:
    """`node_speed` of many nodes given their GPUs; each model name (a fleet has few) is looked up
    once, keyed by the string, which is much cheaper to hash than a tuple of GPUs."""
    by_model: dict[str, float] = {}
    out = []
    for gpus in fleet:
        speeds = []
        for gpu in gpus:
            known = by_model.get(gpu.model)
            if known is None:
                known = by_model[gpu.model] = gpu_speed(gpu.model, table, unknown)
            speeds.append(known)
        out.append(min(speeds) if speeds else unknown)  # as node_speed: the slowest GPU
    return out
