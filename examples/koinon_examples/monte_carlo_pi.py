"""Estimate pi with Monte Carlo sampling spread over GPU tasks on the job's assigned volunteers.

Seeds are fixed, so every replica of a verified job computes the same digest.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import ray

from koinon_examples.placement import current_placement
from koinon_examples.tracing import job_span


@ray.remote
def count_inside(seed: int, samples: int) -> int:
    points = np.random.default_rng(seed).random((samples, 2))
    return int(np.count_nonzero((points * points).sum(axis=1) <= 1.0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--samples", type=int, default=200_000)
    args = parser.parse_args()
    ray.init()
    placement = current_placement()
    with job_span("monte_carlo_pi.sample"):  # in the AIJob's trace, under its root span
        futures = []
        for task in range(args.tasks):
            replica = task % max(1, len(placement.node_addresses))
            options: dict[str, object] = {"num_gpus": 1 if placement.gpus_per_replica else 0, "num_cpus": 0.5}
            if placement.node_addresses:
                options["resources"] = placement.pin(replica)
            futures.append(count_inside.options(**options).remote(task, args.samples))  # type: ignore[call-overload]
        inside = sum(ray.get(futures))
    estimate = 4.0 * inside / (args.tasks * args.samples)
    driver_node = ray.get_runtime_context().get_node_id()
    where = ", ".join(placement.node_names) or "any node"
    print(f"ran {args.tasks} tasks on {where}; driver on Ray node {driver_node}")
    print("KOINON_RESULT " + json.dumps({"pi": round(estimate, 6), "samples": args.tasks * args.samples}))


if __name__ == "__main__":
    main()
