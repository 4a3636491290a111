"""The pool as placement sees it: live Ray nodes, joined with their VolunteerNode objects, minus the
capacity that AIJobs already hold."""

from __future__ import annotations

import asyncio
import logging
import marshal
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from koinon_operator.api.aijob import parse_time
from koinon_operator.placement import NodeCapacity
from koinon_operator.ray_jobs import RayJobsClient, RayNodeInfo
from koinon_operator.scheduler import from_status

NODE_NAME_LABEL = "koinon.dev/node"
# The most GPUs one bare Ray worker is booked for: Ray's GPU count is what its own `ray start
# --num-gpus` declared, and placement makes an object per GPU (millions stalled every pass, and more
# could exhaust the operator's memory). The gateway admits no volunteer with more (MAX_GPUS).
BARE_WORKER_MAX_GPUS = 64

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Allocation:
    """What one AIJob holds: one replica on each named node."""

    nodes: tuple[str, ...]
    gpus_per_replica: int
    cpus_per_replica: float


def node_name(node: RayNodeInfo) -> str:
    return node.labels.get(NODE_NAME_LABEL) or node.address


def build_capacity(
    ray_nodes: Iterable[RayNodeInfo],
    volunteers: Mapping[str, Mapping[str, Any]],
    allocations: Iterable[Allocation],
    allow_bare: bool = False,
) -> list[NodeCapacity]:
    """Pure: free capacity per live, non-head Ray node, one per node name, and (not ready, with no
    capacity) each VolunteerNode without a live Ray node.

    ``volunteers`` maps a node name to its VolunteerNode object (spec/status, and ``deleting``
    when it has a deletionTimestamp). A Ray node's ``koinon.dev/node`` label is its own claim (the
    volunteer's `ray start` sets it), so it counts as that VolunteerNode's only at the address the
    VolunteerNode's status names (the virtual address the gateway gave it, which the tunnel routes
    by) and, where the status names one, as the Ray node id the gateway confirmed there. A labelled
    node elsewhere, or one whose VolunteerNode has no address yet (just joined), is deleted, or is
    being deleted, takes no new work (its cordon and reputation are that object's). An unlabelled
    Ray node takes none either (it would be an owner of its own that no evidence could reach)
    unless ``allow_bare`` (bare Ray workers, in development): then it is usable with neutral
    defaults. A VolunteerNode whose status placement cannot read (e.g. a negative latency) takes
    none, and the reason is logged.

    The operator calls this once per pending AIJob, against thousands of volunteers of which few
    changed in between: what a node's entry takes from its Ray node and VolunteerNode alone (the
    status checked, the GPUs listed, times parsed) is kept for the next call while those stay the
    same, and the entry itself while what the allocations hold there stays the same too (``_Kept``).
    """
    used_gpus: dict[str, int] = {}
    used_cpus: dict[str, float] = {}
    running: dict[str, int] = {}
    for allocation in allocations:
        for name in allocation.nodes:
            used_gpus[name] = used_gpus.get(name, 0) + allocation.gpus_per_replica
            used_cpus[name] = used_cpus.get(name, 0.0) + allocation.cpus_per_replica
            running[name] = running.get(name, 0) + 1
    global _kept_live, _kept_offline
    previous, kept = _kept_live, {}
    capacity: list[NodeCapacity] = []
    for name, node in _one_node_per_name(ray_nodes, volunteers, allow_bare).items():
        # A bare worker is nobody's VolunteerNode, even one named like its address.
        volunteer = volunteers.get(name) if NODE_NAME_LABEL in node.labels else None
        key = _key(node, volunteer)
        entry = previous.get(name)
        if entry is None or key is None or entry.key != key:
            entry = _Kept.live(name, node, volunteer, key)
        kept[name] = entry
        # Each call, as before the entries were kept: a reason logged and then forgotten (the node
        # gone from Ray in between) is logged again. The test first: _report's own, without a call.
        if _reported_unreadable.get(name, "") != entry.unreadable:
            _report_unreadable(name, entry.unreadable)
        if _reported_unproven.get(name, "") != entry.unproven:
            _report_unproven(name, entry.unproven)
        capacity.append(
            entry.capacity(
                name, node, volunteer, used_gpus.get(name, 0), used_cpus.get(name, 0.0), running.get(name, 0)
            )
        )
    _kept_live = kept  # only this call's nodes: bounded by the fleet
    live = kept.keys()  # the names of the nodes above
    # Names come from labels, which volunteers choose: forget those Ray no longer lists.
    for name in _reported_unproven.keys() - live:
        del _reported_unproven[name]
    # VolunteerNodes with no live Ray node take no work, but their evidence still counts: an owner
    # caught lying on one node must not clear its other nodes' taint by taking that one offline.
    previous, kept = _kept_offline, {}
    for name in sorted(name for name in volunteers if name not in live):  # names are unique: by name
        volunteer = volunteers[name]
        key = _key(None, volunteer)
        entry = previous.get(name)
        if entry is None or key is None or entry.key != key:
            entry = _Kept.offline(name, volunteer, key)
        kept[name] = entry
        if _reported_unreadable.get(name, "") != entry.unreadable:
            _report_unreadable(name, entry.unreadable)
        capacity.append(entry.capacity(name, None, volunteer, 0, 0.0, 0))
    _kept_offline = kept
    return capacity


