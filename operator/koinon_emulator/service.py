"""The API semantics (create/get/list/update/patch/delete) shared by the HTTP layer and in-process use.

Everything here works on plain dicts and raises ``ApiError``; HTTP parsing and rendering live in
``http_api``. Writes follow kube-apiserver: server-owned metadata is kept, ``generation`` moves
only on content changes, the status subresource isolates ``.status``, finalizers delay removal,
and no-op writes store nothing and notify no one.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .builtins import normalize_builtin
from .crds import check_crd, crd_resource_types, crd_status
from .errors import ApiError, FieldCause
from .labels import label_problems, qualified_name_problem
from .patching import JSON_PATCH, STRATEGIC_MERGE_PATCH, apply_patch, unknown_operation_fields
from .resources import CRD_RESOURCE, NAMESPACE_RESOURCE, ResourceRegistry, ResourceType
from .schema import admit
from .selectors import ObjectFilter
from .store import ObjectStore

TOTAL_ANNOTATION_SIZE_LIMIT = 256 * 1024  # apimachinery's TotalAnnotationSizeLimitB

JsonObj = dict[str, Any]

INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
# NamespaceLifecycle admission refuses to delete these.
IMMORTAL_NAMESPACES = ("default", "kube-system", "kube-public")
# The apiextensions controller's finalizer: a deleted CRD stays until its objects are gone.
CRD_CLEANUP_FINALIZER = "customresourcecleanup.apiextensions.k8s.io"
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN_HELP = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and "
    "must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_HELP = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start "
    "and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_SERVER_CONTENT_KEYS = ("apiVersion", "kind", "metadata", "status")
# The fields of ObjectMeta (meta/v1): anything else in metadata is an unknown field.
OBJECT_META_FIELDS = frozenset(
    {
        "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
        "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
        "ownerReferences", "finalizers", "managedFields",
    }
)  # fmt: skip

# What ObjectMeta's fields decode into: a body with another JSON type there is a decoding error (a
# 400) in kube-apiserver, before any validation; here it was stored, or failed later as a 500.
_META_STRINGS = (
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "creationTimestamp",
    "deletionTimestamp",
)  # fmt: skip
_META_INTEGERS = ("generation", "deletionGracePeriodSeconds")
_OWNER_REFERENCE_STRINGS = ("apiVersion", "kind", "name", "uid")
_OWNER_REFERENCE_BOOLS = ("controller", "blockOwnerDeletion")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _meta_type_problem(metadata: JsonObj) -> tuple[str, Any, str] | None:
    """The first field of ``metadata`` that ObjectMeta cannot hold: (path, value, Go type)."""
    for key in _META_STRINGS:
        if metadata.get(key) is not None and not isinstance(metadata[key], str):
            return f"metadata.{key}", metadata[key], "v1.Time" if key.endswith("Timestamp") else "string"
    for key in _META_INTEGERS:
        if metadata.get(key) is not None and not _is_int(metadata[key]):
            return f"metadata.{key}", metadata[key], "int64"
    for key in ("labels", "annotations"):
        values = metadata.get(key)
        if values is None:
            continue
        if not isinstance(values, dict):
            return f"metadata.{key}", values, "map[string]string"
        for value in values.values():
            # null decodes (into ""): ApiService._check_type stores it so.
            if value is not None and not isinstance(value, str):
                return f"metadata.{key}", value, "string"
    finalizers = metadata.get("finalizers")
    if finalizers is not None:
        if not isinstance(finalizers, list):
            return "metadata.finalizers", finalizers, "[]string"
        for item in finalizers:
            if not isinstance(item, str):
                return "metadata.finalizers", item, "string"
    for key, item_type in (("ownerReferences", "v1.OwnerReference"), ("managedFields", "v1.ManagedFieldsEntry")):
        items = metadata.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            return f"metadata.{key}", items, f"[]{item_type}"
        for item in items:
            if not isinstance(item, dict):
                return f"metadata.{key}", item, item_type
    for reference in metadata.get("ownerReferences") or ():
        for key in _OWNER_REFERENCE_STRINGS:
            if reference.get(key) is not None and not isinstance(reference[key], str):
                return f"metadata.ownerReferences.{key}", reference[key], "string"
        for key in _OWNER_REFERENCE_BOOLS:
            if reference.get(key) is not None and not isinstance(reference[key], bool):
                return f"metadata.ownerReferences.{key}", reference[key], "bool"
    return None


def _compact(obj: Any) -> str:
    """``obj`` as Go's json.Marshal writes it: no spaces."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class WriteOptions:
    dry_run: bool = False
    field_validation: str = "Warn"  # Strict | Warn | Ignore, as kube-apiserver's ?fieldValidation=


