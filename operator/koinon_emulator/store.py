"""In-memory object storage with one global resourceVersion counter and watch fan-out.

Stored objects are never mutated after they are stored (writers build new dicts), so reads and
watch events can share them without copying. Each watcher owns one queue; an event is offered only
to the watchers of its resource, and resuming from a resourceVersion walks back from the newest
history entry, so request handling does not slow down as history grows.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError, gone
from .resources import StorageKey
from .selectors import ObjectFilter

JsonObj = dict[str, Any]
ObjectKey = tuple[str, str]  # (namespace or "", name)

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"

# etcd's default --max-request-bytes (1.5 MiB): kube-apiserver's writes of a bigger object fail in
# etcd, whatever their request's size (only request bodies are bounded, at 3 MiB, before that). The
# object is measured here as compact JSON, as custom resources are stored (built-in kinds are stored
# as protobuf, somewhat smaller, and etcd counts its key and transaction too: the limit is approximate).
MAX_STORED_OBJECT_BYTES = 1536 * 1024


@dataclass(frozen=True)
class StoredEvent:
    resource_version: int
    type: str
    obj: JsonObj
    # The previous stored state for MODIFIED and DELETED, so watchers see selector transitions (and
    # a deletion of what they selected).
    old: JsonObj | None


# What a watcher's queue carries: (type, object), or None when the server closes the stream.
WatchItem = tuple[str, JsonObj] | None


@dataclass(eq=False)
class Watcher:
    key: StorageKey
    selection: ObjectFilter
    queue: asyncio.Queue[WatchItem] = field(default_factory=asyncio.Queue)

    def offer(self, event: StoredEvent) -> None:
        if event.type == DELETED:
            # kube-apiserver's cacher decides a DELETED event on the object as it was stored: an
            # update that removed the last finalizer and changed a label deleted an object its
            # watchers selected, though the final state in the event no longer matches.
            if self.selection.matches(event.old if event.old is not None else event.obj):
                self.queue.put_nowait((DELETED, event.obj))
            return
        now = self.selection.matches(event.obj)
        if event.type != MODIFIED:
            if now:
                self.queue.put_nowait((event.type, event.obj))
            return
        before = event.old is not None and self.selection.matches(event.old)
        if now:
            self.queue.put_nowait((MODIFIED if before else ADDED, event.obj))
        elif before:
            # The object left the selection: Kubernetes reports it to this watcher as deleted.
            self.queue.put_nowait((DELETED, event.obj))

    def close(self) -> None:
        self.queue.put_nowait(None)


def object_key(obj: JsonObj) -> ObjectKey:
    metadata = obj["metadata"]
    return (metadata.get("namespace") or "", metadata["name"])


class ObjectStore:
    def __init__(self, history_limit: int = 20_000) -> None:
        self.resource_version = 0
        self._history_limit = history_limit
        self._objects: dict[StorageKey, dict[ObjectKey, JsonObj]] = {}
        self._history: dict[StorageKey, deque[StoredEvent]] = {}
        self._compacted: dict[StorageKey, int] = {}
        self._restored_at = 0  # resourceVersion a state file was restored at (0: none)
        self._watchers: dict[StorageKey, set[Watcher]] = {}

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: StorageKey, namespace: str, name: str) -> JsonObj | None:
        return self._objects.get(key, {}).get((namespace, name))

    def select(self, key: StorageKey, selection: ObjectFilter) -> list[JsonObj]:
        bucket = self._objects.get(key, {})
        return [bucket[k] for k in sorted(bucket) if selection.matches(bucket[k])]

    def count_in_namespace(self, namespace: str) -> int:
        return sum(1 for bucket in self._objects.values() for ns, _ in bucket if ns == namespace)

    def storage_keys(self) -> list[StorageKey]:
        return list(self._objects)

    def items(self, key: StorageKey) -> Iterator[JsonObj]:
        yield from list(self._objects.get(key, {}).values())

    # -- writes --------------------------------------------------------------------------------

    def mark_restored(self, version: int) -> None:
        """After a restore from a state file: no event before ``version`` can be replayed, so a
        watch from an earlier version gets 410 Gone (and its client lists again), as from a
        compacted etcd, instead of silently missing what changed."""
        self._restored_at = max(self._restored_at, version)

    def load(self, key: StorageKey, obj: JsonObj) -> None:
        """Put a saved object back as it was (state restore): no new version, no event."""
        self._objects.setdefault(key, {})[object_key(obj)] = obj
        self.resource_version = max(self.resource_version, int(obj["metadata"]["resourceVersion"]))

    def _next_version(self) -> int:
        self.resource_version += 1
        return self.resource_version

    def put(self, key: StorageKey, obj: JsonObj, old: JsonObj | None) -> JsonObj:
        """Store ``obj`` (created or replacing ``old``) under a fresh resourceVersion and notify."""
        if (
            len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))
            > MAX_STORED_OBJECT_BYTES
        ):
            # kube-apiserver passes etcd's error on as it is (kubernetes/kubernetes#112152, #74600): a
            # 500 with no reason, "etcdserver: request is too large". Nothing is stored.
            raise ApiError(500, "", "etcdserver: request is too large")
        version = self._next_version()
        obj["metadata"]["resourceVersion"] = str(version)
        self._objects.setdefault(key, {})[object_key(obj)] = obj
        self._emit(key, StoredEvent(version, MODIFIED if old is not None else ADDED, obj, old))
        return obj

    def remove(self, key: StorageKey, namespace: str, name: str, last_state: JsonObj | None = None) -> JsonObj | None:
        """Delete an object; the DELETED event carries ``last_state`` when given (an update that
        removed the last finalizer), else the stored state."""
        bucket = self._objects.get(key, {})
        stored = bucket.pop((namespace, name), None)
        if stored is None:
            return None
        current = last_state if last_state is not None else stored
        version = self._next_version()
        final = {**current, "metadata": {**current["metadata"], "resourceVersion": str(version)}}
        self._emit(key, StoredEvent(version, DELETED, final, stored))
        return final

    def _emit(self, key: StorageKey, event: StoredEvent) -> None:
        history = self._history.setdefault(key, deque())
        if len(history) >= self._history_limit:
            self._compacted[key] = history.popleft().resource_version
        history.append(event)
        for watcher in self._watchers.get(key, ()):
            watcher.offer(event)

    # -- watches -------------------------------------------------------------------------------

    def watch(self, key: StorageKey, selection: ObjectFilter, since: int | None) -> Watcher:
        """Register a watcher; ``since=None`` replays the current objects as ADDED first.

        Registration and replay happen without yielding to the event loop, so no event is lost
        or duplicated between them.
        """
        watcher = Watcher(key, selection)
        if since is None:
            for obj in self.select(key, selection):
                watcher.queue.put_nowait((ADDED, obj))
        else:
            compacted = max(self._compacted.get(key, 0), self._restored_at)
            if since < compacted:
                raise gone(f"too old resource version: {since} ({compacted + 1})")
            missed: list[StoredEvent] = []
            for event in reversed(self._history.get(key, ())):
                if event.resource_version <= since:
                    break
                missed.append(event)
            for event in reversed(missed):
                watcher.offer(event)
        self._watchers.setdefault(key, set()).add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.get(watcher.key, set()).discard(watcher)

    def close_watchers(self, key: StorageKey | None = None) -> None:
        for watch_key, watchers in self._watchers.items():
            if key is None or key == watch_key:
                for watcher in watchers:
                    watcher.close()

    def drop(self, key: StorageKey) -> list[JsonObj]:
        """Remove every object of a resource (its CRD went away), emitting DELETED for each."""
        removed = [self.remove(key, ns, name) for ns, name in list(self._objects.get(key, {}))]
        self._objects.pop(key, None)
        return [obj for obj in removed if obj is not None]
