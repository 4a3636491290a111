"""Which Connect streams a node holds, and which of them count against its cap.

Every stream is known from the moment it is accepted, so that revoking a node ends all of them,
including one that has not sent its first frame yet (it would otherwise dial afterwards in the name
of a node that no longer exists). Two kinds count against ``max_streams_per_node``, each on its own:

* streams still waiting for their first frame: without a cap, one credential could hold any
  number of silent streams (each for the first-frame timeout) and keep opening more;
* streams that dial: the connections a node makes.

A stream that accepts a connection counts against neither once it has claimed it: it answers
another node's dial, which that side paid for, or the head's, which counts against
max_head_connections_per_node of the node it reaches (head_proxy.py). Were it charged to the
acceptor, one volunteer could spend its own allowance dialling another and leave that one unable to
reach the head. Until its claim succeeds it is opening like any other: an Accept that claims
nothing (an unknown id, one claimed already, another node's) is refused while still counted, or a
node could hold any number of uncounted streams by naming ids that do not exist.

A stream is held from its handler's start to its end, or past that while grpc still holds its call
(a write its node does not read, whose writer was cancelled: grpc sends no status before it is
done): such a slot is released only once grpc ends the call (``StreamSlot.held``), and an accepted
stream counts as opening again all that time, its connection being over.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any


class TooManyStreams(Exception):
    """A node asked for more concurrent Connect streams than max_streams_per_node."""


class StreamSlot:
    """One stream of one node, from acceptance to its end; its first frame says what it counts as."""

    def __init__(self, slots: StreamSlots, node_name: str, task: asyncio.Task[Any]) -> None:
        self._slots = slots
        self._node_name = node_name
        self._task = task  # its handler's: the key it is known by, even once that task has ended
        self._counted = True
        self.is_held = False

    def dialing(self) -> None:
        """The stream dials: it now counts among the node's connections (TooManyStreams if full)."""
        self._slots._move(self._node_name, self._task, "opening", "dialing")

    def accepting(self) -> None:
        """The stream has claimed a pending connection, which its originator paid for (one
        stream per connection: a claim is made once)."""
        self._slots._move(self._node_name, self._task, "opening", None)
        self._counted = False

    def held(self) -> None:
        """Its handler ends, but grpc goes on holding the call: the slot outlives the block, until
        ``release``. An accepted stream, its connection over, counts as opening again, past the cap
        if need be (it cannot be refused any more), so that its node's new streams are refused
        while it holds its cap of them; one that counts already goes on counting as it did."""
        if not self._counted:
            self._slots._counted.setdefault((self._node_name, "opening"), set()).add(self._task)
            self._counted = True
        self.is_held = True

    def release(self) -> None:
        """The stream is over: no longer one of its node's, nor counted (once; again is a no-op)."""
        self._slots._release(self._node_name, self._task)


class StreamSlots:
    def __init__(self, max_per_node: int) -> None:
        self.max_per_node = max_per_node
        self._all: dict[str, set[asyncio.Task[Any]]] = {}
        self._counted: dict[tuple[str, str], set[asyncio.Task[Any]]] = {}

    @contextlib.contextmanager
    def slot(self, node_name: str) -> Iterator[StreamSlot]:
        """Holds the current task as one of ``node_name``'s streams while the block runs (or until
        ``release`` if the slot is ``held`` when it ends), counted as opening until the slot says
        otherwise; TooManyStreams when too many are opening."""
        task = asyncio.current_task()
        assert task is not None
        self._add(node_name, task, "opening")
        self._all.setdefault(node_name, set()).add(task)
        slot = StreamSlot(self, node_name, task)
        try:
            yield slot
        finally:
            if not slot.is_held:
                slot.release()

    def tasks(self, node_name: str) -> list[asyncio.Task[Any]]:
        return list(self._all.get(node_name, ()))

    def open(self, node_name: str) -> int:
        return len(self._all.get(node_name, ()))

    def counted(self, node_name: str, kind: str) -> int:
        return len(self._counted.get((node_name, kind), ()))

    def _add(self, node_name: str, task: asyncio.Task[Any], kind: str) -> None:
        held = self._counted.setdefault((node_name, kind), set())
        if len(held) >= self.max_per_node:
            raise TooManyStreams(f"node {node_name}: {len(held)} connections {kind} already")
        held.add(task)

    def _release(self, node_name: str, task: asyncio.Task[Any]) -> None:
        streams = self._all.get(node_name)
        if streams is not None:
            streams.discard(task)
            if not streams:
                del self._all[node_name]
        for kind in ("opening", "dialing"):
            self._discard(node_name, task, kind)

    def _discard(self, node_name: str, task: asyncio.Task[Any], kind: str) -> None:
        held = self._counted.get((node_name, kind))
        if held is not None:
            held.discard(task)
            if not held:
                del self._counted[(node_name, kind)]

    def _move(self, node_name: str, task: asyncio.Task[Any], source: str, target: str | None) -> None:
        self._discard(node_name, task, source)
        if target is not None:
            self._add(node_name, task, target)
