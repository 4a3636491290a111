"""Relative speed of volunteer GPUs: how long a job takes on a node, from its GPU models.

Volunteers lend anything from a T4 to an A100, and the same job runs several times longer on the
slowest than on the fastest. The scheduler reads a GPU's speed from a table of relative training
throughput keyed by model name (`ScoringConfig.gpu_speeds`, RTX 4090 = 1.0); NVML names such as
"NVIDIA GeForce RTX 4090" match the key "RTX 4090". A key matches whole model numbers only: "A100"
is not the "RTX A1000" and "L4" is not the "L40S" (a letter may follow, as in "A10G"). A node is as
fast as its slowest GPU (replicas of a multi-GPU job wait for each other); an unknown model gets
`unknown_gpu_speed`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt


@lru_cache(maxsize=256)
def _key_pattern(key: str) -> re.Pattern[str]:
    """The key's words in order, with or without separators between them ("RTX3080"), not preceded
    by a letter or digit and not followed by a digit (another model number: "A1000", "L40")."""
    words = re.findall(r"[0-9a-z]+", key.lower())
    return re.compile(r"(?<![0-9a-z])" + r"[^0-9a-z]*".join(map(re.escape, words)) + r"(?![0-9])")


@lru_cache(maxsize=256)
def gpu_speed(model: str, table: tuple[tuple[str, float], ...], unknown: float) -> float:
    """Relative speed of one GPU model (1.0 = RTX 4090)."""
    name = model.lower()
    # Longest key first, so "a100" wins over "a10".
    for key, speed in sorted(table, key=lambda kv: -len(kv[0])):
        if key.strip() and _key_pattern(key).search(name):
            return speed
    return unknown


def node_speed(models: Iterable[str], table: tuple[tuple[str, float], ...], unknown: float) -> float:
    """Speed of a node: its slowest GPU's (a node without GPUs counts as `unknown`)."""
    speeds = [gpu_speed(m, table, unknown) for m in models]
    return min(speeds) if speeds else unknown


def slowest_per_node(
    models: Sequence[str], gpus_per_node: npt.NDArray[np.int64], table: tuple[tuple[str, float], ...], unknown: float
) -> npt.NDArray[np.float64]:
    """`node_speed` of many nodes at once, given the model of every GPU in node order (the first
    ``gpus_per_node[0]`` belong to node 0, and so on). Each model name (a fleet has few) is looked up
    once."""
    speed_of = {model: gpu_speed(model, table, unknown) for model in set(models)}
    per_gpu = np.fromiter(map(speed_of.__getitem__, models), np.float64, len(models))
    out = np.full(len(gpus_per_node), unknown)
    has_gpus = gpus_per_node > 0
    if len(per_gpu):
        # The GPUs of the nodes that have any are contiguous runs, so reduceat over the runs' starts
        # takes each node's own GPUs (nodes without GPUs add nothing in between).
        starts = (np.cumsum(gpus_per_node) - gpus_per_node)[has_gpus]
        out[has_gpus] = np.minimum.reduceat(per_gpu, starts)
    return out
