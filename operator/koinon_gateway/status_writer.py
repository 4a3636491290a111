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

One kind of write is not held back: the first try of one that takes a node out of Ready
(``connected`` false, or its Ready condition True -> False, against what was last written). Held
back, a dead node stayed Ready up to a window past the heartbeat timeout, and work kept being
placed on it. It still counts toward the window, and it follows a write that showed the node
Ready, which waited for its slot: a flapping agent costs at most about twice ``burst`` writes per
window. Its retries, after the API failed it, wait for their slots as any write does: news wakes a
failed writer at once, and an agent's every message must not become an API call during an outage.

Each write names the object it is for (``metadata.uid``, where known) and lands only on that one: a
VolunteerNode deleted and created again under its name (``kubectl replace --force``) must not get
the old session's status. The registry refuses a write for another object as for a missing one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .registry import NodeRegistry
from .status import stored_ready_condition

log = logging.getLogger(__name__)

JSON = dict[str, Any]
MAX_RETRY_DELAY_S = 60.0


@dataclass
class _Write:
    status: JSON
    uid: str = ""  # of the object it is for; "" where unknown (written to whatever has the name)
    callbacks: list[Callable[[], None]] = field(default_factory=list)

    def then(self, newer: _Write) -> _Write:
        """This write with ``newer`` merged over it. Newer news for another object replaces it:
        the object this one was for is gone (its write would be refused anyway)."""
        if self.uid and newer.uid and self.uid != newer.uid:
            return newer
        return _Write({**self.status, **newer.status}, newer.uid or self.uid, self.callbacks + newer.callbacks)


@dataclass
class _Pace:
    sent: collections.deque[float]  # when the node's latest writes were sent (monotonic)
    # What the writes that landed last said: connected, and Ready condition True.
    connected: bool = False
    ready: bool = False
    # A leave-Ready write sent unpaced and not landed since: its retries (after a failure, woken
    # by every news) wait for their slot like any other write.
    unpaced_sent: bool = False

    def landed(self, status: JSON) -> None:
        self.unpaced_sent = False
        if "connected" in status:
            self.connected = bool(status["connected"])
        condition = stored_ready_condition(status)
        if condition is not None:
            self.ready = condition.status == "True"

    def leaves_ready(self, status: JSON) -> bool:
        """Whether ``status`` takes the node out of the Ready the API shows now."""
        condition = stored_ready_condition(status)
        return (self.connected and status.get("connected") is False) or (
            self.ready and condition is not None and condition.status == "False"
        )


class StatusWriter:
    def __init__(self, registry: NodeRegistry, retry_s: float, burst: int, window_s: float) -> None:
        self.registry = registry
        self.retry_s = retry_s
        self.burst = burst
        self.window_s = window_s
        self._paces: dict[str, _Pace] = {}
        self._prune_at = 1024
        # Set when the gateway stops: the last writes (every node's NotReady) go out unpaced, within
        # close()'s flush, rather than wait for slots beyond it and be dropped.
        self._unpaced = asyncio.Event()
        self._pending: dict[str, _Write] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}
        # Set when news comes in for a node whose writer waits (after a failure, or for a slot):
        # try at once, or see whether the news may go out unpaced.
        self._news: dict[str, asyncio.Event] = {}
        # The object (uid) the latest write handed over for a node is for, while its writer runs.
        self._uids: dict[str, str] = {}
        self.failed_writes = 0

    def submit(self, name: str, status: JSON, on_written: Callable[[], None] | None = None, uid: str = "") -> None:
        """Queues a merge patch of the node's status, for the object ``uid`` (where known: then it
        lands on that object only); ``on_written`` runs once it has landed."""
        write = _Write(status, uid, [on_written] if on_written else [])
        queued = self._pending.get(name)
        self._pending[name] = queued.then(write) if queued is not None else write
        if uid:
            self._uids[name] = uid
        if name not in self._writers:
            self._writers[name] = asyncio.get_running_loop().create_task(self._write_until_done(name))
        elif (news := self._news.get(name)) is not None:
            news.set()
        if len(self._paces) > self._prune_at:
            self._forget_paces_older_than(time.monotonic() - self.window_s)

    def forget(self, name: str) -> None:
        """The node is gone: drop what is queued for it and stop its writer."""
        self._pending.pop(name, None)
        self._paces.pop(name, None)
        self._uids.pop(name, None)
        writer = self._writers.pop(name, None)
        if writer is not None:
            writer.cancel()

    def busy(self, name: str) -> bool:
        return name in self._writers

    def uid_of(self, name: str) -> str:
        """The object the writes queued or under way for ``name`` are for ("" when none or unknown)."""
        return self._uids.get(name, "") if name in self._writers else ""

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
        for news in self._news.values():
            news.set()  # writers waiting for a slot go now
        await self.flush(timeout_s)
        for name in list(self._writers):
            self.forget(name)

    def _forget_paces_older_than(self, horizon: float) -> None:
        """Drops the pacing record of nodes that wrote nothing since ``horizon`` (it no longer limits them)."""
        for name in [n for n, p in self._paces.items() if p.sent[-1] < horizon and n not in self._writers]:
            del self._paces[name]
        self._prune_at = 2 * len(self._paces) + 1024

    async def _news_or_timeout(self, name: str, timeout_s: float) -> bool:
        """Waits up to ``timeout_s``; True when news for ``name`` came in meanwhile."""
        news = self._news[name] = asyncio.Event()
        try:
            await asyncio.wait_for(news.wait(), timeout_s)
        except TimeoutError:
            return False
        finally:
            self._news.pop(name, None)
        return True

    async def _wait_for_slot(self, name: str) -> _Pace:
        pace = self._paces.setdefault(name, _Pace(collections.deque(maxlen=self.burst)))
        sent = pace.sent
        while len(sent) == sent.maxlen and not self._unpaced.is_set():
            # What comes in meanwhile merges into this write; once it takes the node out of Ready,
            # it goes at once (it still takes its place in the window).
            if (
                not pace.unpaced_sent
                and (queued := self._pending.get(name)) is not None
                and pace.leaves_ready(queued.status)
            ):
                pace.unpaced_sent = True
                break
            left = sent[0] + self.window_s - time.monotonic()
            if left <= 0:
                break
            await self._news_or_timeout(name, left)
        sent.append(time.monotonic())
        return pace

    async def _write_until_done(self, name: str) -> None:
        delay = self.retry_s
        try:
            while name in self._pending:
                pace = await self._wait_for_slot(name)  # what comes in meanwhile merges into this write
                write = self._pending.pop(name)
                try:
                    await self.registry.patch_status(name, write.status, uid=write.uid)
                except KeyError:
                    log.info("status of %s not written: the VolunteerNode is gone (or is another object now)", name)
                    newer = self._pending.get(name)
                    if newer is None or not newer.uid or newer.uid == write.uid:
                        self._pending.pop(name, None)
                        return
                    continue  # news for the object now under the name
                except Exception:  # the API failed us: keep it for another try, merged under newer news
                    self.failed_writes += 1
                    log.exception("status write for %s failed; trying again in %.1fs", name, delay)
                    newer = self._pending.get(name)
                    self._pending[name] = write.then(newer) if newer is not None else write
                    if not await self._news_or_timeout(name, delay):
                        delay = min(delay * 2, MAX_RETRY_DELAY_S)
                    continue
                pace.landed(write.status)
                delay = self.retry_s
                for callback in write.callbacks:
                    callback()
        finally:
            if self._writers.get(name) is asyncio.current_task():
                del self._writers[name]
                self._uids.pop(name, None)
