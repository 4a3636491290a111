"""OpenAPI v3 documents built from the served resources (CRD schemas for custom resources).

kubectl uses them for ``kubectl explain`` and to learn that the server validates fields itself: the
PATCH operation of each kind lists a ``fieldValidation`` query parameter, so kubectl sends
``fieldValidation=Strict`` instead of validating client-side. Patch bodies list only JSON and merge
patches, so kubectl sends merge patches for custom resources and uses its compiled-in strategic
merge metadata for built-in kinds.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from .discovery import KUBERNETES_VERSION
from .resources import ResourceRegistry, ResourceType

JsonObj = dict[str, Any]

META = "io.k8s.apimachinery.pkg.apis.meta.v1"
_STRING = {"type": "string"}
_OBJECT_META: JsonObj = {
    "description": "ObjectMeta is metadata that all persisted resources must have, which includes all "
    "objects users must create.",
    "type": "object",
    "properties": {
        "name": {**_STRING, "description": "Name must be unique within a namespace."},
        "generateName": {
            **_STRING,
            "description": "Optional prefix used by the server to generate a unique name if name is not provided.",
        },
        "namespace": {**_STRING, "description": "Namespace defines the space within which each name must be unique."},
        "uid": {**_STRING, "description": "UID is the unique in time and space value for this object."},
        "resourceVersion": {
            **_STRING,
            "description": "An opaque value that represents the internal version of this object.",
        },
        "generation": {
            "type": "integer",
            "format": "int64",
            "description": "A sequence number representing a specific generation of the desired state.",
        },
        "creationTimestamp": {
            **_STRING,
            "format": "date-time",
            "description": "When this object was created, in UTC (RFC3339).",
        },
        "deletionTimestamp": {
            **_STRING,
            "format": "date-time",
            "description": "When this resource will be deleted (set by the server on a graceful delete request).",
        },
        "labels": {
            "type": "object",
            "additionalProperties": {**_STRING, "default": ""},
            "description": "Map of string keys and values used to organize and categorize objects.",
        },
        "annotations": {
            "type": "object",
            "additionalProperties": {**_STRING, "default": ""},
            "description": "Unstructured key value map stored with a resource.",
        },
        "finalizers": {
            "type": "array",
            "items": {**_STRING, "default": ""},
            "description": "Must be empty before the object is deleted from the registry.",
        },
        "ownerReferences": {
            "type": "array",
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "description": "List of objects depended by this object.",
        },
    },
}
_LIST_META: JsonObj = {
    "description": "ListMeta describes metadata that synthetic resources must have.",
    "type": "object",
    "properties": {"resourceVersion": _STRING, "continue": _STRING},
}


def schema_name(group: str, version: str, kind: str) -> str:
    if not group:
        return f"io.k8s.api.core.{version}.{kind}"
    return f"{'.'.join(reversed(group.split('.')))}.{version}.{kind}"


def _gvk(resource: ResourceType, kind: str) -> JsonObj:
    return {"group": resource.group, "version": resource.version, "kind": kind}


def _object_schema(resource: ResourceType) -> JsonObj:
    base: JsonObj = (
        copy.deepcopy(resource.schema)
        if resource.schema
        else {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "description": f"{resource.kind} (served by the Koinon Kubernetes API emulator without a schema).",
        }
    )
    properties: JsonObj = base.setdefault("properties", {})
    properties["apiVersion"] = {
        **_STRING,
        "description": "APIVersion defines the versioned schema of this representation of an object.",
    }
    properties["kind"] = {
        **_STRING,
        "description": "Kind is a string value representing the REST resource this object represents.",
    }
    properties["metadata"] = {
        "allOf": [{"$ref": f"#/components/schemas/{META}.ObjectMeta"}],
        "description": "Standard object's metadata.",
    }
    base["x-kubernetes-group-version-kind"] = [_gvk(resource, resource.kind)]
    return base


def _list_schema(resource: ResourceType, item_ref: str) -> JsonObj:
    return {
        "type": "object",
        "required": ["items"],
        "description": f"{resource.list_kind} is a list of {resource.kind}",
        "properties": {
            "apiVersion": _STRING,
            "kind": _STRING,
            "items": {"type": "array", "items": {"$ref": item_ref}},
            "metadata": {"allOf": [{"$ref": f"#/components/schemas/{META}.ListMeta"}]},
        },
        "x-kubernetes-group-version-kind": [_gvk(resource, resource.list_kind)],
    }


def _query(name: str, description: str) -> JsonObj:
    return {"name": name, "in": "query", "description": description, "schema": {"type": "string", "uniqueItems": True}}


_WRITE_PARAMS = [
    _query("dryRun", "When present, indicates that modifications should not be persisted."),
    _query("fieldManager", "A name associated with the actor or entity that is making these changes."),
    _query(
        "fieldValidation",
        "Instructs the server on how to handle objects in the request containing "
        "unknown or duplicate fields: Ignore, Warn or Strict.",
    ),
]


def _operation(
    resource: ResourceType, action: str, ref: str, params: list[JsonObj], body_types: tuple[str, ...] = ()
) -> JsonObj:
    operation: JsonObj = {
        "operationId": f"{action}{resource.kind}",
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": ref}}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(resource, resource.kind),
    }
    if body_types:
        operation["requestBody"] = {"content": {t: {"schema": {"$ref": ref}} for t in body_types}, "required": True}
    return operation


def _paths(resource: ResourceType, ref: str, list_ref: str) -> dict[str, JsonObj]:
    prefix = f"/apis/{resource.group}/{resource.version}" if resource.group else f"/api/{resource.version}"
    if resource.namespaced:
        prefix += "/namespaces/{namespace}"
    collection = f"{prefix}/{resource.plural}"
    item = f"{collection}/{{name}}"
    patch_types = ("application/json-patch+json", "application/merge-patch+json")
    item_ops = {
        "get": _operation(resource, "get", ref, []),
        "put": _operation(resource, "put", ref, _WRITE_PARAMS, ("application/json",)),
        "patch": _operation(resource, "patch", ref, [*_WRITE_PARAMS, _query("force", "Force apply.")], patch_types),
        "delete": _operation(resource, "delete", ref, [_query("dryRun", "Do not persist.")]),
    }
    paths = {
        collection: {
            "get": _operation(resource, "list", list_ref, []),
            "post": _operation(resource, "post", ref, _WRITE_PARAMS, ("application/json",)),
        },
        item: item_ops,
    }
    if resource.status_subresource:
        paths[f"{item}/status"] = {key: copy.deepcopy(item_ops[key]) for key in ("get", "put", "patch")}
    return paths


def group_version_document(registry: ResourceRegistry, group: str, version: str) -> JsonObj | None:
    resources = registry.in_group_version(group, version)
    if not resources:
        return None
    schemas: JsonObj = {f"{META}.ObjectMeta": _OBJECT_META, f"{META}.ListMeta": _LIST_META}
    paths: JsonObj = {}
    for resource in resources:
        name = schema_name(group, version, resource.kind)
        ref = f"#/components/schemas/{name}"
        schemas[name] = _object_schema(resource)
        list_name = schema_name(group, version, resource.list_kind)
        schemas[list_name] = _list_schema(resource, ref)
        paths.update(_paths(resource, ref, f"#/components/schemas/{list_name}"))
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def document_hash(document: JsonObj) -> str:
    return hashlib.sha512(json.dumps(document, sort_keys=True).encode()).hexdigest()[:64].upper()


def index(registry: ResourceRegistry) -> JsonObj:
    """``/openapi/v3``: one entry per group-version; the hash changes whenever its document does,
    which is what lets kubectl's cache notice a new or changed CRD."""
    group_versions = {("", "v1")} | {(r.group, r.version) for r in registry.all()}
    paths: JsonObj = {}
    for group, version in sorted(group_versions):
        document = group_version_document(registry, group, version)
        if document is None:
            continue
        key = f"apis/{group}/{version}" if group else f"api/{version}"
        paths[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={document_hash(document)}"}
    return {"paths": paths}
