"""Columnar view of the node snapshots for one scheduling call.

Built once per call (O(nodes)); every job then filters and scores the whole fleet with a few numpy
operations instead of a Python loop over 10,000 nodes. Arrays that many jobs share (the room left
for a job size, a policy's values, a shape's ranking) are derived once per call and then kept
current by recomputing only the positions that placements changed since (`NodeIndex.derived`).
Nodes are ordered by name, so the result does not depend on the order the snapshots came in.
Capacity columns are copies that the call consumes as it places jobs; the snapshots themselves are
never changed."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

from .config import SchedulerConfig
from .reputation import COUNT_FIELDS
from .speed import slowest_per_node
from .types import JobRequest, NodeSnapshot

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
T = TypeVar("T")
Positions: TypeAlias = slice | IntArray
"""Which nodes a derived column is computed for: all (`slice(None)`) or the given positions."""


@dataclass(slots=True)
class NodeIndex:
    names: list[str]
    position: dict[str, int]
    owner_code: IntArray
    owner_position: dict[str, int]
    region_position: dict[str, int]
    region_code: IntArray
    usable: BoolArray
    ready: BoolArray
    cordoned: BoolArray
    total_gpus: IntArray
    busy_gpus: IntArray
    """GPUs in use (snapshot's plus this call's placements)."""
    cpus_free: FloatArray
    cpus_total: FloatArray
    """All the node's CPUs, idle or not; +inf when unknown."""
    gpu_node: IntArray
    """One entry per GPU of the fleet: the position of its node (with `gpu_memory`)."""
    gpu_memory: IntArray
    rtt_ms: FloatArray
    """Smoothed RTT, NaN when unknown or stale."""
    lower_bound: FloatArray
    """Owner-adjusted Wilson lower bound of the reputation."""
    mean_score: FloatArray
    consecutive_valid: IntArray
    owner_disagreements: FloatArray
    inverse_speed: FloatArray
    """Hours on the node per hour on the reference GPU (1 / the relative speed of its slowest GPU,
    RTX 4090 = 1.0; `speed.py`)."""
    crash_rate_per_speed2: FloatArray
    """Gamma-Poisson estimate of crashes and losses per hour of work (the node's reliability) /
    speed^2: the node's factor of the expected crash loss of a job."""
    trusted: BoolArray
    """May skip replication: BOINC trust counter reached and the owner has no disagreements."""
    static_score: FloatArray
    score: FloatArray
    """Koinon score including the load term; updated as the call places jobs."""
    reserved: BoolArray
    """Nodes held (for the rest of the call) for an earlier job that did not fit yet: later jobs
    may not start on them, so a big job's nodes drain instead of being refilled by small ones."""
    load_weight: float
    packing_weight: float
    _fit_cache: dict[int, IntArray]
    _changes: IntArray
    """Positions whose capacity, load score or reservation changed during this call, in order
    (the first `_changed` entries; grown by doubling)."""
    _changed: int
    _derived: dict[Hashable, _Derived]
    _memo: dict[Hashable, Any]
    _owner_order: IntArray | None = None
    """Positions sorted by owner code (built on first use of `owner_nodes`), with `_owner_start`."""
    _owner_start: IntArray | None = None

    @property
    def size(self) -> int:
        return len(self.names)

    def fit_count(self, memory_mib: int) -> IntArray:
        """Per node: how many of its GPUs have at least `memory_mib` MiB."""
        cached = self._fit_cache.get(memory_mib)
        if cached is not None:
            return cached
        fitting = self.gpu_memory >= memory_mib
        fit = np.bincount(self.gpu_node, weights=fitting, minlength=self.size).astype(np.int64)
        self._fit_cache[memory_mib] = fit
        return fit

    def available_fitting(self, memory_mib: int) -> IntArray:
        """GPUs with enough memory that are surely free: assumes the busy GPUs are fitting ones, so
        a heterogeneous node is never over-committed."""
        # At least 0: busy GPUs that do not fit leave none, not fewer than none (a CPU-only job
        # asking 0 GPUs was refused as "GPUs in use" when they outnumbered the fitting ones).
        free: IntArray = np.maximum(self.fit_count(memory_mib) - self.busy_gpus, 0)
        return free

    def derived(self, key: Hashable, compute: Callable[[Positions], npt.NDArray[Any]]) -> npt.NDArray[Any]:
        """``compute(positions)`` over the whole fleet, cached under ``key`` for this call.

        ``compute`` gets ``slice(None)`` the first time, later an array of the positions changed
        since (by `consume` or `reserve_for`), and must return a new array computed elementwise
        from the index's columns. Recomputing those positions with the same elementwise operations
        gives bit-identical values, so a cached array equals a fresh one; the caller must not
        change the returned array.
        """
        entry = self._derived.get(key)
        if entry is None:
            entry = self._derived[key] = _Derived(compute(slice(None)), self._changed)
        elif entry.synced < self._changed:
            changed = self._changes[entry.synced : self._changed]
            entry.values[changed] = compute(changed)
            entry.synced = self._changed
        return entry.values

    def memo(self, key: Hashable, make: Callable[[], T]) -> T:
        """``make()``, cached under ``key`` for this call: for what placements do not change (arrays
        of fixed terms, functions built per job shape); the caller must not change it."""
        try:
            value: T = self._memo[key]
        except KeyError:
            value = self._memo[key] = make()
        return value

    def log_changes(self, positions: IntArray | list[int]) -> None:
        """Records positions whose capacity, load score or reservation just changed."""
        end = self._changed + len(positions)
        if end > len(self._changes):
            grown = np.empty(max(2 * len(self._changes), end), dtype=np.int64)
            grown[: self._changed] = self._changes[: self._changed]
            self._changes = grown
        self._changes[self._changed : end] = positions
        self._changed = end

    def consume(self, positions: list[int], gpus: int, cpus: float) -> None:
        """Each of `positions` starts a replica that takes `gpus` GPUs and `cpus` CPUs."""
        self.log_changes(positions)
        for i in positions:
            self.busy_gpus[i] += gpus
            self.cpus_free[i] -= cpus
            busy = self.busy_gpus[i] / max(int(self.total_gpus[i]), 1)
            self.score[i] = self.static_score[i] - self.load_weight * busy

    def owner_nodes(self, code: int) -> IntArray:
        """Positions of the nodes of the owner with code `code`, in order."""
        order, start = self._owner_order, self._owner_start
        if order is None or start is None:
            order = np.argsort(self.owner_code, kind="stable")
            start = np.searchsorted(self.owner_code[order], np.arange(len(self.owner_position) + 1))
            self._owner_order, self._owner_start = order, start
        return order[start[code] : start[code + 1]]

    def excluded_mask(self, job: JobRequest) -> BoolArray | None:
        if not job.excluded_nodes and not job.excluded_owners:
            return None
        mask = np.zeros(self.size, dtype=bool)
        for name in job.excluded_nodes:
            pos = self.position.get(name)
            if pos is not None:
                mask[pos] = True
        for owner in job.excluded_owners:
            code = self.owner_position.get(owner)
            if code is not None:
                mask |= self.owner_code == code
        return mask


