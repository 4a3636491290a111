"""`python -m bench.scheduler [--quick] [--seed N] [--out PATH] [--plot PATH] [--jobs-parallel N]`."""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from koinon_operator.scheduler import (
    KoinonPlacer,
    LeastLatencyPlacer,
    Placer,
    RandomPlacer,
    ReputationOnlyPlacer,
    RoundRobinPlacer,
)

from .params import FULL, QUICK, SimParams
from .report import POLICIES, add_ratios, plot, write_json
from .simulator import Simulation
from .throughput import measure

ROOT = Path(__file__).resolve().parents[2]


def make_placer(name: str, seed: int) -> Placer:
    placers: dict[str, Placer] = {
        "koinon": KoinonPlacer(),
        "random": RandomPlacer(seed=seed),
        "round_robin": RoundRobinPlacer(),
        "least_latency": LeastLatencyPlacer(),
        "reputation_only": ReputationOnlyPlacer(),
    }
    return placers[name]


VARIANTS: dict[str, tuple[bool, bool]] = {
    "koinon_without_verification": (False, False),
    "koinon_without_revocation": (True, False),
}
"""Extra Koinon runs reported beside the five policies, not tuned to the targets: (verify, revoke).
Without verification separates placement from the cost of verification; without revocation shows
what retroactive invalidation buys and costs."""


def run_policy(args: tuple[str, SimParams]) -> tuple[str, dict[str, Any]]:
    name, params = args
    started = time.perf_counter()
    if name in VARIANTS:
        verify, revoke = VARIANTS[name]
        placer: Placer = KoinonPlacer()
    else:
        verify, placer = name == "koinon", make_placer(name, params.seed)
        revoke = verify
    sim = Simulation(params, placer, verify=verify)
    sim.revocation = revoke
    metrics = sim.run()
    metrics["wall_s"] = time.perf_counter() - started
    return name, metrics


def run(params: SimParams, parallel: int, throughput: bool) -> dict[str, Any]:
    # Slowest first, so two processes finish at about the same time.
    work = [
        (name, params) for name in ("koinon", *VARIANTS, "round_robin", "least_latency", "random", "reputation_only")
    ]
    if parallel > 1:
        with multiprocessing.get_context("fork").Pool(parallel) as pool:
            results = dict(pool.map(run_policy, work))
    else:
        results = dict(map(run_policy, work))
    policies = {name: results[name] for name in POLICIES}
    add_ratios(policies)
    for v in VARIANTS:
        add_ratios({**policies, v: results[v]})
    out: dict[str, Any] = {"policies": policies, "variants": {v: results[v] for v in VARIANTS}}
    if throughput:
        tp = measure()
        out["placements_per_s"] = tp["batches"]["500"]["placements_per_s"]
        out["throughput"] = tp
    else:
        out["placements_per_s"] = None
    out["simulation"] = params.to_json()
    out["definitions"] = {
        "correct_rate": "accepted results whose digest is the true one / accepted results",
        "completion": "submit -> accepted result, including queueing, failovers and verification copies",
        "wasted_gpu_hours": "GPU-hours executed - GPU-hours of one accepted execution per accepted job "
        "(lost to crashes/churn, rejected by a quorum, or redundant beyond one copy)",
        "replication_overhead": "GPU-hours executed / GPU-hours of one accepted execution per accepted job",
        "baselines": "one copy per job, first result accepted, no verification; same hard filters",
        "koinon": "jobs ask for verification.mode=replicated quorum 2; adaptive replication (BOINC rule), "
        "trusted partner for untrusted primaries, retroactive invalidation of results vouched for only by "
        "an owner later caught lying (the job reruns; its final accepted result counts)",
        "revoked": "accepted results revoked after their owner was caught; revoked_wrong: of them, wrong ones",
        "completion_floor_p95_s": "p95 of compute time alone (no queue, latency or crash): no placement beats it",
        "steady_state": "the same figures for jobs submitted in the second half of the arrival window",
        "placements_per_s": "schedule() on a batch of 500 pending jobs against 10,000 snapshots, "
        "including building the per-call index; best of 3",
    }
    out["machine"] = {"python": platform.python_version(), "cpus_used": parallel}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduler", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small fleet and job stream (smoke test)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--parallel", type=int, default=2, help="policies simulated at once (processes)")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--nodes", type=int, default=None, help="override the fleet size")
    parser.add_argument("--jobs", type=int, default=None, help="override the number of jobs")
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    if args.seed is not None:
        params = replace(params, seed=args.seed)
    if args.nodes is not None:
        params = replace(params, nodes=args.nodes)
    if args.jobs is not None:
        params = replace(params, jobs=args.jobs)
    # A quick run is a smoke test: it never overwrites the published results.
    default_out = (
        Path(tempfile.gettempdir()) / "koinon-bench-scheduler-quick.json"
        if args.quick
        else ROOT / "bench" / "results" / "scheduler.json"
    )
    out = args.out or default_out
    started = time.perf_counter()
    payload = run(params, args.parallel, throughput=not args.no_throughput)
    payload["wall_s"] = time.perf_counter() - started
    write_json(out, payload)
    if not args.quick or args.plot:
        plot_path = args.plot or out.with_suffix(".png")
        plot(
            plot_path,
            payload["policies"],
            f"Koinon scheduler vs baselines: {params.nodes} volunteers, {params.jobs} jobs, seed {params.seed}",
            payload["variants"],
        )
    for name, m in {**payload["policies"], **payload["variants"]}.items():
        print(
            f"{name:16s} correct {100 * m['correct_rate']:7.3f}%  p95 {m['completion_p95_s'] / 60:7.1f} min  "
            f"mean {m['completion_mean_s'] / 60:6.1f} min  wasted {m['wasted_gpu_hours']:9.0f} GPU-h  "
            f"overhead {m['replication_overhead']:5.2f}  unfinished {m['unfinished']}  revoked {m['revoked']}  "
            f"({m['wall_s']:.0f} s)"
        )
    print(f"placements/s: {payload['placements_per_s']}; wrote {out} in {payload['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
