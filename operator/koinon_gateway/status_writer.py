"""Writes VolunteerNode statuses in the background, one writer task per node.

Status writes go to the Kubernetes API, which can be slow or fail for a while. Done inline, a slow
write held up the Control loop that reads heartbeats (so a healthy node timed out), the liveness
sweep wrote expired nodes one after another (so the last one went NotReady late), two writes of
one node could land out of order (a reconnect overwritten by the old session's NotReady), and a
failed "disconnected" write was never tried again (the node stayed Ready for good).

Here a write is handed over and the caller goes on. Per node, writes land in the order they were
handed over; one not yet sent is merged into by a later one (top-level keys, as the merge patch
itself would), a failed one is tried again with backoff until it lands or the node is gone.

Writes are paced per node, whichever session or event asked for them: at most ``burst`` per
``window_s`` (GatewayConfig.status_write_burst / status_write_window_s). What comes in over that
waits, merged, for the next slot. A node's own messages cause writes (a new session writes Ready at
once, its end NotReady), and a hostile or broken agent that flips its state or reconnects in a loop
must not turn that into API writes at its message or reconnect rate; pacing per session let a
reconnect loop buy two writes per reconnect.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from .registry import NodeRegistry

log = logging.getLogger(__name__)

JSON = dict[str, Any]
MAX_RETRY_DELAY_S = 60.0


class StatusWriter:
    def __init__(self, registry: NodeRegistry, retry_s: float, burst: int, window_s: float) -> None:
        self.registry = registry
        self.retry_s = retry_s
        self.burst = burst
        self.window_s = window_s
        # When each node's latest writes were sent (monotonic), for the pacing.
        self._sent: dict[str, collections.deque[float]] = {}
        self._prune_at = 1024
        # Set when the gateway stops: the last writes (every node's NotReady) go out unpaced, within
        # close()'s flush, rather than wait for slots beyond it and be dropped.
        self._unpaced = asyncio.Event()
        self._pending: dict[str, tuple[JSON, list[Callable[[], None]]]] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}
        # Set when news comes in for a node whose writer is pausing after a failure: try at once.
        self._news: dict[str, asyncio.Event] = {}
        self.failed_writes = 0

    def submit(self, name: str, status: JSON, on_written: Callable[[], None] | None = None) -> None:
        """Queues a merge patch of the node's status; ``on_written`` runs once it has landed."""
        queued, callbacks = self._pending.get(name, ({}, []))
        self._pending[name] = ({**queued, **status}, callbacks + ([on_written] if on_written else []))
        if name not in self._writers:
            self._writers[name] = asyncio.get_running_loop().create_task(self._write_until_done(name))
        elif (news := self._news.get(name)) is not None:
            news.set()
        if len(self._sent) > self._prune_at:
            self._forget_paces_older_than(time.monotonic() - self.window_s)

    def forget(self, name: str) -> None:
        """The node is gone: drop what is queued for it and stop its writer."""
        self._pending.pop(name, None)
        self._sent.pop(name, None)
        writer = self._writers.pop(name, None)
        if writer is not None:
            writer.cancel()

    def busy(self, name: str) -> bool:
        return name in self._writers

    async def wait_written(self, name: str, timeout_s: float) -> bool:
        """Waits until nothing is queued or being written for ``name``; False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                while (writer := self._writers.get(name)) is not None:
                    await asyncio.wait([writer])
        except TimeoutError:
            return False
        return True

    async def flush(self, timeout_s: float) -> bool:
        """Waits until everything queued has landed (or was given up); False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._writers:
                    await asyncio.wait(list(self._writers.values()))
        except TimeoutError:
            return False
        return True

    async def close(self, timeout_s: float) -> None:
        """Flushes (no longer paced), then stops the writers still retrying."""
        self._unpaced.set()
        await self.flush(timeout_s)
        for name in list(self._writers):
            self.forget(name)

    def _forget_paces_older_than(self, horizon: float) -> None:
        """Drops the pacing record of nodes that wrote nothing since ``horizon`` (it no longer limits them)."""
        for name in [n for n, sent in self._sent.items() if sent[-1] < horizon and n not in self._writers]:
            del self._sent[name]
        self._prune_at = 2 * len(self._sent) + 1024

    async def _wait_for_slot(self, name: str) -> None:
        sent = self._sent.setdefault(name, collections.deque(maxlen=self.burst))
        if len(sent) == sent.maxlen and not self._unpaced.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unpaced.wait(), max(0.0, sent[0] + self.window_s - time.monotonic()))
        sent.append(time.monotonic())

    async def _write_until_done(self, name: str) -> None:
        delay = self.retry_s
        try:
            while name in self._pending:
                await self._wait_for_slot(name)  # what comes in meanwhile merges into this write
                status, callbacks = self._pending.pop(name)
                try:
                    await self.registry.patch_status(name, status)
                except KeyError:
                    log.info("status of %s not written: the VolunteerNode is gone", name)
                    self._pending.pop(name, None)
                    return
                except Exception:  # the API failed us: keep it for another try, merged under newer news
                    self.failed_writes += 1
                    log.exception("status write for %s failed; trying again in %.1fs", name, delay)
                    newer, later_callbacks = self._pending.get(name, ({}, []))
                    self._pending[name] = ({**status, **newer}, callbacks + later_callbacks)
                    news = self._news[name] = asyncio.Event()
                    try:
                        await asyncio.wait_for(news.wait(), delay)
                    except TimeoutError:
                        delay = min(delay * 2, MAX_RETRY_DELAY_S)
                    finally:
                        self._news.pop(name, None)
                    continue
                delay = self.retry_s
                for callback in callbacks:
                    callback()
        finally:
            if self._writers.get(name) is asyncio.current_task():
                del self._writers[name]
