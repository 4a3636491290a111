"""VolunteerNode status for nodes that joined Ray directly (the local control plane's volunteers).

Volunteers that join through the gateway have their connection fields written by the gateway,
which marks them with the ``koinon.dev/connection-owner: gateway`` annotation; those are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from koinon_operator.api.conditions import set_condition
from koinon_operator.inventory import node_name
from koinon_operator.ray_jobs import RayNodeInfo

CONNECTION_OWNER_ANNOTATION = "koinon.dev/connection-owner"


def managed_by_gateway(body: Mapping[str, Any]) -> bool:
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    return annotations.get(CONNECTION_OWNER_ANNOTATION) == "gateway"


def status_from_ray(body: Mapping[str, Any], ray_nodes: Iterable[RayNodeInfo], now: str) -> dict[str, Any]:
    """Pure: the connection part of a VolunteerNode's status, from Ray's view of its node."""
    name = (body.get("metadata") or {}).get("name")
    current: Mapping[str, Any] = body.get("status") or {}
    # Ray keeps dead nodes in its list: a raylet restarted by the agent leaves its predecessor there.
    named = [n for n in ray_nodes if not n.is_head and node_name(n) == name]
    node = next((n for n in named if n.alive), named[0] if named else None)
    ready = node is not None and node.alive
    status: dict[str, Any] = {
        "phase": "Ready" if ready else "NotReady",
        "connected": ready,
        "conditions": set_condition(
            current.get("conditions") or [],
            type_="Ready",
            status=ready,
            reason="RayNodeAlive" if ready else "RayNodeMissing",
            message="its Ray worker node is alive" if ready else "no live Ray worker node with this name",
            now=now,
        ),
    }
    if node is not None:
        spec_gpus = (body.get("spec") or {}).get("gpus") or []
        status.update(
            address=node.address,
            rayNodeId=node.node_id,
            gpus=list(spec_gpus)[: int(node.resources_total.get("GPU", 0))],
        )
        if ready:
            status["lastHeartbeat"] = now
    return {key: value for key, value in status.items() if current.get(key) != value or key == "lastHeartbeat"}
