"""The nodes one job may still get in a scheduling call, and picking among them with distinct owners.

A policy either ranks nodes by a value (`HighestValue`: Koinon, least latency, reputation only) or
chooses by any other rule from a mask (`Chooser`: random, round robin). Both kinds pick the same
way: one node at a time, each of an owner not picked yet (nor holding one of the nodes in `after`).

`RankedCandidates` serves the ranking policies without building a mask per pick: the job's values
with every node that does not fit already left out are one array per job shape, cached and kept
current by `NodeIndex.derived`, so a pick is one argmax over the fleet. It gives the same node as
an argmax over the allowed values alone: the first node (by name) with the highest value.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .index import BoolArray, FloatArray, NodeIndex, Positions, current_room, dynamic_mask, room_for, room_key
from .types import JobRequest

Chooser = Callable[[NodeIndex, BoolArray, JobRequest], int]
"""Position of the chosen node among those `mask` allows, or -1 when none is allowed."""

NodeValues = Callable[[Positions], FloatArray]
"""A job's value of each node at the given positions (finite; computed elementwise from the index)."""


@dataclass(frozen=True, slots=True)
class HighestValue:
    """A policy that picks the node with the highest value (ties: the first by name).

    `key(job)` names the job's values within one call: jobs with equal keys must have equal
    values. `values(index, job)` builds the function computing them (once per key and call).
    """

    key: Callable[[JobRequest], Hashable]
    values: Callable[[NodeIndex, JobRequest], NodeValues]


Policy = Chooser | HighestValue


class Candidates(Protocol):
    def pick(self, count: int, *, trusted_only: bool = False, after: Sequence[int] = ()) -> list[int] | None:
        """`count` nodes of pairwise distinct owners that also differ from the owners of the
        nodes in `after`; None when there are not enough. Changes nothing."""
        ...

    def count(self) -> int:
        """How many nodes the job may get."""
        ...


def candidates(index: NodeIndex, job: JobRequest, static: BoolArray, policy: Policy) -> Candidates:
    if isinstance(policy, HighestValue):
        return RankedCandidates(index, job, static, policy)
    return MaskCandidates(index, job, static, policy)


# The value of a node a job may not get. Values are finite and far above it, so the first maximum
# is the one over allowed values alone.
_LEFT_OUT = -1e300
_NONE_LEFT = _LEFT_OUT / 2


def _left_out_unless(allowed: BoolArray, values: FloatArray) -> FloatArray:
    out: FloatArray = np.where(allowed, values, _LEFT_OUT)
    return out


class MaskCandidates:
    """Candidates as a boolean mask for a `Chooser`."""

    def __init__(self, index: NodeIndex, job: JobRequest, static: BoolArray, choose: Chooser) -> None:
        self.index, self.job, self.choose = index, job, choose
        self.mask = dynamic_mask(index, job, static)

    def count(self) -> int:
        return int(self.mask.sum())

    def pick(self, count: int, *, trusted_only: bool = False, after: Sequence[int] = ()) -> list[int] | None:
        index = self.index
        mask = self.mask & index.trusted if trusted_only else self.mask.copy()
        for i in after:
            mask &= index.owner_code != index.owner_code[i]
        picked: list[int] = []
        for _ in range(count):
            i = self.choose(index, mask, self.job)
            if i < 0:
                return None
            picked.append(i)
            mask &= index.owner_code != index.owner_code[i]
        return picked


class RankedCandidates:
    """Candidates as the job's values with the nodes it may not get left out."""

    def __init__(self, index: NodeIndex, job: JobRequest, static: BoolArray, policy: HighestValue) -> None:
        self.index = index
        values_key = policy.key(job)
        # Jobs of one shape share their values, so they share the function as well.
        node_values = index.memo(("values-function", values_key), lambda: policy.values(index, job))

        def combine(at: Positions) -> FloatArray:
            # Cached and kept current by `derived`, per job shape: the policy's values with the nodes
            # that do not fit left out. A new shape starts from the cached room of its job size and
            # the cached values of its key; updates of a few positions compute both directly
            # (cheaper than keeping those caches current as well).
            if isinstance(at, slice):
                room = current_room(index, job)
                values = index.derived(("values", values_key), node_values)
                return _left_out_unless(static & room, values)
            room = room_for(index, job, at)
            room &= static[at]  # a new array here: change it in place
            return _left_out_unless(room, node_values(at))

        # `static` is cached per shape by the caller, so its identity names the static filters.
        self.key = ("ranked", id(static), room_key(job), values_key)
        self.values: FloatArray = index.derived(self.key, combine)
        self.excluded = index.excluded_mask(job)

    def _trusted_values(self) -> FloatArray:
        values = self.values  # current: synced in __init__, and nothing is placed while a job picks

        def compute(at: Positions) -> FloatArray:
            return _left_out_unless(self.index.trusted[at], values[at])

        return self.index.derived((*self.key, "trusted"), compute)

    def count(self) -> int:
        allowed = self.values > _NONE_LEFT
        if self.excluded is not None:
            allowed &= ~self.excluded
        return int(np.count_nonzero(allowed))

    def pick(self, count: int, *, trusted_only: bool = False, after: Sequence[int] = ()) -> list[int] | None:
        index = self.index
        values = self._trusted_values() if trusted_only else self.values
        work = values
        if self.excluded is not None:
            work = values.copy()
            work[self.excluded] = _LEFT_OUT
        taken = {int(index.owner_code[i]) for i in after}
        blocked: set[int] = set()  # owners whose nodes are already left out of `work`
        picked: list[int] = []
        if work.size == 0:  # no nodes at all
            return None if count > 0 else picked
        while len(picked) < count:
            i = int(work.argmax())
            if work[i] <= _NONE_LEFT:
                return None
            owner = int(index.owner_code[i])
            if owner in taken:
                # Rare: the best node's owner is taken. Leave out every taken owner and look again
                # (each pass blocks at least one more owner, so this ends).
                if work is values:
                    work = values.copy()
                for code in taken - blocked:
                    work[index.owner_nodes(code)] = _LEFT_OUT
                blocked |= taken
                continue
            picked.append(i)
            taken.add(owner)
        return picked
