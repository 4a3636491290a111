"""VolunteerNode objects in the Kubernetes API (cluster scoped, ``koinon.dev/v1alpha1``).

The gateway creates each node with ``koinon.dev/connection-owner: gateway`` so the operator leaves
the connection fields to it, and writes status only through the ``/status`` subresource, field by
field (fields it does not own, such as reputation, stay untouched). A write for a known object (its
``metadata.uid``) is a JSON patch whose first op tests that uid: kube-apiserver applies the ops to
the stored object and answers 422 when the test fails, so a node deleted and created again under
its name never gets the old one's status. (A merge patch carrying ``metadata.uid`` would not do:
the status subresource of a custom resource keeps the stored metadata and ignores the rest.)

The gateway's sessions already write heartbeat news rarely (``SessionTable.write_status``); as a
backstop, writes that differ from the last one in ``lastHeartbeat`` alone are coalesced per node to
at most one per ``heartbeat_write_interval_s``. Any other change (phase, connected, address,
latency, ...) is written at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .kube_client import JSON, KubeApiError, KubeClient, custom_path
from .registry import (
    CONNECTION_OWNER_ANNOTATION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    DeletedNode,
    NodeExists,
    merge_patch,
    node_uid,
    status_address,
)

log = logging.getLogger(__name__)

HEARTBEAT_ONLY_FIELDS = frozenset({"lastHeartbeat"})
WATCH_RETRY_S = 1.0
WATCH_RETRY_MAX_S = 30.0
WATCH_HEALTHY_S = 60.0  # a watch that lasted this long resets the backoff (client-go: 2 min)


def _terminating(node: JSON) -> bool:
    return bool((node.get("metadata") or {}).get("deletionTimestamp"))


def _after_watch(retry_s: float, watching_since: float | None) -> float:
    """The wait before listing again: back to the first after a watch that served a while (a new
    failure, not the same outage), else unchanged (a failing list counts as the same outage)."""
    if watching_since is not None and time.monotonic() - watching_since >= WATCH_HEALTHY_S:
        return WATCH_RETRY_S
    return retry_s


def _replaced(known_uid: str, node: JSON) -> bool:
    """Whether ``node`` is another object than the one known under its name (created again)."""
    uid = node_uid(node)
    return bool(known_uid and uid and uid != known_uid)


def _significant(status: JSON, uid: str) -> str:
    return json.dumps([uid, {k: v for k, v in status.items() if k not in HEARTBEAT_ONLY_FIELDS}], sort_keys=True)


def _pointer(*keys: str) -> str:
    return "".join("/" + key.replace("~", "~0").replace("/", "~1") for key in keys)


def _uid_test(uid: str) -> JSON:
    return {"op": "test", "path": "/metadata/uid", "value": uid}


def _status_ops(status: JSON) -> list[JSON]:
    """JSON patch ops writing each top-level field of ``status`` as a merge patch would, whole (the
    gateway owns these fields). None removes the field: added first, so that the remove applies
    whether or not the field is there."""
    ops: list[JSON] = []
    for key, value in status.items():
        path = _pointer("status", key)
        ops.append({"op": "add", "path": path, "value": value})
        if value is None:
            ops.append({"op": "remove", "path": path})
    return ops


@dataclass
class _LastWrite:
    at: float
    significant: str


@dataclass
class KubeNodeRegistry:
    client: KubeClient
    heartbeat_write_interval_s: float = 10.0
    status_writes: int = 0
    status_writes_skipped: int = 0
    _last: dict[str, _LastWrite] = field(default_factory=dict)
    # Nodes this registry saw exist (listed, created or given an address here), name -> address: a
    # relist after a watch gap reports those that vanished, though the watch never saw them.
    _seen: dict[str, str] = field(default_factory=dict)
    # Nodes this registry created and has not written status to: name -> (uid, resourceVersion) of
    # the object as created, which has no status yet (a custom resource's status subresource drops
    # one given at creation), so the first write adds it whole in one call (_first_status).
    _created: dict[str, tuple[str, str]] = field(default_factory=dict)

    def _path(self, name: str | None = None, subresource: str | None = None) -> str:
        return custom_path(GROUP, VERSION, PLURAL, name, subresource=subresource)

    async def create(self, name: str, spec: JSON, labels: dict[str, str]) -> str:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {
                "name": name,
                "labels": dict(labels),
                "annotations": {CONNECTION_OWNER_ANNOTATION: "gateway"},
            },
            "spec": spec,
        }
        try:
            created = await self.client.create(self._path(), body)
        except KubeApiError as exc:
            if exc.conflict:
                raise NodeExists(name) from exc
            raise
        self._seen.setdefault(name, "")
        uid = node_uid(created)
        if not uid:  # every API server sets one; without it no credential could name the object
            raise KubeApiError(500, "InternalError", f"VolunteerNode {name} created without metadata.uid")
        version = str((created.get("metadata") or {}).get("resourceVersion") or "")
        if version and not created.get("status"):
            self._created[name] = (uid, version)
        return uid

    async def get(self, name: str) -> JSON | None:
        return await self.client.get_or_none(self._path(name))

    async def list(self, labels: dict[str, str] | None = None) -> list[JSON]:
        selector = ",".join(f"{key}={value}" for key, value in sorted((labels or {}).items()))
        items, _ = await self.client.list_all(self._path(), selector or None)
        for item in items:
            if not _terminating(item):
                self._seen[str(item["metadata"]["name"])] = status_address(item)
        return items

    async def patch_status(self, name: str, status: JSON, uid: str = "") -> None:
        significant = _significant(status, uid)
        last = self._last.get(name)
        now = time.monotonic()
        if last is not None and last.significant == significant and now - last.at < self.heartbeat_write_interval_s:
            self.status_writes_skipped += 1
            return
        try:
            if uid:
                await self._patch_status_of(name, status, uid)
            else:
                await self.client.merge_patch(self._path(name, "status"), {"status": status})
        except (KubeApiError, KeyError) as exc:
            if isinstance(exc, KeyError) or exc.not_found:
                self._last.pop(name, None)
                raise KeyError(f"VolunteerNode {name} not found") from exc
            raise
        self._last[name] = _LastWrite(now, significant)
        if status.get("address"):
            self._seen[name] = str(status["address"])
        self.status_writes += 1

    async def _patch_status_of(self, name: str, status: JSON, uid: str) -> None:
        """Writes ``status`` into the object ``uid`` only; KeyError when the name is another object's."""
        path = self._path(name, "status")
        if await self._first_status(name, status, uid):
            return
        try:
            await self.client.json_patch(path, [_uid_test(uid), *_status_ops(status)])
            return
        except KubeApiError as exc:
            if not exc.invalid:
                raise
        # Refused (422): another object holds the name, or this one has no status yet to add fields
        # to (just created; the status subresource drops a status given at creation). The answer
        # does not say which: the object does.
        node = await self.client.get_or_none(self._path(name))
        if node is None or node_uid(node) != uid:
            raise KeyError(f"VolunteerNode {name} is another object now (not uid {uid})")
        version = str((node.get("metadata") or {}).get("resourceVersion") or "")
        # As read and patched here: 422 again if anybody changed the object meanwhile, and the
        # writer tries again, by then finding a status or another object.
        await self._replace_status(name, uid, version, merge_patch(node.get("status") or {}, status))

    async def _first_status(self, name: str, status: JSON, uid: str) -> bool:
        """The first status of a node this registry created, added whole in one call (a join's
        write), if the object is still as created; False: write it the general way."""
        created = self._created.pop(name, None)
        if created is None or created[0] != uid:
            return False
        try:
            await self._replace_status(name, uid, created[1], merge_patch({}, status))
        except KubeApiError as exc:
            if exc.invalid:  # changed since (another writer added status): the general way
                return False
            raise
        return True

    async def _replace_status(self, name: str, uid: str, version: str, whole: JSON) -> None:
        """Sets the whole status of the object ``uid``, only as it was at ``version`` (422 else)."""
        await self.client.json_patch(
            self._path(name, "status"),
            [
                _uid_test(uid),
                {"op": "test", "path": "/metadata/resourceVersion", "value": version},
                {"op": "add", "path": "/status", "value": whole},
            ],
        )

    async def delete(self, name: str, preconditions: Mapping[str, str] | None = None) -> bool:
        try:
            await self.client.delete(self._path(name), preconditions)
        except KubeApiError as exc:
            if exc.not_found or (preconditions and exc.conflict):  # gone, or no longer the object read
                return False
            raise
        self._forget(name)  # deleted by this gateway, which deals with its session itself
        return True

    def _forget(self, name: str) -> None:
        """Drops what this registry keeps of a node that is gone (deleted, or being deleted)."""
        self._last.pop(name, None)
        self._seen.pop(name, None)
        # Created here and gone before its first status write (deleted by someone else): kept for
        # the life of the process otherwise.
        self._created.pop(name, None)

    async def deleted_nodes(self) -> AsyncIterator[DeletedNode]:
        """VolunteerNodes as they are deleted, for as long as the caller iterates.

        Lists, then watches from the list's resourceVersion; when the watch history is gone (410) or
        the connection drops, lists again and reports the nodes that vanished in between (with the
        address they had when last seen).

        A node counts as deleted as soon as it carries a ``deletionTimestamp``: a finalizer (another
        controller's, or a person's) may hold the object for a long time, and the volunteer must not
        stay connected meanwhile. Each node is reported once per deletion.
        """
        known: dict[str, str] = {}  # name -> address, of nodes not being deleted
        # name -> metadata.uid of those: an object deleted and created again under its name while
        # the watch was down is another object, and the deleted one's session must still end.
        known_uids: dict[str, str] = {}
        reported: set[str] = set()  # nodes reported while their object still exists (terminating)
        resource_version = ""
        # After a failure, wait longer each time (as client-go's reflector): an API server that
        # fails every request must not get a LIST of every VolunteerNode each second from here.
        retry_s = WATCH_RETRY_S
        watching_since: float | None = None  # when the current watch began (None: none began)
        while True:
            try:
                if not resource_version:
                    # Only what was seen before the list was asked for: a node created while the
                    # list is under way may be missing from it without being gone.
                    seen_before = dict(self._seen)
                    items, resource_version = await self.client.list_all(self._path())
                    current = {str(item["metadata"]["name"]): item for item in items}
                    terminating = {name for name, item in current.items() if _terminating(item)}
                    vanished = {**seen_before, **known}
                    # Seen only while the list was taken: gone already (deleted before the list's
                    # version, so no watch event will come) or made after it (the watch brings it).
                    for name in self._seen.keys() - seen_before.keys() - current.keys() - known.keys():
                        if await self.client.get_or_none(self._path(name)) is None:
                            vanished[name] = self._seen.get(name, "")
                    for name in sorted(vanished.keys() - current.keys()):
                        # As a DELETED event drops it: else each node gone during a gap stays here.
                        self._forget(name)
                        yield DeletedNode(name, vanished[name])
                    for name in sorted(known.keys() & current.keys()):
                        if _replaced(known_uids.get(name, ""), current[name]):
                            self._last.pop(name, None)
                            yield DeletedNode(name, known[name], replaced=True)
                    for name in sorted(terminating - reported):
                        self._forget(name)
                        yield DeletedNode(name, status_address(current[name]))
                    known = {name: status_address(item) for name, item in current.items() if name not in terminating}
                    known_uids = {name: node_uid(current[name]) for name in known}
                    reported = terminating
                watching_since = time.monotonic()
                async for event in self.client.watch(self._path(), resource_version):
                    retry_s = WATCH_RETRY_S  # the watch works again
                    metadata: dict[str, Any] = event.object.get("metadata") or {}
                    resource_version = str(metadata.get("resourceVersion") or resource_version)
                    name = str(metadata.get("name", ""))
                    if event.type in ("ADDED", "MODIFIED") and not _terminating(event.object):
                        if name in known and _replaced(known_uids.get(name, ""), event.object):
                            self._last.pop(name, None)
                            yield DeletedNode(name, known[name], replaced=True)
                        known[name] = status_address(event.object)
                        known_uids[name] = node_uid(event.object)
                    elif event.type in ("ADDED", "MODIFIED", "DELETED"):
                        known.pop(name, None)
                        known_uids.pop(name, None)
                        self._forget(name)
                        first = name not in reported
                        if event.type == "DELETED":
                            reported.discard(name)
                        else:
                            reported.add(name)
                        if first:
                            yield DeletedNode(name, status_address(event.object))
                retry_s = WATCH_RETRY_S  # ended by the server's timeout: fine
            except KubeApiError as exc:
                resource_version = ""
                retry_s = _after_watch(retry_s, watching_since)
                watching_since = None
                if not exc.gone:
                    log.warning("VolunteerNode watch failed: %s; listing again in %.0fs", exc, retry_s)
                    await asyncio.sleep(retry_s)
                    retry_s = min(retry_s * 2, WATCH_RETRY_MAX_S)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                retry_s = _after_watch(retry_s, watching_since)
                watching_since = None
                log.warning("VolunteerNode watch interrupted: %r; listing again in %.0fs", exc, retry_s)
                resource_version = ""
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, WATCH_RETRY_MAX_S)
