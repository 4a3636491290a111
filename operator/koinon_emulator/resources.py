"""Resource types (group, version, plural, kind...) and the registry the emulator serves.

Built-in resources and CRD-declared ones are the same ``ResourceType``; the store treats them alike.
Several served versions of one CRD share storage, keyed by ``(group, plural)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

JsonObj = dict[str, Any]
StorageKey = tuple[str, str]  # (group, plural): versions of one resource share their objects

ALL_VERBS: tuple[str, ...] = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    # openAPIV3Schema of this version (CRDs only); ``None`` means no schema processing.
    schema: JsonObj | None = field(default=None, compare=False, hash=False)
    printer_columns: tuple[JsonObj, ...] = field(default=(), compare=False, hash=False)
    # CRD ``selectableFields`` JSON paths (``.spec.x``) usable in fieldSelector, beyond metadata.*.
    selectable_fields: tuple[str, ...] = ()
    crd_name: str | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def storage_key(self) -> StorageKey:
        return (self.group, self.plural)

    @property
    def singular_name(self) -> str:
        return self.singular or self.kind.lower()

    @property
    def group_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


_VERSION_RE = re.compile(r"^v(\d+)(?:(alpha|beta)(\d+))?$")


def version_priority(version: str) -> tuple[int, int, int, str]:
    """Sort key giving Kubernetes version priority: GA > beta > alpha > others, higher numbers first."""
    match = _VERSION_RE.match(version)
    if not match:
        return (3, 0, 0, version)
    major = int(match.group(1))
    stage = {None: 0, "beta": 1, "alpha": 2}[match.group(2)]
    minor = int(match.group(3) or 0)
    return (stage, -major, -minor, version)


def _core(plural: str, kind: str, namespaced: bool, short: tuple[str, ...] = (), **kw: Any) -> ResourceType:
    return ResourceType("", "v1", plural, kind, namespaced, short_names=short, **kw)


BUILTIN_RESOURCES: tuple[ResourceType, ...] = (
    _core("namespaces", "Namespace", False, ("ns",), status_subresource=True),
    _core("events", "Event", True, ("ev",)),
    _core("secrets", "Secret", True),
    _core("configmaps", "ConfigMap", True, ("cm",)),
    _core("serviceaccounts", "ServiceAccount", True, ("sa",)),
    _core("services", "Service", True, ("svc",), categories=("all",), status_subresource=True),
    _core("pods", "Pod", True, ("po",), categories=("all",), status_subresource=True),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True),
    ResourceType(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        short_names=("crd", "crds"),
        categories=("api-extensions",),
        status_subresource=True,
    ),
    ResourceType(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        True,
        short_names=("deploy",),
        categories=("all",),
        status_subresource=True,
    ),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    # Stored and validated, not enforced (no pods run here), as RBAC objects are stored, not enforced:
    # the agent chart renders one by default, so `helm template | kubectl apply -f -` needs the kind.
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, short_names=("netpol",)),
)

CRD_RESOURCE = BUILTIN_RESOURCES[8]
NAMESPACE_RESOURCE = BUILTIN_RESOURCES[0]


class ResourceRegistry:
    """What the emulator serves: lookups by URL parts, and the group/version listing for discovery."""

    def __init__(self, builtins: Iterable[ResourceType] = BUILTIN_RESOURCES) -> None:
        self._by_gvr: dict[tuple[str, str, str], ResourceType] = {}
        for resource in builtins:
            self.register(resource)

    def register(self, resource: ResourceType) -> None:
        self._by_gvr[(resource.group, resource.version, resource.plural)] = resource

    def unregister_crd(self, crd_name: str) -> list[ResourceType]:
        removed = [r for r in self._by_gvr.values() if r.crd_name == crd_name]
        for resource in removed:
            del self._by_gvr[(resource.group, resource.version, resource.plural)]
        return removed

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._by_gvr.get((group, version, plural))

    def all(self) -> list[ResourceType]:
        return list(self._by_gvr.values())

    def in_group_version(self, group: str, version: str) -> list[ResourceType]:
        return sorted(
            (r for r in self._by_gvr.values() if r.group == group and r.version == version),
            key=lambda r: r.plural,
        )

    def group_versions(self) -> dict[str, list[str]]:
        """Named groups (not core) mapped to their versions, preferred (highest priority) first."""
        groups: dict[str, set[str]] = {}
        for resource in self._by_gvr.values():
            if resource.group:
                groups.setdefault(resource.group, set()).add(resource.version)
        return {g: sorted(v, key=version_priority) for g, v in sorted(groups.items())}

    def find_kind(self, group: str, version: str, kind: str) -> ResourceType | None:
        for resource in self._by_gvr.values():
            if (resource.group, resource.version, resource.kind) == (group, version, kind):
                return resource
        return None

    def find_group_kind(self, group: str, kind: str) -> ResourceType | None:
        """A served version of ``kind`` in ``group``, the preferred one first."""
        served = [r for r in self._by_gvr.values() if (r.group, r.kind) == (group, kind)]
        return min(served, key=lambda r: version_priority(r.version), default=None)
