"""Optional state file: the emulator's objects saved on stop and restored on start (local dev)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .files import write_private
from .resources import CRD_RESOURCE
from .service import ApiService

logger = logging.getLogger(__name__)


def save_state(service: ApiService, path: Path) -> None:
    objects: list[dict[str, Any]] = []
    for key in service.store.storage_keys():
        objects.extend(service.store.items(key))
    # CRDs first, so that restoring registers their resources before their objects come back.
    objects.sort(key=lambda obj: obj.get("kind") != CRD_RESOURCE.kind)
    state = {"resourceVersion": service.store.resource_version, "objects": objects}
    # Readable by its owner only: it holds the Secrets of the API (a gateway's CA key, join tokens).
    write_private(path, json.dumps(state))


def load_state(service: ApiService, path: Path) -> int:
    """Restore objects saved by ``save_state``; returns how many were loaded."""
    if not path.exists():
        return 0
    state = json.loads(path.read_text())
    loaded = 0
    for obj in state.get("objects", []):
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        # An object saved under a version no longer served is kept under one that is, as kube-apiserver
        # keeps it in the storage version (conversion strategy None: only apiVersion changes).
        resource = service.registry.find_kind(group, version, str(obj.get("kind"))) or service.registry.find_group_kind(
            group, str(obj.get("kind"))
        )
        if resource is None:
            logger.warning(
                "state file %s: skipping %s %s: its resource is not served",
                path,
                obj.get("kind"),
                obj.get("metadata", {}).get("name"),
            )
            continue
        service.store.load(resource.storage_key, obj)
        if resource == CRD_RESOURCE:
            service.register_crd(obj)
        loaded += 1
    service.store.resource_version = max(service.store.resource_version, int(state.get("resourceVersion", 0)))
    service.store.mark_restored(service.store.resource_version)
    return loaded
