"""How many of one node's connections may hold data it sent that their other end does not take.

The gateway reads a node's Connect stream only as fast as the other end (the head's socket, a
peer node's stream) takes what it forwards. While that write waits, grpc goes on accepting the
node's data into the stream's receive window (tunnel_io.RECEIVE_WINDOW_BYTES, fixed), so a stalled
direction holds up to ``config.FROM_NODE_BYTES_PER_STREAM``. grpc has no budget across streams and
the gateway cannot shrink a window, so a node whose connections all stalled (a second node of its
volunteer that never reads, a head process it flooded until it stopped reading) made the gateway
hold that on every stream: 2.6 GiB with the default limits, a direction. Ending a stream is what
makes grpc let go of it.

A forwarding direction is *stalled* once its write to the other end has waited ``STALL_AFTER_S``.
A node may have ``max_stalled`` of them at once (``GatewayConfig.max_stalled_bytes_per_node`` over
the bytes one holds); a sweep every ``SWEEP_INTERVAL_S`` ends the connections of the ones past it,
the one that has waited longest first: a connection whose writes complete, however slowly, starts
waiting anew after each, so one that never moves again goes before it. A bulk transfer to a peer
that reads a few MiB/s never stalls; one to a slower reader holds a full window as a stuck one does
and may count as one (grpc refreshes a stream's window by halves, and streams share their
connection's: a 2.5 MiB/s reader of three streams saw a write wait past 0.5 s).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .by_node import ByNode

# A write to the other end that has waited this long is a stall: long enough that the event loop's
# turns, a busy peer's pauses and a slow reader (a home downlink) do not count, short enough that a
# flood gets little past the budget before the sweep sees it: what reaches the gateway meanwhile,
# ~1 s of a volunteer's uplink (~120 MB at 1 Gbit/s).
STALL_AFTER_S = 1.0
SWEEP_INTERVAL_S = 0.05


class StallWatch:
    """One forwarding direction of one connection: the data a node sends, on its way to the other end.

    ``waiting()`` before the write to the other end, ``done()`` after it; ``close()`` when the
    direction ends (the splice does, as it ends). ``trip()`` (the sweep's) cancels ``task``, the
    coroutine forwarding, and marks the watch ``tripped`` so that the splice ends the connection
    saying why.
    """

    __slots__ = ("_stalls", "task", "tripped")

    def __init__(self, stalls: SendStalls) -> None:
        self._stalls = stalls
        self.task: asyncio.Future[Any] | None = None
        self.tripped = False

    def waiting(self) -> None:
        self._stalls._waiting[self] = time.monotonic()

    def done(self) -> None:
        self._stalls._waiting.pop(self, None)

    def close(self) -> None:
        self.done()
        # The forwarding coroutine's frame holds this watch: a task kept here, once it is done,
        # made a cycle (task, its CancelledError, the traceback, that frame) that held the ~1 MiB
        # message in its frame until a full garbage collection; a flood left one per stall.
        self.task = None

    def trip(self) -> None:
        self.tripped = True
        task, self.task = self.task, None  # as in close()
        if task is not None:
            task.cancel()


class SendStalls:
    """One node's forwarding directions whose write to the other end waits, since when (oldest first:
    a direction leaves the table when its write completes and comes back at its next one)."""

    def __init__(self, max_stalled: int) -> None:
        self.max_stalled = max_stalled
        self._waiting: dict[StallWatch, float] = {}
        self.ended = 0  # connections ended for stalling past max_stalled

    def watch(self) -> StallWatch:
        return StallWatch(self)

    def stalled(self, now: float) -> int:
        return sum(1 for since in self._waiting.values() if now - since >= STALL_AFTER_S)

    def sweep(self, now: float) -> int:
        """Trips the directions stalled past ``max_stalled``, the longest waiting first; how many."""
        if len(self._waiting) <= self.max_stalled:
            return 0
        stalled = [watch for watch, since in self._waiting.items() if now - since >= STALL_AFTER_S]
        excess = stalled[: max(0, len(stalled) - self.max_stalled)]
        for watch in excess:
            del self._waiting[watch]
            watch.trip()
        self.ended += len(excess)
        return len(excess)


class StallSweeper:
    """The nodes' SendStalls, by node name (by_node.py), swept together."""

    def __init__(self, max_stalled: int) -> None:
        self._by_node = ByNode(lambda: SendStalls(max_stalled))
        self.of = self._by_node.of

    def sweep(self, now: float | None = None) -> dict[str, int]:
        """Sweeps every node's stalls; the nodes that had connections ended, and how many."""
        now = time.monotonic() if now is None else now
        ended: dict[str, int] = {}
        for name, stalls in self._by_node.items():
            count = stalls.sweep(now)
            if count:
                ended[name] = count
        return ended