@dataclass(slots=True)
class _Derived:
    values: npt.NDArray[Any]
    synced: int
    """How many entries of `NodeIndex._changes` `values` already reflects."""


def _wilson(r: FloatArray, s: FloatArray, a: float, b: float, z: float) -> FloatArray:
    n = r + s + a + b
    p = (r + a) / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * np.sqrt(np.maximum(p * (1 - p) / n + z2 / (4 * n * n), 0.0))
    out: FloatArray = np.clip((centre - spread) / (1 + z2 / n), 0.0, 1.0)
    return out


def _values(items: list[Any], field: str) -> list[Any]:
    return list(map(operator.attrgetter(field), items))


def _column(items: list[Any], field: str, dtype: type[np.generic] = np.float64) -> npt.NDArray[Any]:
    """One attribute of every item as an array. `map(attrgetter)` into `np.fromiter` keeps the loop
    over 10,000 snapshots in C: several times cheaper than a Python loop, and than `np.array` of a
    list. Fields that may be None use `_optional_floats`."""
    return np.fromiter(map(operator.attrgetter(field), items), dtype, len(items))


def _optional_floats(items: list[Any], field: str) -> FloatArray:
    """A float attribute that may be None, as an array with NaN for None. Usually none is None (every
    connected node has heartbeats), so `np.fromiter` first; it refuses None, `np.array` does not."""
    try:
        return np.fromiter(map(operator.attrgetter(field), items), np.float64, len(items))
    except TypeError:
        return np.array(_values(items, field), dtype=np.float64)


