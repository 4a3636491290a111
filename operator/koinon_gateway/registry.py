"""Where VolunteerNode objects live: a small interface with an in-memory implementation.

The Kubernetes-backed implementation is in ``kube_registry.py``. Status is written field by field (JSON merge
patch semantics) to the status subresource, so writers never clobber fields they do not own (e.g. reputation),
and, where the writer names the object's uid, only into that object, not one created again under its name.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .durable_files import write_durably
from .kube_client import KubeApiError
from .status import rfc3339

GROUP = "koinon.dev"
VERSION = "v1alpha1"
PLURAL = "volunteernodes"
KIND = "VolunteerNode"
# On every node a join makes (the token's id): a VolunteerNode made by hand does not carry it.
JOIN_TOKEN_LABEL = "koinon.dev/join-token"
# On every node the Kubernetes registry makes (kube_registry.py), saying "gateway": the operator
# then leaves the node's connection fields to the gateway (koinon_operator/volunteers.py).
CONNECTION_OWNER_ANNOTATION = "koinon.dev/connection-owner"

JSON = dict[str, Any]


class NodeExists(Exception):
    pass


class NodeRegistry(Protocol):
    async def create(self, name: str, spec: JSON, labels: dict[str, str]) -> str:
        """Creates the VolunteerNode and returns its ``metadata.uid`` (what its credentials name);
        raises NodeExists when the name is taken."""
        ...

    async def get(self, name: str) -> JSON | None: ...

    async def list(self, labels: dict[str, str] | None = None) -> list[JSON]:
        """Every VolunteerNode, or those whose labels include all of ``labels``."""
        ...

    async def patch_status(self, name: str, status: JSON, uid: str = "") -> None:
        """Merge-patches ``status`` (JSON merge patch semantics: None deletes). With ``uid``, only
        into that very object: KeyError when the name is free or another object's (created again
        under it), as when the node is gone."""
        ...

    async def delete(self, name: str, preconditions: Mapping[str, str] | None = None) -> bool:
        """Deletes the VolunteerNode; False when it did not exist. With ``preconditions`` (``uid``,
        ``resourceVersion``: the object as read), only that very object unchanged, else False."""
        ...


@dataclass(frozen=True)
class DeletedNode:
    name: str
    # The virtual address in the node's last known status ("" when it never had one).
    address: str = ""
    # Deleted and created again under its name (another uid) meanwhile: the name is in use again,
    # by an object that nothing of the deleted one's (its session, its status writes) may touch.
    replaced: bool = False


@runtime_checkable
class NodeDeletionSource(Protocol):
    """A registry that can report deletions as they happen (the gateway then ends live sessions and
    frees their virtual addresses)."""

    def deleted_nodes(self) -> AsyncIterator[DeletedNode]: ...


def write_refused(exc: BaseException) -> bool:
    """Whether a failed ``patch_status`` is known not to have been applied: the object was gone or
    another (KeyError, as the interface says) or the API server refused the write (a 4xx). Any
    other failure leaves it unknown: a connection error, a timeout or a cancellation (the request
    may have reached the server), a 5xx (it may have applied the write first), a file store's
    failed save (applied in memory)."""
    return isinstance(exc, KeyError) or (isinstance(exc, KubeApiError) and exc.refused)


def status_address(node: JSON) -> str:
    return str((node.get("status") or {}).get("address") or "")


def node_uid(node: JSON) -> str:
    """The object's ``metadata.uid``: new each time an object is created, also under an old name."""
    return str((node.get("metadata") or {}).get("uid") or "")


def created_at(node: JSON) -> dt.datetime | None:
    """When the API server made the object (``metadata.creationTimestamp``); None when unknown
    (objects of a file registry from before it was kept, or a time without its zone)."""
    try:
        created = dt.datetime.fromisoformat(str((node.get("metadata") or {}).get("creationTimestamp")))
    except ValueError:
        return None
    return created if created.tzinfo is not None else None


