"""Discovery documents: ``/version``, ``/api``, ``/apis``, ``/api/v1``, ``/apis/{group}[/{version}]``.

Aggregated discovery (``apidiscovery.k8s.io/v2``) is not offered: the plain documents are returned
with ``Content-Type: application/json`` and client-go (kubectl) falls back to per-group requests.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .resources import ALL_VERBS, ResourceRegistry, ResourceType

JsonObj = dict[str, Any]

KUBERNETES_VERSION = {"major": "1", "minor": "35", "gitVersion": "v1.35.0-koinon-emulator"}


def version_info() -> JsonObj:
    return {
        **KUBERNETES_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.25.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def api_versions(server_address: str) -> JsonObj:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    }


def _group(name: str, versions: list[str]) -> JsonObj:
    listed = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": listed, "preferredVersion": listed[0]}


def api_group_list(registry: ResourceRegistry) -> JsonObj:
    groups = [_group(name, versions) for name, versions in registry.group_versions().items()]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(registry: ResourceRegistry, group: str) -> JsonObj | None:
    versions = registry.group_versions().get(group)
    if not versions:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(group, versions)}


def _storage_hash(resource: ResourceType) -> str:
    digest = hashlib.sha256(f"{resource.group}/{resource.version}/{resource.kind}".encode()).digest()
    return digest[:8].hex()


def _api_resource(resource: ResourceType) -> JsonObj:
    entry: JsonObj = {
        "name": resource.plural,
        "singularName": resource.singular_name,
        "namespaced": resource.namespaced,
        "kind": resource.kind,
        "verbs": list(ALL_VERBS),
        "storageVersionHash": _storage_hash(resource),
    }
    if resource.short_names:
        entry["shortNames"] = list(resource.short_names)
    if resource.categories:
        entry["categories"] = list(resource.categories)
    return entry


def api_resource_list(registry: ResourceRegistry, group: str, version: str) -> JsonObj | None:
    resources = registry.in_group_version(group, version)
    if not resources:
        return None
    entries = []
    for resource in resources:
        entries.append(_api_resource(resource))
        if resource.status_subresource:
            entries.append(
                {
                    "name": f"{resource.plural}/status",
                    "singularName": "",
                    "namespaced": resource.namespaced,
                    "kind": resource.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    group_version = f"{group}/{version}" if group else version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": entries}
