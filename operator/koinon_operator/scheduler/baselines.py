"""Naive placement policies to measure Koinon against.

They share Koinon's hard filters and capacity accounting (so none ever over-commits a node or
breaks a constraint) but choose naively and never verify: one copy per job, whatever
`verification_quorum` asks for, and the caller accepts the first result.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from .candidates import HighestValue, NodeValues
from .config import DEFAULT_CONFIG, SchedulerConfig
from .index import BoolArray, FloatArray, NodeIndex, Positions
from .placer import _run
from .types import JobRequest, NodeSnapshot, SchedulingResult
from .verification import stable_seed


class RandomPlacer:
    """Uniformly random among the nodes that fit; the generator is seeded from the inputs."""

    name = "random"

    def __init__(self, seed: int = 0, config: SchedulerConfig = DEFAULT_CONFIG) -> None:
        self.seed = seed
        self.config = config

    def place(self, jobs: Sequence[JobRequest], nodes: Sequence[NodeSnapshot], now: float) -> SchedulingResult:
        rng = np.random.default_rng(stable_seed(self.seed, now, *sorted(j.key for j in jobs)))

        def choose(index: NodeIndex, mask: BoolArray, job: JobRequest) -> int:
            candidates = np.flatnonzero(mask)
            return int(candidates[rng.integers(len(candidates))]) if len(candidates) else -1

        return _run(jobs, nodes, now, self.config, choose, verify=False)


class RoundRobinPlacer:
    """Next node (by name) after the last one used, wrapping around. Keeps a cursor between calls,
    which is what makes it round-robin; it is a baseline, not a pure function."""

    name = "round_robin"

    def __init__(self, config: SchedulerConfig = DEFAULT_CONFIG) -> None:
        self.config = config
        self._last_name = ""

    def place(self, jobs: Sequence[JobRequest], nodes: Sequence[NodeSnapshot], now: float) -> SchedulingResult:
        def choose(index: NodeIndex, mask: BoolArray, job: JobRequest) -> int:
            candidates = np.flatnonzero(mask)
            if not len(candidates):
                return -1
            start = bisect.bisect_right(index.names, self._last_name)  # names are sorted
            k = int(np.searchsorted(candidates, start))
            i = int(candidates[k % len(candidates)])
            self._last_name = index.names[i]
            return i

        return _run(jobs, nodes, now, self.config, choose, verify=False)


class LeastLatencyPlacer:
    """Smallest smoothed RTT; nodes whose RTT is unknown come last."""

    name = "least_latency"

    def __init__(self, config: SchedulerConfig = DEFAULT_CONFIG) -> None:
        self.config = config

    def place(self, jobs: Sequence[JobRequest], nodes: Sequence[NodeSnapshot], now: float) -> SchedulingResult:
        return _run(jobs, nodes, now, self.config, _LEAST_LATENCY, verify=False)


class ReputationOnlyPlacer:
    """Highest beta reputation mean (Jøsang's expectation, no lower bound, nothing else)."""

    name = "reputation_only"

    def __init__(self, config: SchedulerConfig = DEFAULT_CONFIG) -> None:
        self.config = config

    def place(self, jobs: Sequence[JobRequest], nodes: Sequence[NodeSnapshot], now: float) -> SchedulingResult:
        return _run(jobs, nodes, now, self.config, _REPUTATION_MEAN, verify=False)


def _least_latency(index: NodeIndex, job: JobRequest) -> NodeValues:
    def values(at: Positions) -> FloatArray:
        # Unknown RTT ranks below every measured one but stays finite, so such nodes remain choosable.
        out: FloatArray = -np.nan_to_num(index.rtt_ms[at], nan=1e12)
        return out

    return values


def _reputation_mean(index: NodeIndex, job: JobRequest) -> NodeValues:
    def values(at: Positions) -> FloatArray:
        out: FloatArray = index.mean_score[at]
        return out

    return values


_LEAST_LATENCY = HighestValue(lambda job: "least-latency", _least_latency)
_REPUTATION_MEAN = HighestValue(lambda job: "reputation-mean", _reputation_mean)
