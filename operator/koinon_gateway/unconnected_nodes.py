"""Which VolunteerNodes joined but never connected, for long enough to be deleted.

A join takes a virtual address from a fixed pool (``vip_cidr``) and creates a VolunteerNode; an
agent that never opens its Control stream afterwards (it crashed for good, its machine is gone, or a
leaked many-use token is spent on joins alone) would keep both forever and in the end exhaust the
pool for everyone. Kubernetes garbage-collects pending CSRs after 24 hours for the same reason.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .registry import JSON, being_deleted, created_at, made_by_join, node_uid, status_address


@dataclass(frozen=True)
class UnconnectedNode:
    name: str
    uid: str
    # The object as read: deleting with it as a precondition misses a node that connected since.
    resource_version: str
    address: str
    created: dt.datetime


def never_connected(node: JSON) -> bool:
    """No session ever wrote its status: each one writes ``lastHeartbeat`` with its first write
    (sessions.SessionTable), and nothing removes it afterwards."""
    return "lastHeartbeat" not in (node.get("status") or {})


def unconnected_too_long(
    nodes: Iterable[JSON], now: dt.datetime, ttl_s: float, connected: Collection[str]
) -> list[UnconnectedNode]:
    """Nodes a join made that never connected and were created more than ``ttl_s`` before ``now``;
    not those with a session now (``connected``: node names), being deleted, or of unknown age."""
    found = []
    for node in nodes:
        metadata = node.get("metadata") or {}
        name = str(metadata.get("name") or "")
        created = created_at(node)
        if (
            not name
            or name in connected
            # Made by hand, not by a join: not the gateway's to delete.
            or not made_by_join(node)
            or being_deleted(node)
            or not never_connected(node)
            or created is None
            or (now - created).total_seconds() <= ttl_s
        ):
            continue
        resource_version = str(metadata.get("resourceVersion") or "")
        found.append(UnconnectedNode(name, node_uid(node), resource_version, status_address(node), created))
    return found