def made_by_join(node: JSON) -> bool:
    """A join made it (it carries the token's id): not a node made by hand."""
    return JOIN_TOKEN_LABEL in ((node.get("metadata") or {}).get("labels") or {})


def connection_owned_by_gateway(node: JSON) -> bool:
    """The gateway writes this node's connection fields (phase, connected, Ready condition).

    The Kubernetes registry marks the nodes it makes with the annotation; the in-memory and file
    registries set no annotations, but every node they hold that a session could have is one a join
    made. Any other node's Ray worker joined Ray directly, and the operator writes those fields
    from Ray's view: no gateway ever had a session there.
    """
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    return annotations.get(CONNECTION_OWNER_ANNOTATION) == "gateway" or made_by_join(node)


def being_deleted(node: JSON) -> bool:
    """A deletion was asked for (a finalizer may still hold the object): the node is revoked."""
    return bool((node.get("metadata") or {}).get("deletionTimestamp"))


def _meets(obj: JSON, preconditions: Mapping[str, str]) -> bool:
    """As the API server checks DeleteOptions.preconditions (these objects carry no
    resourceVersion: an empty one matches)."""
    metadata = obj.get("metadata") or {}
    return all(str(metadata.get(key) or "") == wanted for key, wanted in preconditions.items())


def merge_patch(target: JSON, patch: JSON) -> JSON:
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge_patch(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


@dataclass
class InMemoryNodeRegistry:
    objects: dict[str, JSON] = field(default_factory=dict)
    status_writes: int = 0

    async def create(self, name: str, spec: JSON, labels: dict[str, str]) -> str:
        if name in self.objects:
            raise NodeExists(name)
        # As the API server does: a uid of its own for every object created, and when.
        uid = str(uuid.uuid4())
        self.objects[name] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": name, "labels": dict(labels), "uid": uid, "creationTimestamp": rfc3339()},
            "spec": copy.deepcopy(spec),
            "status": {},
        }
        return uid

    async def get(self, name: str) -> JSON | None:
        obj = self.objects.get(name)
        return copy.deepcopy(obj) if obj is not None else None

    async def list(self, labels: dict[str, str] | None = None) -> list[JSON]:
        wanted = (labels or {}).items()
        return [
            copy.deepcopy(o) for o in self.objects.values() if wanted <= (o["metadata"].get("labels") or {}).items()
        ]

    async def patch_status(self, name: str, status: JSON, uid: str = "") -> None:
        obj = self.objects.get(name)
        if obj is None:
            raise KeyError(f"VolunteerNode {name} not found")
        if uid and node_uid(obj) != uid:
            raise KeyError(f"VolunteerNode {name} is another object now (uid {node_uid(obj)}, not {uid})")
        obj["status"] = merge_patch(obj.get("status") or {}, status)
        self.status_writes += 1

    async def delete(self, name: str, preconditions: Mapping[str, str] | None = None) -> bool:
        obj = self.objects.get(name)
        if obj is None or not _meets(obj, preconditions or {}):
            return False
        del self.objects[name]
        return True


class FileNodeRegistry(InMemoryNodeRegistry):
    """In-memory registry persisted to one JSON file after each write (local dev and process tests)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        if path.exists():
            self.objects = json.loads(path.read_text())
            # Written before objects had uids: each gets one now, kept, so that the credentials
            # issued from now on name it across restarts.
            missing = [obj for obj in self.objects.values() if not node_uid(obj)]
            for obj in missing:
                obj.setdefault("metadata", {})["uid"] = str(uuid.uuid4())
            if missing:
                self._save()

    def _save(self) -> None:
        write_durably(self.path, json.dumps(self.objects, indent=1))

    async def create(self, name: str, spec: JSON, labels: dict[str, str]) -> str:
        uid = await super().create(name, spec, labels)
        self._save()
        return uid

    async def patch_status(self, name: str, status: JSON, uid: str = "") -> None:
        await super().patch_status(name, status, uid)
        self._save()

    async def delete(self, name: str, preconditions: Mapping[str, str] | None = None) -> bool:
        deleted = await super().delete(name, preconditions)
        self._save()
        return deleted