def _key(node: RayNodeInfo | None, volunteer: Mapping[str, Any] | None) -> bytes | None:
    """All an entry is derived from, as bytes (``_Kept`` says why), None where marshal cannot write
    it: the Ray node's fields (it is alive and no head, or it would not be here; none for a
    VolunteerNode without one) and the VolunteerNode object."""
    # Any: the Mappings are dicts of JSON values from the Kubernetes and Ray clients. marshal refuses
    # most other types, but not all: a numpy scalar is written as its raw bytes, like another of
    # the same bytes, so such values must not be passed here.
    inputs: tuple[Any, ...] = (
        (volunteer,) if node is None else (node.node_id, node.address, node.resources_total, node.labels, volunteer)
    )
    try:
        return marshal.dumps(inputs, 2)
    except ValueError:
        return None


class _Kept:
    """One node's entry as derived from its inputs, kept while they stay the same: while ``key``,
    the inputs marshalled, is the same bytes.

    Bytes, not the objects compared: ``True == 1 == 1.0`` and the checks here tell them apart (a
    bool latency is unreadable; an owner 1 is "1", 1.0 is "1.0"), while marshal writes each type
    apart, and, in format 2 (no references between objects), the same bytes for the same content
    whichever objects hold it. The inputs are marshalled every call, so a value changed in place
    is seen as one in a new object is; nothing of theirs is kept but those bytes. What marshal
    cannot write (a subclass of dict or str, say; no client of the Kubernetes or Ray API makes
    one) gets no key, and is derived again every call. Only for JSON values: marshal writes some
    other types (numpy scalars, bytes) as raw bytes, alike across types (``_key``)."""

    __slots__ = (
        "cordoned",
        "cpus_total",
        "gpu_memory_mib",
        "gpu_models",
        "gpus_total",
        "key",
        "last",
        "latency_ms",
        "latency_updated_at",
        "owner",
        "ready",
        "region",
        "reputation",
        "unproven",
        "unreadable",
    )

    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self.gpus_total = 0
        self.cpus_total = 0.0
        self.gpu_memory_mib = 0
        self.gpu_models: tuple[str, ...] = ()
        self.owner = ""
        self.region = "unknown"
        self.ready = False
        self.cordoned = False
        self.latency_ms: float | None = None
        self.latency_updated_at: float | None = None
        self.reputation = 0.0
        self.unreadable = ""
        self.unproven = ""
        self.last: NodeCapacity | None = None
        """The capacity returned last, returned again while nothing in it changed (it is frozen)."""

    @classmethod
    def live(cls, name: str, node: RayNodeInfo, volunteer: Mapping[str, Any] | None, key: bytes | None) -> _Kept:
        kept = cls(key)
        labelled = NODE_NAME_LABEL in node.labels
        spec = (volunteer or {}).get("spec") or {}
        status = (volunteer or {}).get("status") or {}
        # Ray's GPU count is the volunteer's own claim: booked no higher than the GPUs it joined
        # with, or those its latest registration reported (status.gpus, the gateway's bounds too):
        # a volunteer that added a GPU and restarted uses it.
        listed = _listed_gpus(spec, status) if labelled else []
        gpu_cap = len(listed) if labelled else BARE_WORKER_MAX_GPUS
        kept.gpus_total = _gpu_count(node.resources_total.get("GPU", 0), gpu_cap)
        kept.cpus_total = float(node.resources_total.get("CPU", 0.0))
        # Placement gives every GPU this memory: the least of those the cap counted (which of them
        # Ray's count stands for is unknown), so a smaller GPU added or swapped in is never booked
        # with the join's bigger memory (its job would run out of memory, charged to the job).
        kept.gpu_memory_mib = min((memory for _, memory in listed), default=0)
        kept.gpu_models = tuple(model for model, _ in listed)
        kept._from_volunteer(name, spec, status)
        kept.unproven = _unproven(node, volunteer) if labelled else ""
        latency = status.get("latency") or {}
        # Only Ready takes new work: a Draining volunteer is leaving and a Pending one is not up
        # yet. No phase: a bare worker (no VolunteerNode), with the neutral default.
        kept.ready = status.get("phase", "Ready") == "Ready" and not kept.unreadable and not kept.unproven
        kept.latency_ms = None if kept.unreadable else latency.get("smoothedMs")
        kept.latency_updated_at = None if kept.unreadable else _epoch(latency.get("updatedAt"))
        return kept

    @classmethod
    def offline(cls, name: str, volunteer: Mapping[str, Any], key: bytes | None) -> _Kept:
        kept = cls(key)
        kept._from_volunteer(name, volunteer.get("spec") or {}, volunteer.get("status") or {})
        return kept

    def _from_volunteer(self, name: str, spec: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        self.owner = str(spec.get("owner") or name)
        self.region = str(spec.get("region") or "unknown")
        self.cordoned = bool(spec.get("cordoned", False))
        self.unreadable = unreadable_status(status)
        reputation = status.get("reputation") or {}
        self.reputation = 0.0 if self.unreadable else float(reputation.get("lowerBound", 0.5))

    def capacity(
        self,
        name: str,
        node: RayNodeInfo | None,
        volunteer: Mapping[str, Any] | None,
        used_gpus: int,
        used_cpus: float,
        running: int,
    ) -> NodeCapacity:
        """The node's capacity with this much held there (no node: the VolunteerNode's alone)."""
        # The VolunteerNode's own status.reputation, read every call: the object handed out is the
        # one the caller passed (as before entries were kept), never one from an earlier call.
        status = (volunteer or {}).get("status") or {}
        reputation_status = None if self.unreadable else status.get("reputation") or None
        gpus_free = self.gpus_total - used_gpus
        cpus_free = self.cpus_total - used_cpus
        last = self.last
        if (
            last is not None
            and last.reputation_status is reputation_status
            and last.gpus_free == gpus_free
            and type(last.gpus_free) is type(gpus_free)  # an allocation's GPUs given as a float
            and last.cpus_free == cpus_free
            and last.running_jobs == running
        ):
            return last
        if node is None:
            self.last = NodeCapacity(
                name=name,
                address="",
                ray_node_id="",
                gpus_total=0,
                gpus_free=0,
                cpus_free=0.0,
                gpu_memory_mib=0,
                owner=self.owner,
                region=self.region,
                ready=False,
                cordoned=self.cordoned,
                reputation=self.reputation,
                reputation_status=reputation_status,
            )
        else:
            self.last = NodeCapacity(
                name=name,
                address=node.address,
                ray_node_id=node.node_id,
                gpus_total=self.gpus_total,
                gpus_free=gpus_free,
                cpus_free=cpus_free,
                cpus_total=self.cpus_total,
                gpu_memory_mib=self.gpu_memory_mib,
                gpu_models=self.gpu_models,
                owner=self.owner,
                region=self.region,
                ready=self.ready,
                cordoned=self.cordoned,
                latency_ms=self.latency_ms,
                latency_updated_at=self.latency_updated_at,
                reputation=self.reputation,
                reputation_status=reputation_status,
                running_jobs=running,
            )
        return self.last


# Node name -> its entry in the last call (only the nodes of that call: bounded by the fleet), for
# the live Ray nodes and for the VolunteerNodes without one.
_kept_live: dict[str, _Kept] = {}
_kept_offline: dict[str, _Kept] = {}


def _unproven(node: RayNodeInfo, volunteer: Mapping[str, Any] | None) -> str:
    """Why a labelled Ray node is not taken for its VolunteerNode ("" when it is)."""
    if volunteer is None:
        return "no such VolunteerNode (deleted, or not seen yet)"
    if volunteer.get("deleting"):
        return "being deleted"
    status = volunteer.get("status") or {}
    address = status.get("address") or ""
    if not address:
        return "no status.address yet"
    if node.address != address:
        # Its label names this VolunteerNode, but it runs at another address: another volunteer's
        # machine (or a bare worker) posing as it.
        return f"Ray node {node.node_id} claims it at {node.address}, not at its status.address {address}"
    recorded = status.get("rayNodeId")
    if recorded and node.node_id != recorded:
        # GCS takes a raylet's word for its address too; the id is the one the gateway confirmed
        # its own agent runs there (a restarted raylet waits for that, as its phase does).
        return f"Ray node {node.node_id} is not its status.rayNodeId {recorded}"
    return ""


# The most memory a GPU may report (koinon_gateway.limits.MAX_GPU_MEMORY_MIB, 16 TiB; the operator
# does not import the gateway): more is read as unknown (0).
GPU_MEMORY_MIB_MAX = 1 << 24


def _listed_gpus(spec: Mapping[str, Any], status: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(model, memoryMiB) of the GPUs a VolunteerNode lists, as many as the longer of spec.gpus (its
    join) and status.gpus (its latest registration), each a list the gateway bounded (MAX_GPUS):
    those of status.gpus, which says what the node has now, then those of spec.gpus beyond its
    length (a registration listing fewer does not lower the count below the join's)."""
    joined, latest = (_gpus_of(listed) for listed in (spec.get("gpus"), status.get("gpus")))
    return latest + joined[len(latest) :]


def _gpus_of(listed: object) -> list[tuple[str, int]]:
    """(model, memoryMiB) of each entry of a `gpus` list. An entry without a readable memoryMiB
    (status.gpus does not require one; junk written before the CRD checked) counts as a GPU of no
    known memory (0): jobs that ask for GPU memory go elsewhere, and placement does not fail."""
    if not isinstance(listed, list):
        return []
    gpus = []
    for entry in listed:
        gpu = entry if isinstance(entry, Mapping) else {}
        memory = gpu.get("memoryMiB", 0)
        # Beyond the gateway's bound (the CRD's integer type keeps it within int64 anyway) it
        # would overflow the scheduler's int64 arrays, and stop placement for every job.
        number = isinstance(memory, int | float) and not isinstance(memory, bool)
        readable = number and 0 <= memory <= GPU_MEMORY_MIB_MAX
        gpus.append((str(gpu.get("model", "")), int(memory) if readable else 0))
    return gpus


def _gpu_count(declared: float, cap: int) -> int:
    """Ray's GPU total for a node, within 0..``cap`` (anything unreadable counts as none)."""
    try:
        value = float(declared)
    except (TypeError, ValueError):
        return 0
    return int(min(value, cap)) if value >= 0 else 0  # NaN compares False: none


def _one_node_per_name(
    ray_nodes: Iterable[RayNodeInfo], volunteers: Mapping[str, Mapping[str, Any]], allow_bare: bool
) -> dict[str, RayNodeInfo]:
    """Live non-head nodes by name, unlabelled ones only if ``allow_bare``. Two alive under one
    name happen when a raylet restarted before GCS marked its predecessor dead, two bare workers
    share a host, or a volunteer labels its node with another's name: the one the VolunteerNode
    names (``status.rayNodeId``) wins, then one at its ``status.address``, then a labelled one,
    else the first listed."""
    chosen: dict[str, RayNodeInfo] = {}
    bare_seen: set[str] = set()
    for node in ray_nodes:
        if node.is_head or not node.alive:
            continue
        if NODE_NAME_LABEL not in node.labels and not allow_bare:
            bare_seen.add(node.node_id)
            _report_bare(node)
            continue
        name = node_name(node)
        earlier = chosen.get(name)
        if earlier is None:
            chosen[name] = node  # ranked only against another of its name: most names have one node
            continue
        if _rank(node, name, volunteers) > _rank(earlier, name, volunteers):
            chosen[name] = node
        logger.info("two live Ray nodes named %s (%s, %s): using %s", name, earlier.node_id, node.node_id,
                    chosen[name].node_id)  # fmt: skip
    for gone in _reported_bare - bare_seen:  # only what Ray lists now: a churning raylet must not grow it
        _reported_bare.discard(gone)
    return chosen


def _rank(node: RayNodeInfo, name: str, volunteers: Mapping[str, Mapping[str, Any]]) -> tuple[bool, bool, bool]:
    """Which of two live Ray nodes named `name` counts (_one_node_per_name): the greater."""
    labelled = NODE_NAME_LABEL in node.labels
    status = ((volunteers.get(name) or {}).get("status") or {}) if labelled else {}
    return (
        labelled and node.node_id == status.get("rayNodeId"),
        labelled and node.address == status.get("address"),
        labelled,
    )


# Unlabelled Ray nodes already logged as taking no work (by Ray node id).
_reported_bare: set[str] = set()


def _report_bare(node: RayNodeInfo) -> None:
    if node.node_id not in _reported_bare:
        _reported_bare.add(node.node_id)
        logger.warning(
            "Ray node %s at %s has no %s label: takes no work (a bare Ray worker; "
            "KOINON_ALLOW_BARE_RAY_WORKERS=true lets such nodes take AIJobs, for development only)",
            node.node_id, node.address, NODE_NAME_LABEL,
        )  # fmt: skip


# What was last logged per node name, so that every pending job's pass does not log it again.
_reported_unreadable: dict[str, str] = {}
_reported_unproven: dict[str, str] = {}


def _report_unreadable(name: str, reason: str) -> None:
    _report(_reported_unreadable, name, reason, "status readable again")


def _report_unproven(name: str, reason: str) -> None:
    _report(_reported_unproven, name, reason, "its Ray node is the one its status names again")


def _report(reported: dict[str, str], name: str, reason: str, cleared: str) -> None:
    if reported.get(name, "") == reason:
        return
    if reason:
        logger.warning("VolunteerNode %s takes no new work: %s", name, reason)
        reported[name] = reason
    else:
        logger.info("VolunteerNode %s: %s", name, cleared)
        del reported[name]


def unreadable_status(status: Mapping[str, Any]) -> str:
    """Why placement cannot use this VolunteerNode status ("" when it can). The CRD's schema
    rejects these values; a status written before it did, or by hand, could still hold them."""
    latency = status.get("latency") or {}
    if not isinstance(latency, Mapping):
        return f"status.latency must be an object, got {latency!r}"
    smoothed = latency.get("smoothedMs")
    if smoothed is not None and (
        isinstance(smoothed, bool) or not isinstance(smoothed, int | float) or not 0 <= smoothed < math.inf
    ):
        return f"status.latency.smoothedMs must be a number >= 0, got {smoothed!r}"
    try:
        _epoch(latency.get("updatedAt"))
        reputation = status.get("reputation") or {}
        if not isinstance(reputation, Mapping):
            return f"status.reputation must be an object, got {reputation!r}"
        from_status(reputation)
        lower_bound = reputation.get("lowerBound", 0.5)
        if isinstance(lower_bound, bool) or not isinstance(lower_bound, int | float) or not 0 <= lower_bound <= 1:
            return f"status.reputation.lowerBound must be a number within 0..1, got {lower_bound!r}"
    except ValueError as exc:
        return str(exc)
    return ""


def _epoch(value: object) -> float | None:
    moment = parse_time(value)
    return moment.timestamp() if moment else None


class RayNodeCache:
    """Ray's node list, fetched at most once per ``max_age_seconds`` (admission of hundreds of jobs
    at once must not turn into hundreds of dashboard calls). Callers that find it stale at the same
    moment (kopf's timers of many jobs fire together) share one fetch."""

    def __init__(self, ray: RayJobsClient, max_age_seconds: float = 1.0) -> None:
        self._ray = ray
        self._max_age = max_age_seconds
        self._fetched_at = float("-inf")
        """When the list in hand was asked for (monotonic)."""
        self._fresh_after = float("-inf")
        """invalidate(): a list asked for before this moment will not do."""
        self._nodes: Sequence[RayNodeInfo] = ()
        self._fetching = asyncio.Lock()

    def _stale(self) -> bool:
        return self._fetched_at < self._fresh_after or time.monotonic() - self._fetched_at > self._max_age

    async def get(self) -> Sequence[RayNodeInfo]:
        if self._stale():
            async with self._fetching:
                if self._stale():  # else another caller fetched it while this one waited
                    asked_at = time.monotonic()
                    self._nodes = await self._ray.nodes()
                    self._fetched_at = asked_at
        return self._nodes

    def invalidate(self) -> None:
        """The next get() returns a list asked for after this call."""
        self._fresh_after = time.monotonic()