def _codes(values: list[str]) -> tuple[IntArray, dict[str, int]]:
    """Small integer codes for strings, numbered in order of first appearance."""
    code = {value: i for i, value in enumerate(dict.fromkeys(values))}
    return np.fromiter(map(code.__getitem__, values), np.int64, len(values)), code


def build_index(nodes: Sequence[NodeSnapshot], now: float, cfg: SchedulerConfig) -> NodeIndex:
    ordered = sorted(nodes, key=operator.attrgetter("name"))
    names = _values(ordered, "name")
    position = dict(zip(names, range(len(names)), strict=True))
    if len(position) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
        raise ValueError(f"node snapshots must have unique names; {dup!r} appears twice")
    count = len(ordered)
    owner_code, owner_position = _codes(_values(ordered, "owner"))
    region_code, region_position = _codes(_values(ordered, "region"))
    sc = cfg.scoring
    stale = cfg.latency.stale_after_s

    # Every GPU of the fleet, in node order: its node's position, memory and model.
    gpu_lists = _values(ordered, "gpus")
    total = np.fromiter(map(len, gpu_lists), np.int64, count)
    gpus = list(itertools.chain.from_iterable(gpu_lists))
    gpu_node = np.repeat(np.arange(count, dtype=np.int64), total)
    gpu_memory = _column(gpus, "memory_mib", np.int64)
    node_speed = slowest_per_node(_values(gpus, "model"), total, sc.gpu_speeds, sc.unknown_gpu_speed)

    ready = _column(ordered, "ready", np.bool_)
    cordoned = _column(ordered, "cordoned", np.bool_)
    busy_gpus = total - _column(ordered, "free_gpus", np.int64)
    cpus = _column(ordered, "cpus_free")
    cpus_total = np.nan_to_num(_optional_floats(ordered, "cpus_total"), nan=np.inf)
    # Unknown (None, so NaN) or older than `stale`: NaN (comparisons with NaN are False).
    rtt = np.where(
        now - _optional_floats(ordered, "rtt_updated_at") <= stale, _optional_floats(ordered, "rtt_ms"), np.nan
    )
    evidence = _values(ordered, "reputation")

    rc = cfg.reputation
    decay = np.power(0.5, np.maximum(now - _column(evidence, "last_updated"), 0.0) / rc.half_life_s)
    counts = {field: _column(evidence, field).__imul__(decay) for field in COUNT_FIELDS}
    succ, fail, tout = counts["successes"], counts["failures"], counts["timeouts"]
    agree, dis = counts["agreements"], counts["disagreements"]
    hb_seen, hb_missed = counts["heartbeats_seen"], counts["heartbeats_missed"]
    owner_dis: FloatArray = np.bincount(owner_code, weights=dis, minlength=len(owner_position))[owner_code].astype(
        np.float64
    )
    extra = np.maximum(owner_dis - dis, 0.0) * rc.owner_disagreement_pooling
    r = rc.success_weight * succ + rc.agreement_weight * agree
    s = rc.failure_weight * fail + rc.timeout_weight * tout + rc.disagreement_weight * (dis + extra)
    lower = _wilson(r, s, rc.prior_alpha, rc.prior_beta, rc.confidence_z)
    mean = (r + rc.prior_alpha) / (r + s + rc.prior_alpha + rc.prior_beta)
    up = (hb_seen + 1.0) / (hb_seen + hb_missed + 2.0)
    crash_rate = (fail + tout + sc.crash_prior_count) / (counts["exposure_hours"] + sc.crash_prior_hours)
    vc = cfg.verification
    consecutive = _column(evidence, "consecutive_valid", np.int64)
    trusted = (consecutive >= vc.trust_after_valid) & (owner_dis <= vc.owner_disagreement_tolerance)

    # Floored so a zero in a hand-written speed table cannot divide by zero.
    speed = np.maximum(node_speed, 1e-3)
    rtt_for_score = np.where(np.isnan(rtt), sc.unknown_latency_ms, rtt)
    static = sc.reputation_weight * lower - sc.latency_weight * rtt_for_score / sc.latency_scale_ms
    static = static + sc.uptime_weight * up
    busy = busy_gpus / np.maximum(total, 1)
    score = static - sc.load_weight * busy

    return NodeIndex(
        names=names,
        position=position,
        owner_code=owner_code,
        owner_position=owner_position,
        region_position=region_position,
        region_code=region_code,
        usable=ready & ~cordoned,
        ready=ready,
        cordoned=cordoned,
        total_gpus=total,
        busy_gpus=busy_gpus,
        cpus_free=cpus,
        cpus_total=cpus_total,
        gpu_node=gpu_node,
        gpu_memory=gpu_memory,
        rtt_ms=rtt,
        lower_bound=lower,
        mean_score=mean,
        consecutive_valid=consecutive,
        owner_disagreements=owner_dis,
        inverse_speed=1.0 / speed,
        crash_rate_per_speed2=crash_rate / (speed * speed),
        trusted=trusted,
        static_score=static,
        score=score,
        reserved=np.zeros(count, dtype=bool),
        load_weight=sc.load_weight,
        packing_weight=sc.packing_weight,
        _fit_cache={},
        _changes=np.empty(64, dtype=np.int64),
        _changed=0,
        _derived={},
        _memo={},
    )


