"""Read the placement the operator chose for this job (it arrives in environment variables)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class JobPlacement:
    node_names: tuple[str, ...]
    node_addresses: tuple[str, ...]
    gpus_per_replica: int

    def pin(self, replica: int) -> dict[str, float]:
        """Ray ``resources=`` that keep a task on the node of ``replica`` (Ray's per-node resource)."""
        return {f"node:{self.node_addresses[replica]}": 0.001}


def current_placement() -> JobPlacement:
    addresses = tuple(a for a in os.environ.get("KOINON_NODE_ADDRESSES", "").split(",") if a)
    names = tuple(n for n in os.environ.get("KOINON_NODE_NAMES", "").split(",") if n)
    return JobPlacement(
        node_names=names or addresses,
        node_addresses=addresses,
        gpus_per_replica=int(os.environ.get("KOINON_GPUS_PER_REPLICA", "0")),
    )
