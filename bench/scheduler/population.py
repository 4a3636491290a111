"""The volunteers and the job stream, drawn once from the seed and shared by every policy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from koinon_operator.scheduler import DEFAULT_CONFIG, Gpu
from koinon_operator.scheduler.speed import gpu_speed

from .params import SimParams

REGIONS = ("eu-west", "eu-east", "us-east", "us-west", "ap-south")
GPU_TYPES = (("T4", 16384), ("RTX3060", 12288), ("RTX3080", 10240), ("RTX4090", 24576), ("A100", 81920))
GPU_TYPE_P = (0.2, 0.25, 0.2, 0.3, 0.05)
_SC = DEFAULT_CONFIG.scoring
GPU_SPEED = tuple(gpu_speed(model, _SC.gpu_speeds, _SC.unknown_gpu_speed) for model, _ in GPU_TYPES)
"""What the scheduler believes (its default table); each node's true speed varies around it."""
MEAN_GPU_SPEED = float(np.dot(GPU_TYPE_P, GPU_SPEED))
FASTEST_GPU_SPEED = max(GPU_SPEED)
GPU_COUNTS = (1, 2, 4, 8)
GPU_COUNT_P = (0.6, 0.25, 0.12, 0.03)


@dataclass(slots=True)
class Volunteer:
    name: str
    owner: str
    region: str
    gpus: tuple[Gpu, ...]
    cpus: float
    base_rtt_ms: float
    reliability: float
    speed: float
    """True relative speed (RTX 4090 = 1.0): the model's table speed times a per-node factor the
    scheduler does not see (thermal limits, an owner gaming on the same GPU, PCIe lanes)."""
    kind: str
    """honest | liar | sleeper"""
    sleeper_after: int
    lie_probability: float


@dataclass(frozen=True, slots=True)
class JobSpec:
    index: int
    submit_s: float
    gpus: int
    memory_mib: int
    compute_s: float
    """Run time on the reference GPU (speed 1.0); a node of speed s needs compute_s / s."""
    syncs: float
    """Round trips to the head the job makes (one per training/inference step it reports)."""
    max_latency_ms: float | None
    regions: frozenset[str]
    min_reputation: float
    measured: bool
    """False for the warm-up stream that runs before the measured jobs (`SimParams.warmup_h`)."""
    duration_estimate_s: float
    """What the submitter expects (`expected_duration_s`): the true compute time times a lognormal
    error (sigma 0.5: half the estimates are off by more than ~40 %)."""


class VolunteerFactory:
    """Draws volunteers; replacements keep the class (and often the owner) of whom they replace."""

    def __init__(self, params: SimParams, rng: np.random.Generator) -> None:
        self.p = params
        self.rng = rng
        self.count = 0
        self.owners = 0

    def new_owner(self, prefix: str) -> str:
        self.owners += 1
        return f"{prefix}{self.owners:06d}"

    def make(self, owner: str, kind: str) -> Volunteer:
        r = self.rng
        self.count += 1
        n = int(r.choice(GPU_COUNTS, p=GPU_COUNT_P))
        kind_of_gpu = int(r.choice(len(GPU_TYPES), p=GPU_TYPE_P))
        model, mem = GPU_TYPES[kind_of_gpu]
        speed = GPU_SPEED[kind_of_gpu] * float(np.clip(r.lognormal(0.0, self.p.speed_noise_sigma), 0.5, 1.5))
        lie = 0.0
        after = 0
        if kind == "liar":
            lie = self.p.liar_lie_probability
        elif kind == "sleeper":
            lie = self.p.sleeper_lie_probability
            after = int(r.integers(10, 41))
        return Volunteer(
            name=f"vn-{self.count:06d}",
            owner=owner,
            region=REGIONS[int(r.integers(len(REGIONS)))],
            gpus=tuple(Gpu(model, mem) for _ in range(n)),
            cpus=4.0 * n,
            base_rtt_ms=float(r.uniform(*self.p.rtt_ms)),
            reliability=float(r.uniform(*self.p.reliability)),
            speed=speed,
            kind=kind,
            sleeper_after=after,
            lie_probability=lie,
        )

    def initial(self) -> list[Volunteer]:
        p, r = self.p, self.rng
        out: list[Volunteer] = []
        adversaries = round(p.nodes * p.adversary_share)
        in_fleets = round(adversaries * p.adversary_fleet_share)
        while len(out) < in_fleets:
            owner = self.new_owner("adv-")
            kind = "sleeper" if r.random() < p.sleeper_share else "liar"
            out.extend(self.make(owner, kind) for _ in range(min(p.fleet_size, in_fleets - len(out))))
        while len(out) < adversaries:
            kind = "sleeper" if r.random() < p.sleeper_share else "liar"
            out.append(self.make(self.new_owner("adv-"), kind))
        while len(out) < p.nodes:
            owner = self.new_owner("own-")
            size = int(r.choice((1, 2, 3), p=(0.7, 0.2, 0.1)))
            out.extend(self.make(owner, "honest") for _ in range(min(size, p.nodes - len(out))))
        return out

    def replacement(self, gone: Volunteer) -> Volunteer:
        owner = gone.owner
        if gone.kind != "honest" and self.rng.random() < self.p.whitewash_share:
            owner = self.new_owner("adv-")
        return self.make(owner, gone.kind)


def job_stream(params: SimParams, rng: np.random.Generator) -> list[JobSpec]:
    warmup = params.warmup_h * 3600.0
    window = params.arrival_window_h * 3600.0
    warmup_jobs = round(params.jobs * params.warmup_h / params.arrival_window_h)
    n = warmup_jobs + params.jobs
    # The warm-up stream has the same rate and mix; exactly `jobs` are submitted in the window after it.
    submit = np.concatenate(
        (np.sort(rng.uniform(0.0, warmup, warmup_jobs)), np.sort(rng.uniform(warmup, warmup + window, params.jobs)))
    )
    gpus = rng.choice((1, 2, 4, 8), size=n, p=(0.7, 0.2, 0.08, 0.02))
    memory = rng.choice((0, 8192, 12288, 16384, 24576), size=n, p=(0.4, 0.25, 0.15, 0.15, 0.05))
    # Drawn as the run time on a GPU of the fleet's mean speed, so the offered load stays at the
    # same share of the fleet's capacity whatever the GPU mix; stored as reference-GPU time.
    on_average_gpu = np.clip(rng.lognormal(math.log(15 * 60), 1.0, n), 120.0, 4 * 3600.0)
    compute = on_average_gpu * MEAN_GPU_SPEED
    sync_every = rng.uniform(1.0, 5.0, n)
    kind = rng.random(n)
    region_pick = rng.integers(len(REGIONS), size=n)
    estimate = compute * rng.lognormal(0.0, params.duration_estimate_sigma, n)
    out = []
    for i in range(n):
        out.append(
            JobSpec(
                index=i,
                submit_s=float(submit[i]),
                gpus=int(gpus[i]),
                memory_mib=int(memory[i]),
                compute_s=float(compute[i]),
                syncs=float(on_average_gpu[i] / sync_every[i]),
                max_latency_ms=150.0 if kind[i] < 0.10 else None,
                regions=frozenset({REGIONS[int(region_pick[i])]}) if 0.10 <= kind[i] < 0.15 else frozenset(),
                min_reputation=0.5 if 0.15 <= kind[i] < 0.20 else 0.0,
                measured=i >= warmup_jobs,
                duration_estimate_s=float(estimate[i]),
            )
        )
    return out