def static_mask(index: NodeIndex, job: JobRequest, quarantine_below: float | None) -> BoolArray:
    """Filters that do not change while the call places jobs."""
    mask = index.usable & (index.fit_count(job.gpu_memory_mib) >= job.gpus_per_replica)
    if quarantine_below is not None:
        mask &= index.mean_score >= quarantine_below
    if job.min_reputation > 0:
        mask &= index.lower_bound >= job.min_reputation
    if job.max_latency_ms is not None:
        mask &= index.rtt_ms <= job.max_latency_ms  # NaN (unknown) compares False
    if job.regions:
        mask &= region_mask(index, job)
    return mask


def region_mask(index: NodeIndex, job: JobRequest) -> BoolArray:
    wanted = np.zeros(len(index.region_position), dtype=bool)
    wanted[[index.region_position[r] for r in job.regions if r in index.region_position]] = True
    out: BoolArray = wanted[index.region_code]
    return out


def room_for(index: NodeIndex, job: JobRequest, at: Positions) -> BoolArray:
    """At the positions `at`: has the GPUs and CPUs the job needs left in this call and is not held
    for another job (static filters and exclusions not applied)."""
    available = np.maximum(np.subtract(index.fit_count(job.gpu_memory_mib)[at], index.busy_gpus[at]), 0)
    fits: BoolArray = np.greater_equal(available, job.gpus_per_replica)
    if job.cpus_per_replica > 0:
        fits &= index.cpus_free[at] >= job.cpus_per_replica
    # fits and not reserved, in place (for booleans, a & ~b == a > b).
    return np.greater(fits, index.reserved[at], out=fits)


def room_key(job: JobRequest) -> tuple[Hashable, ...]:
    """Names `room_for` of jobs of this size in `NodeIndex.derived`."""
    return ("room", job.gpu_memory_mib, job.gpus_per_replica, job.cpus_per_replica)


def current_room(index: NodeIndex, job: JobRequest) -> BoolArray:
    """`room_for` over the whole fleet, kept current for this call (do not change it)."""
    return index.derived(room_key(job), lambda at: room_for(index, job, at))


def dynamic_mask(index: NodeIndex, job: JobRequest, static: BoolArray) -> BoolArray:
    """Static filters plus capacity left in this call and the job's exclusions (a new array the
    caller may change)."""
    mask: BoolArray = static & current_room(index, job)
    excluded = index.excluded_mask(job)
    if excluded is not None:
        mask &= ~excluded
    return mask


def reserve_for(index: NodeIndex, job: JobRequest, static: BoolArray, nodes_needed: int) -> None:
    """Hold the `nodes_needed` nodes that are closest to fitting `job` (most fitting GPUs free) and
    could hold it once drained, so later (smaller or younger) jobs do not keep them partly busy.

    One node per owner, as the job's copies and replicas need distinct owners; and nothing at all
    when fewer owners than the job's replicas have nodes that could ever hold it (CPUs included):
    such a job waits for nodes that are not there, and holding the others would only keep them from
    work they can do. (Its verification copies may be skipped for trusted nodes, so fewer owners
    than `nodes_needed` can still run it.)"""
    candidates = static & ~index.reserved & (index.fit_count(job.gpu_memory_mib) >= job.gpus_per_replica)
    if job.cpus_per_replica > 0:
        candidates &= index.cpus_total >= job.cpus_per_replica
    excluded = index.excluded_mask(job)
    if excluded is not None:
        candidates &= ~excluded
    positions = np.flatnonzero(candidates)
    free = index.available_fitting(job.gpu_memory_mib)[positions]
    by_room = positions[np.argsort(-free, kind="stable")]
    # The first (roomiest) node of each owner, kept in that order.
    _, first = np.unique(index.owner_code[by_room], return_index=True)
    if len(first) < job.replicas:
        return
    held = by_room[np.sort(first)[:nodes_needed]]
    index.reserved[held] = True
    index.log_changes(held)


