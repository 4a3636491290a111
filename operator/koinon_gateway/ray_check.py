"""Confirms in the Ray head's GCS that a node an agent reports is alive at that agent's address.

A node is Ready only once GCS lists its Ray node id as ALIVE with the node's own virtual address,
so an agent can neither claim readiness early nor claim another node's Ray identity. A node that
drains is drained in GCS too, so Ray stops placing work on it while its running tasks finish.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    """Reads the GCS node table (cached briefly: a thousand agents share one read).

    A client that failed is dropped and the next call makes a new one: the ray-head container
    restarts on its own beside the gateway (its memory limit, its liveness probe), and the new GCS
    refuses a client made for the old one for ever (WrongClusterID), so keeping it would leave
    every volunteer's Ray node unconfirmed until the gateway restarts. Any error drops it: a fresh
    client costs one connection, and what failed cannot be told apart reliably (Ray raises
    AuthenticationError, RpcError, GetTimeoutError...). A failure streak is logged once, when it
    starts, and once when GCS answers again; not at every retry."""

    def __init__(self, gcs_address: str, auth_token: str = "", cache_s: float = 0.5) -> None:
        self.gcs_address = gcs_address
        self.cache_s = cache_s
        if auth_token:
            # Ray's client reads token authentication from the environment.
            os.environ.setdefault("RAY_AUTH_MODE", "token")
            os.environ.setdefault("RAY_AUTH_TOKEN", auth_token)
        self._client: Any = None
        # Reads and drains run in worker threads, possibly at once.
        self._client_lock = threading.Lock()
        self._failures = 0  # calls failed in a row
        self._table: dict[str, str] = {}
        self._read_at = 0.0
        self._lock = asyncio.Lock()

    def _call(self, use: Callable[[Any], T]) -> T:
        """``use(client)`` in the calling (worker) thread; a client that fails is dropped."""
        with self._client_lock:
            client = self._client
        try:
            if client is None:
                # Outside the lock: Ray waits for an absent GCS (30 s) before it raises.
                client = importlib.import_module("ray._raylet").GcsClient(address=self.gcs_address)
                with self._client_lock:
                    self._client = client
            result = use(client)
        except Exception as exc:
            with self._client_lock:
                if client is not None and self._client is client:  # not one another thread made since
                    self._client = None
                self._failures += 1
                first = self._failures == 1
            if first:
                log.warning(
                    "GCS at %s failed: %r; making a new client at each try until it answers", self.gcs_address, exc
                )
            raise
        with self._client_lock:
            failures, self._failures = self._failures, 0
        if failures:
            log.info("GCS at %s answers again after %d failed calls", self.gcs_address, failures)
        return result

    def _read(self) -> dict[str, str]:
        infos = self._call(lambda gcs: gcs.get_all_node_info(timeout=5))
        return {key.hex(): info.node_manager_address for key, info in infos.items() if info.state == ALIVE}

    def _drain(self, node_id: str, message: str, deadline_s: float) -> tuple[bool, str]:
        reasons = importlib.import_module("ray.core.generated.autoscaler_pb2").DrainNodeReason
        # PREEMPTION, not IDLE_TERMINATION: GCS accepts it while tasks still run, stops placing new
        # ones there, and lets the running ones go on until the deadline (the volunteer's grace).
        accepted, why = self._call(
            lambda gcs: gcs.drain_node(
                node_id,
                reasons.Value("DRAIN_NODE_REASON_PREEMPTION"),
                message,
                int(deadline_s * 1000),
                timeout=DRAIN_RPC_TIMEOUT_S,
            )
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
