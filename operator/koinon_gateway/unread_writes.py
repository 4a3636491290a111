"""The gateway's writes to one node's Connect streams that the node has not read yet, in bytes.

A write to a stream whose node does not read waits inside grpc with its message (a copy of it and
the bytes it was made from, ~3.6 MiB for a 1 MiB message as measured), and grpc.aio has no way for
a server to take it back: a writer that gives up (the connection ended, the node that sent the data
stalled past its share) leaves it there until the node reads it or resets the stream, and the call
lives on with it. Without a budget the messages of every connection a node accepted could wait so:
each connection a second node of its volunteer dialled to it, for one.

``UnreadWrites`` counts the payload bytes of those writes per node, from the moment one starts to
when it completes, or, for one given up, to when grpc ends its call. A write that does not fit waits
for room before it reaches grpc, so the node's writes cannot hold more than ``limit_bytes`` (one
message at least, whatever its size, so a node that reads always gets its data). What waits then
is its writer: the head's side reads no more (tcp_pipe's budget), a peer node's stream stalls and
is ended past that node's share (send_stalls.py) before it could leave a write in grpc.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib


class UnreadWrites:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.held_bytes = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def take(self, nbytes: int) -> bool:
        """Counts a write of ``nbytes`` if it fits now; False if it must wait (wait_to_take)."""
        if self.held_bytes and self.held_bytes + nbytes > self.limit_bytes:
            return False
        self.held_bytes += nbytes
        return True

    async def wait_to_take(self, nbytes: int) -> None:
        """Waits until a write of ``nbytes`` fits, then counts it. Every waiter tries again when bytes
        are given back (in no set order: they only wait while the node does not read)."""
        loop = asyncio.get_running_loop()
        while not self.take(nbytes):
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):  # give_back took it off the line already
                    self._waiters.remove(waiter)

    def give_back(self, nbytes: int) -> None:
        self.held_bytes -= nbytes
        if not self._waiters:  # the usual case, on every write: nothing to wake
            return
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