def explain(index: NodeIndex, job: JobRequest, copies: int, quarantine_below: float | None) -> dict[str, int]:
    """Each node counted once, under the first filter it fails (Kubernetes style); nodes that pass
    every filter are counted under a reason saying distinct owners ran short (for `copies` copies
    of the job's replicas)."""
    remaining = np.ones(index.size, dtype=bool)
    reasons: dict[str, int] = {}

    def take(label: str, fails: BoolArray) -> None:
        nonlocal remaining
        hit = remaining & fails
        n = int(hit.sum())
        if n:
            reasons[label] = reasons.get(label, 0) + n
        remaining = remaining & ~fails

    take("not ready", ~index.ready)
    take("cordoned", index.cordoned)
    excluded = index.excluded_mask(job)
    if excluded is not None:
        take("excluded (after an earlier attempt, or owner already holds a copy)", excluded)
    if quarantine_below is not None:
        take(f"quarantined (reputation score below {quarantine_below:g})", index.mean_score < quarantine_below)
    take(f"too few GPUs (need {job.gpus_per_replica})", index.total_gpus < job.gpus_per_replica)
    take(
        f"too few GPUs with {job.gpu_memory_mib} MiB",
        index.fit_count(job.gpu_memory_mib) < job.gpus_per_replica,
    )
    if job.min_reputation > 0:
        take(f"reputation below {job.min_reputation:g}", index.lower_bound < job.min_reputation)
    if job.max_latency_ms is not None:
        take("latency unknown", np.isnan(index.rtt_ms))
        take(f"latency above {job.max_latency_ms:g} ms", index.rtt_ms > job.max_latency_ms)
    if job.regions:
        take(region_reason(job.regions), ~region_mask(index, job))
    take("GPUs in use", index.available_fitting(job.gpu_memory_mib) < job.gpus_per_replica)
    take("held for an earlier job that is waiting for room", index.reserved)
    if job.cpus_per_replica > 0:
        take(f"too few free CPUs (need {job.cpus_per_replica:g})", index.cpus_free < job.cpus_per_replica)
    left = int(remaining.sum())
    if left:
        owners = len(set(index.owner_code[remaining].tolist()))
        reasons[f"fit, but only {owners} distinct owners for {_owners_needed(job.replicas, copies)}"] = left
    return reasons


# A reason is a key of status.scheduling.reasons and a part of the job's message, Event and
# condition: one built from the job's regions is cut to about this many characters, so that the
# status does not grow with the spec (a long list made every status write of the job fail).
MAX_REGIONS_REASON = 160
REGIONS_SHOWN = 3
REGION_SHOWN_CHARS = 32


def region_reason(regions: Iterable[str]) -> str:
    """`region not in [...]`, naming the job's regions while they are few and short; otherwise
    how many, and the first few (sorted, each cut)."""
    names = sorted(regions)
    whole = f"region not in {names}"
    if len(whole) <= MAX_REGIONS_REASON:
        return whole
    shown = [
        name if len(name) <= REGION_SHOWN_CHARS else f"{name[: REGION_SHOWN_CHARS - 3]}..."
        for name in names[:REGIONS_SHOWN]
    ]
    more = len(names) - len(shown)
    return f"region not in the {len(names)} listed {shown}" + (f" and {more} more" if more else "")


def _owners_needed(replicas: int, copies: int) -> str:
    """What needs distinct owners, in the user's words: replicas, verification copies, or both."""
    if copies == 1:
        return f"{replicas} replicas"
    if replicas == 1:
        return f"{copies} verification copies"
    return f"{copies * replicas} nodes ({copies} verification copies of {replicas} replicas)"


def reasons_message(reasons: dict[str, int], total: int) -> str:
    parts = ", ".join(f"{n} {label}" for label, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"0/{total} nodes are available: {parts}" if parts else f"0/{total} nodes are available"
