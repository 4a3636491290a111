"""Confirms in the Ray head's GCS that a node an agent reports is alive at that agent's address.

A node is Ready only once GCS lists its Ray node id as ALIVE with the node's own virtual address,
so an agent can neither claim readiness early nor claim another node's Ray identity. A node that
drains is drained in GCS too, so Ray stops placing work on it while its running tasks finish.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import time
from typing import Any, Protocol

ALIVE = 0  # rpc::GcsNodeInfo::ALIVE
# Ray's client waits forever by default; a drain that hangs is abandoned and asked again.
DRAIN_RPC_TIMEOUT_S = 5.0


class RayNodeChecker(Protocol):
    async def address_of(self, node_id: str) -> str | None:
        """The node manager address of an ALIVE node, or None."""
        ...

    async def drain(self, node_id: str, message: str, deadline_s: float) -> tuple[bool, str]:
        """Asks GCS to schedule nothing new on the node, which goes away after ``deadline_s``
        (Unix seconds); returns (accepted, why not) and raises when GCS cannot be asked or does not
        answer in time."""
        ...


class GcsRayNodeChecker:
    """Reads the GCS node table (cached briefly: a thousand agents share one read)."""

    def __init__(self, gcs_address: str, auth_token: str = "", cache_s: float = 0.5) -> None:
        self.gcs_address = gcs_address
        self.cache_s = cache_s
        if auth_token:
            # Ray's client reads token authentication from the environment.
            os.environ.setdefault("RAY_AUTH_MODE", "token")
            os.environ.setdefault("RAY_AUTH_TOKEN", auth_token)
        self._client: Any = None
        self._table: dict[str, str] = {}
        self._read_at = 0.0
        self._lock = asyncio.Lock()

    def _gcs(self) -> Any:
        if self._client is None:
            self._client = importlib.import_module("ray._raylet").GcsClient(address=self.gcs_address)
        return self._client

    def _read(self) -> dict[str, str]:
        infos = self._gcs().get_all_node_info(timeout=5)
        return {key.hex(): info.node_manager_address for key, info in infos.items() if info.state == ALIVE}

    def _drain(self, node_id: str, message: str, deadline_s: float) -> tuple[bool, str]:
        reasons = importlib.import_module("ray.core.generated.autoscaler_pb2").DrainNodeReason
        # PREEMPTION, not IDLE_TERMINATION: GCS accepts it while tasks still run, stops placing new
        # ones there, and lets the running ones go on until the deadline (the volunteer's grace).
        accepted, why = self._gcs().drain_node(
            node_id,
            reasons.Value("DRAIN_NODE_REASON_PREEMPTION"),
            message,
            int(deadline_s * 1000),
            timeout=DRAIN_RPC_TIMEOUT_S,
        )
        return bool(accepted), str(why or "")

    async def drain(self, node_id: str, message: str, deadline_s: float) -> tuple[bool, str]:
        return await asyncio.to_thread(self._drain, node_id, message, deadline_s)

    async def address_of(self, node_id: str) -> str | None:
        async with self._lock:
            if time.monotonic() - self._read_at > self.cache_s:
                self._table = await asyncio.to_thread(self._read)
                self._read_at = time.monotonic()
            return self._table.get(node_id)