@dataclass
class WriteResult:
    obj: JsonObj
    created: bool = False
    warnings: list[str] = field(default_factory=list)


def _content(obj: JsonObj, status_subresource: bool) -> JsonObj:
    """What ``generation`` tracks: everything but metadata, and but status where status has its
    own subresource (without one, a status change is a change of the object like any other)."""
    ignored = _SERVER_CONTENT_KEYS if status_subresource else ("apiVersion", "kind", "metadata")
    return {k: v for k, v in obj.items() if k not in ignored}


class ApiService:
    def __init__(self, registry: ResourceRegistry | None = None, store: ObjectStore | None = None) -> None:
        self.registry = registry or ResourceRegistry()
        self.store = store or ObjectStore()
        for name in INITIAL_NAMESPACES:
            self.create(NAMESPACE_RESOURCE, None, {"metadata": {"name": name}})

    # -- lookups -------------------------------------------------------------------------------

    def resolve(self, group: str, version: str, plural: str) -> ResourceType:
        resource = self.registry.lookup(group, version, plural)
        if resource is None:
            raise ApiError(
                404, "NotFound", "the server could not find the requested resource", {"group": group, "kind": plural}
            )
        return resource

    @staticmethod
    def as_version(resource: ResourceType, obj: JsonObj) -> JsonObj:
        """Objects of a multi-version CRD share storage; present them in the requested version."""
        if obj.get("apiVersion") == resource.api_version:
            return obj
        return {**obj, "apiVersion": resource.api_version}

    def get(self, resource: ResourceType, namespace: str | None, name: str) -> JsonObj:
        obj = self.store.get(resource.storage_key, namespace or "", name)
        if obj is None:
            raise errors.not_found(resource.group, resource.plural, name)
        return self.as_version(resource, obj)

    def list_objects(self, resource: ResourceType, selection: ObjectFilter) -> tuple[list[JsonObj], int]:
        items = self.store.select(resource.storage_key, selection)
        return [self.as_version(resource, obj) for obj in items], self.store.resource_version

    # -- shared checks -------------------------------------------------------------------------

    def _check_type(self, resource: ResourceType, body: Any) -> JsonObj:
        """A copy of ``body``, as kube-apiserver decodes it, once its type and metadata pass."""
        if not isinstance(body, dict):
            raise errors.bad_request("the request body must be a JSON object")
        obj: JsonObj = copy.deepcopy(body)
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        for key, value in (("apiVersion", api_version), ("kind", kind)):
            if value is not None and not isinstance(value, str):
                # Decoded into TypeMeta's strings first there: a 400 (here it was a 500).
                raise errors.type_meta_error(key, value)
        if api_version and api_version != resource.api_version:
            # Another served version of the same CRD is fine: versions share one schema-less conversion.
            other = self._same_resource_version(resource, api_version)
            if other is None:
                raise errors.bad_request(
                    f"the API version in the data ({api_version}) does not match the "
                    f"expected API version ({resource.api_version})"
                )
        if kind and kind != resource.kind:
            raise errors.bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({resource.kind})"
            )
        metadata = obj.get("metadata", {})
        if not isinstance(metadata, dict):
            raise errors.cannot_decode(resource.kind, resource.version, "metadata", metadata, "v1.ObjectMeta")
        if wrong_type := _meta_type_problem(metadata):
            # A type ObjectMeta cannot hold, labels and annotations included (a list, a number, a
            # non-string value): a decoding error, 400, before validation (the 422s below).
            raise errors.cannot_decode(resource.kind, resource.version, *wrong_type)
        for field_name in ("labels", "annotations"):
            # Go decodes a null map value into a string as "": kubectl sends one for `labels: {KEY: }`.
            values = metadata.get(field_name) or {}
            for key, value in values.items():
                if value is None:
                    values[key] = ""
        label_causes = label_problems(metadata.get("labels") or {})
        label_causes += [
            FieldCause("metadata.annotations", f"Invalid value: {key!r}: {problem}")
            for key in metadata.get("annotations") or {}
            if (problem := qualified_name_problem(str(key)))
        ]
        # apimachinery's ValidateFinalizers: each a qualified name, as label keys are.
        label_causes += [
            FieldCause("metadata.finalizers", f'Invalid value: "{finalizer}": {problem}')
            for finalizer in metadata.get("finalizers") or ()
            if (problem := qualified_name_problem(finalizer))
        ]
        annotations = metadata.get("annotations") or {}
        annotations_size = sum(len(str(key).encode()) + len(str(value).encode()) for key, value in annotations.items())
        if annotations_size > TOTAL_ANNOTATION_SIZE_LIMIT:
            # apimachinery's ValidateAnnotationsSize: keys and values together, per object.
            label_causes.append(
                FieldCause(
                    "metadata.annotations",
                    f"Too long: may not be more than {TOTAL_ANNOTATION_SIZE_LIMIT} bytes",
                )
            )
        if label_causes:
            raise errors.invalid(resource.group, resource.kind, metadata.get("name", ""), label_causes)
        return obj

    def _same_resource_version(self, resource: ResourceType, api_version: str) -> ResourceType | None:
        group, _, version = api_version.rpartition("/")
        other = self.registry.lookup(group, version, resource.plural)
        return other if other is not None and other.storage_key == resource.storage_key else None

    def _check_name(self, resource: ResourceType, name: str) -> None:
        if resource.group == "rbac.authorization.k8s.io":
            if "/" in name or name in (".", ".."):
                raise errors.invalid(
                    resource.group,
                    resource.kind,
                    name,
                    [FieldCause("metadata.name", f"Invalid value: \"{name}\": may not contain '/'")],
                )
            return
        pattern, helptext, limit = (
            (_LABEL, _LABEL_HELP, 63) if resource == NAMESPACE_RESOURCE else (_SUBDOMAIN, _SUBDOMAIN_HELP, 253)
        )
        if len(name) > limit or not pattern.match(name):
            raise errors.invalid(
                resource.group,
                resource.kind,
                name,
                [FieldCause("metadata.name", f'Invalid value: "{name}": {helptext}')],
            )

    def _check_namespace(self, resource: ResourceType, namespace: str | None, name: str) -> None:
        if not resource.namespaced:
            return
        if not namespace:
            raise errors.bad_request("the namespace of the object must be set for a namespaced resource")
        ns = self.store.get(NAMESPACE_RESOURCE.storage_key, "", namespace)
        if ns is None:
            raise errors.not_found("", "namespaces", namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise errors.forbidden(
                f'{resource.plural}{"." + resource.group if resource.group else ""} "{name}" is forbidden: '
                f"unable to create new content in namespace {namespace} because it is being terminated",
                {"name": name, "group": resource.group, "kind": resource.plural},
            )

    def _admit(
        self,
        resource: ResourceType,
        obj: JsonObj,
        options: WriteOptions,
        only: str | None = None,
        patch_strict_errors: Sequence[str] = (),
    ) -> tuple[JsonObj, list[str]]:
        """Schema pruning/defaulting/validation; returns the admitted object and warnings.
        ``patch_strict_errors``: what strict decoding found in a JSON patch's operations, reported
        (or refused, under Strict) first, together with the object's unknown fields, as patch.go does."""
        name = obj.get("metadata", {}).get("name", "")
        if resource == CRD_RESOURCE and only is None and (causes := check_crd(obj)):
            raise errors.invalid(resource.group, resource.kind, name, causes)
        result = admit(obj, resource.schema, only=only)
        # metadata is decoded as ObjectMeta whatever the schema says: unknown fields go like others.
        metadata = result.obj.get("metadata")
        if isinstance(metadata, dict):
            for unknown in sorted(set(metadata) - OBJECT_META_FIELDS):
                del metadata[unknown]
                result.unknown_fields.append(f"metadata.{unknown}")
        warnings: list[str] = []
        strict_errors = [*patch_strict_errors, *(f'unknown field "{path}"' for path in result.unknown_fields)]
        if strict_errors:
            if options.field_validation == "Strict":
                # kube-apiserver's strict decoding error: a 400 naming every unknown field (for a
                # patch, a 422: ApiService.patch).
                raise errors.DecodeError(
                    resource.kind, resource.version, f"strict decoding error: {', '.join(strict_errors)}"
                )
            if options.field_validation != "Ignore":
                warnings = strict_errors
        if result.causes:
            raise errors.invalid(resource.group, resource.kind, name, result.causes)
        return result.obj, warnings

    # -- create --------------------------------------------------------------------------------

    def create(
        self, resource: ResourceType, namespace: str | None, body: Any, options: WriteOptions = WriteOptions()
    ) -> WriteResult:
        obj = self._check_type(resource, body)
        if resource.crd_name and self._crd_terminating(resource.crd_name):
            raise errors.method_not_allowed("create not allowed while custom resource definition is terminating")
        obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
        metadata = obj.setdefault("metadata", {})
        if resource.namespaced:
            if metadata.get("namespace") and namespace and metadata["namespace"] != namespace:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            metadata["namespace"] = namespace = namespace or metadata.get("namespace")
        else:
            metadata.pop("namespace", None)
            namespace = None
        if metadata.get("resourceVersion"):
            raise errors.bad_request("resourceVersion should not be set on objects to be created")
        name = metadata.get("name")
        if not name:
            prefix = metadata.get("generateName")
            if not prefix:
                raise errors.invalid(
                    resource.group,
                    resource.kind,
                    "",
                    [
                        FieldCause(
                            "metadata.name", "Required value: name or generateName is required", "FieldValueRequired"
                        )
                    ],
                )
            name = self._generate_name(resource, namespace, str(prefix))
            metadata["name"] = name
        self._check_name(resource, name)
        self._check_namespace(resource, namespace, name)
        for server_field in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            metadata.pop(server_field, None)
        metadata.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        if resource.status_subresource:
            obj.pop("status", None)
        normalize_builtin(resource.group, resource.plural, obj)
        obj, warnings = self._admit(resource, obj, options)
        if resource == CRD_RESOURCE:
            obj["status"] = crd_status(obj, None, metadata["creationTimestamp"])
        if self.store.get(resource.storage_key, namespace or "", name) is not None:
            raise errors.already_exists(resource.group, resource.plural, name)
        if options.dry_run:
            return WriteResult(obj, created=True, warnings=warnings)
        stored = self.store.put(resource.storage_key, obj, None)
        if resource == CRD_RESOURCE:
            self.register_crd(stored)
        return WriteResult(self.as_version(resource, stored), created=True, warnings=warnings)

    def _generate_name(self, resource: ResourceType, namespace: str | None, prefix: str) -> str:
        for _ in range(100):
            suffix = "".join(secrets.choice(_NAME_SUFFIX_ALPHABET) for _ in range(5))
            candidate = f"{prefix[:58]}{suffix}"
            if self.store.get(resource.storage_key, namespace or "", candidate) is None:
                return candidate
        raise errors.already_exists(resource.group, resource.plural, prefix)

    # -- update / patch ------------------------------------------------------------------------

    def update(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        options: WriteOptions = WriteOptions(),
        subresource: str | None = None,
        require_version: bool = True,
    ) -> WriteResult:
        return self._update(resource, namespace, name, body, options, subresource, require_version)

    def _update(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        options: WriteOptions,
        subresource: str | None,
        require_version: bool,
        patch_strict_errors: Sequence[str] = (),
    ) -> WriteResult:
        old = self.store.get(resource.storage_key, namespace or "", name)
        if old is None:
            raise errors.not_found(resource.group, resource.plural, name)
        candidate = self._check_type(resource, body)
        metadata = candidate.setdefault("metadata", {})
        if metadata.get("name", name) != name:
            raise errors.bad_request(
                f"the name of the object ({metadata['name']}) does not match the name on the URL ({name})"
            )
        if resource.namespaced and metadata.get("namespace", namespace) != namespace:
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        given_version = metadata.get("resourceVersion")
        if not given_version and require_version and resource.crd_name is not None:
            raise errors.invalid(
                resource.group,
                resource.kind,
                name,
                [FieldCause("metadata.resourceVersion", "Invalid value: 0x0: must be specified for an update")],
            )
        if given_version and given_version != old["metadata"]["resourceVersion"]:
            raise errors.conflict(resource.group, resource.plural, name)
        new, warnings = self._merge_write(resource, old, candidate, options, subresource, patch_strict_errors)
        return self._commit(resource, old, new, options, warnings)

    def patch(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        patch: Any,
        content_type: str,
        options: WriteOptions = WriteOptions(),
        subresource: str | None = None,
    ) -> WriteResult:
        old = self.store.get(resource.storage_key, namespace or "", name)
        if old is None:
            raise errors.not_found(resource.group, resource.plural, name)
        candidate = apply_patch(self.as_version(resource, old), patch, content_type, options.field_validation)
        # Decoded strictly (under Warn and Strict only), a JSON patch's operations may hold unknown
        # fields: warned about, or refused under Strict, with the patched object's own.
        strict_errors = (
            unknown_operation_fields(patch)
            if content_type == JSON_PATCH and options.field_validation != "Ignore"
            else []
        )
        try:
            return self._update(
                resource,
                namespace,
                name,
                candidate,
                options,
                subresource,
                require_version=False,
                patch_strict_errors=strict_errors,
            )
        except errors.DecodeError as error:
            # patch.go decodes the patched object itself: what does not decode (a label that is a
            # number, finalizers that are a string, a Secret value that is not base64, an unknown
            # field under Strict) is a 422 Invalid on the field "patch", not the 400 a POST or PUT
            # body gets. kopf and the gateway branch on that 422.
            patched = errors.go_format(patch) if content_type == STRATEGIC_MERGE_PATCH else _compact(candidate)
            raise errors.patch_invalid(patched, error.detail) from error

    def _merge_write(
        self,
        resource: ResourceType,
        old: JsonObj,
        candidate: JsonObj,
        options: WriteOptions,
        subresource: str | None,
        patch_strict_errors: Sequence[str] = (),
    ) -> tuple[JsonObj, list[str]]:
        if subresource == "status":
            if not resource.status_subresource:
                raise errors.not_found(resource.group, f"{resource.plural}/status", old["metadata"]["name"])
            new = copy.deepcopy(old)
            if "status" in candidate:
                new["status"] = candidate["status"]
            else:
                new.pop("status", None)
            new, warnings = self._admit(resource, new, options, only="status", patch_strict_errors=patch_strict_errors)
            return new, warnings
        new = candidate
        new["apiVersion"], new["kind"] = resource.api_version, resource.kind
        metadata = new["metadata"]
        old_metadata = old["metadata"]
        if metadata.get("uid") and metadata["uid"] != old_metadata.get("uid"):
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {metadata['uid']}, "
                f"UID in object meta: {old_metadata.get('uid')}",
                {"name": old_metadata["name"], "kind": resource.plural},
            )
        for server_field in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
            "name",
            "namespace",
        ):
            if server_field in old_metadata:
                metadata[server_field] = old_metadata[server_field]
            else:
                metadata.pop(server_field, None)
        if old_metadata.get("deletionTimestamp"):
            added = set(metadata.get("finalizers") or ()) - set(old_metadata.get("finalizers") or ())
            if added:
                raise errors.invalid(
                    resource.group,
                    resource.kind,
                    old_metadata["name"],
                    [
                        FieldCause(
                            "metadata.finalizers",
                            f"Forbidden: no new finalizers can be added if the object is being "
                            f"deleted, found new finalizers {sorted(added)}",
                            "FieldValueForbidden",
                        )
                    ],
                )
        if resource.status_subresource:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        normalize_builtin(resource.group, resource.plural, new, old)
        new, warnings = self._admit(resource, new, options, patch_strict_errors=patch_strict_errors)
        if resource == CRD_RESOURCE:
            new["status"] = crd_status(new, old.get("status"), now_rfc3339())
        if _content(new, resource.status_subresource) != _content(old, resource.status_subresource):
            new["metadata"]["generation"] = int(old_metadata.get("generation", 1)) + 1
        return new, warnings

    def _commit(
        self, resource: ResourceType, old: JsonObj, new: JsonObj, options: WriteOptions, warnings: list[str]
    ) -> WriteResult:
        if new == old or options.dry_run:
            return WriteResult(self.as_version(resource, new), warnings=warnings)
        metadata = new["metadata"]
        if metadata.get("deletionTimestamp") and not metadata.get("finalizers"):
            # The last finalizer is gone: like kube-apiserver, delete instead of storing the update.
            final = self._remove(resource, metadata.get("namespace"), metadata["name"], new)
            return WriteResult(self.as_version(resource, final), warnings=warnings)
        stored = self.store.put(resource.storage_key, new, old)
        if resource == CRD_RESOURCE:
            self.register_crd(stored)
        return WriteResult(self.as_version(resource, stored), warnings=warnings)

    # -- delete --------------------------------------------------------------------------------

    def delete(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        options: WriteOptions = WriteOptions(),
        preconditions: JsonObj | None = None,
    ) -> JsonObj:
        old = self.store.get(resource.storage_key, namespace or "", name)
        if old is None:
            raise errors.not_found(resource.group, resource.plural, name)
        preconditions = preconditions or {}
        for key in ("uid", "resourceVersion"):
            wanted = preconditions.get(key)
            # Preconditions are *string there: "" is set, and compared (a 409), as kube-apiserver does.
            if wanted is not None and wanted != old["metadata"].get(key):
                raise ApiError(
                    409,
                    "Conflict",
                    f"Precondition failed: {key} in precondition: {wanted}, {key} in "
                    f"object meta: {old['metadata'].get(key)}",
                    {"name": name, "kind": resource.plural},
                )
        if resource == NAMESPACE_RESOURCE and name in IMMORTAL_NAMESPACES:
            # kube-apiserver's NamespaceLifecycle admission refuses these.
            raise errors.forbidden(
                f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                {"name": name, "kind": "namespaces"},
            )
        if options.dry_run:
            return self.as_version(resource, old)
        if resource == NAMESPACE_RESOURCE:
            return self._delete_namespace(old)
        if resource == CRD_RESOURCE:
            return self._delete_crd(old)
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return self.as_version(resource, old)
            return self.as_version(resource, self.store.put(resource.storage_key, self._marked_deleted(old), old))
        return self.as_version(resource, self._remove(resource, namespace, name))

    @staticmethod
    def _marked_deleted(old: JsonObj) -> JsonObj:
        metadata = dict(old["metadata"])
        metadata.update(
            deletionTimestamp=now_rfc3339(),
            deletionGracePeriodSeconds=0,
            generation=int(metadata.get("generation", 1)) + 1,
        )
        return {**old, "metadata": metadata}

    def _remove(
        self, resource: ResourceType, namespace: str | None, name: str, last_state: JsonObj | None = None
    ) -> JsonObj:
        final = self.store.remove(resource.storage_key, namespace or "", name, last_state)
        assert final is not None, "caller checked existence"
        if resource == CRD_RESOURCE:
            self._unregister_crd(final)
        if namespace:
            self._finish_namespace_if_empty(namespace)
        if resource.crd_name:
            self._finish_crd_if_empty(resource.crd_name)
        return final

    def _delete_namespace(self, old: JsonObj) -> JsonObj:
        name = old["metadata"]["name"]
        marked = self._marked_deleted(old)
        marked["status"] = {**(old.get("status") or {}), "phase": "Terminating"}
        current = (
            old
            if old["metadata"].get("deletionTimestamp")
            else self.store.put(NAMESPACE_RESOURCE.storage_key, marked, old)
        )
        # The namespace controller's job, done at once: delete the content; finalizers still hold items.
        for resource in self.registry.all():
            if not resource.namespaced:
                continue
            for obj in list(self.store.select(resource.storage_key, ObjectFilter(namespace=name))):
                if self.store.get(resource.storage_key, name, obj["metadata"]["name"]) is not None:
                    self.delete(resource, name, obj["metadata"]["name"])
        self._finish_namespace_if_empty(name)
        remaining = self.store.get(NAMESPACE_RESOURCE.storage_key, "", name)
        return remaining if remaining is not None else current

    def _finish_namespace_if_empty(self, namespace: str) -> None:
        ns = self.store.get(NAMESPACE_RESOURCE.storage_key, "", namespace)
        if ns is not None and ns["metadata"].get("deletionTimestamp") and self.store.count_in_namespace(namespace) == 0:
            self.store.remove(NAMESPACE_RESOURCE.storage_key, "", namespace)

    # -- CRDs ----------------------------------------------------------------------------------

    def register_crd(self, crd: JsonObj) -> None:
        name = crd["metadata"]["name"]
        old_types = self.registry.unregister_crd(name)
        for resource in crd_resource_types(crd):
            self.registry.register(resource)
        # Watches of a dropped version end; clients re-discover and re-watch.
        for resource in old_types:
            if self.registry.lookup(resource.group, resource.version, resource.plural) is None:
                self.store.close_watchers(resource.storage_key)

    def _delete_crd(self, old: JsonObj) -> JsonObj:
        """kube-apiserver's way: the CRD stays Terminating while its objects are deleted one by one, so
        their finalizers (a kopf operator's delete handlers) still run; it goes once none is left."""
        name = old["metadata"]["name"]
        current = old
        if not old["metadata"].get("deletionTimestamp"):
            marked = self._marked_deleted(old)
            marked["metadata"]["finalizers"] = [*old["metadata"].get("finalizers", []), CRD_CLEANUP_FINALIZER]
            current = self.store.put(CRD_RESOURCE.storage_key, marked, old)
        for resource in {r.storage_key: r for r in self.registry.all() if r.crd_name == name}.values():
            for obj in list(self.store.items(resource.storage_key)):
                metadata = obj["metadata"]
                if self.store.get(resource.storage_key, metadata.get("namespace", ""), metadata["name"]) is not None:
                    self.delete(resource, metadata.get("namespace"), metadata["name"])
        self._finish_crd_if_empty(name)
        remaining = self.store.get(CRD_RESOURCE.storage_key, "", name)
        return self.as_version(CRD_RESOURCE, remaining if remaining is not None else current)

    def _crd_terminating(self, crd_name: str) -> bool:
        crd = self.store.get(CRD_RESOURCE.storage_key, "", crd_name)
        return crd is not None and bool(crd["metadata"].get("deletionTimestamp"))

    def _finish_crd_if_empty(self, crd_name: str) -> None:
        crd = self.store.get(CRD_RESOURCE.storage_key, "", crd_name)
        if crd is None or not crd["metadata"].get("deletionTimestamp"):
            return
        keys = {r.storage_key for r in self.registry.all() if r.crd_name == crd_name}
        if any(next(iter(self.store.items(key)), None) is not None for key in keys):
            return
        finalizers = [f for f in crd["metadata"].get("finalizers", []) if f != CRD_CLEANUP_FINALIZER]
        if finalizers:  # someone else's finalizer still holds the CRD itself
            held = {**crd, "metadata": {**crd["metadata"], "finalizers": finalizers}}
            self.store.put(CRD_RESOURCE.storage_key, held, crd)
            return
        last_state = {**crd, "metadata": {**crd["metadata"], "finalizers": []}}
        self._remove(CRD_RESOURCE, None, crd_name, last_state)

    def _unregister_crd(self, crd: JsonObj) -> None:
        removed = self.registry.unregister_crd(crd["metadata"]["name"])
        keys = {resource.storage_key for resource in removed}
        for key in keys:
            for obj in self.store.drop(key):
                if obj["metadata"].get("namespace"):
                    self._finish_namespace_if_empty(obj["metadata"]["namespace"])
            self.store.close_watchers(key)
