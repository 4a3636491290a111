"""Patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and strategic merge patch.

Strategic merge patch (built-in kinds only: kube-apiserver refuses it for custom resources) merges
maps like a merge patch and merges the lists that kube-apiserver merges by a key (containers and
env by name, volume mounts by mountPath, ...) item by item, with ``$patch: delete`` items,
``$setElementOrder/<list>`` and ``$deleteFromPrimitiveList/<list>``; other lists are replaced, as
there. kubectl apply and helm upgrade send such patches for Deployments and DaemonSets.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .errors import ApiError, bad_request, json_type, unprocessable_patch

JsonObj = dict[str, Any]

# kube-apiserver's bounds on a JSON patch (patch.go): at most this many operations (more: 413), and
# evanphx/json-patch's AccumulatedCopySizeLimit, set from JSONPatchMaxCopyBytes (3 MiB): the JSON
# size of everything `copy` operations duplicate, summed over the patch (more: 422). Without the
# latter, copying a subtree into itself N times makes a 2^N-sized object from a tiny request.
MAX_JSON_PATCH_OPERATIONS = 10_000
JSON_PATCH_MAX_COPY_BYTES = 3 * 1024 * 1024


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: JsonObj = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# The patchMergeKey of the lists of built-in kinds that kube-apiserver merges by key ("ports" is
# decided per list: containerPort in containers, port in Services).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
}


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
    result: JsonObj = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            if isinstance(result.get(name), list) and isinstance(value, list):
                result[name] = [item for item in result[name] if item not in value]
            continue
        if key.startswith("$"):  # $setElementOrder/... (used with its list below), $retainKeys
            continue
        if value is None:
            result.pop(key, None)
            continue
        merge_key = _merge_key(key, value, result.get(key))
        if merge_key is not None:
            order = patch.get(f"$setElementOrder/{key}")
            result[key] = _merge_list(result.get(key), value, merge_key, order)
            continue
        merged = strategic_merge_patch(result.get(key), value)
        if merged is None:
            result.pop(key, None)
        else:
            result[key] = merged
    return result


def _merge_key(field: str, patch_items: Any, current: Any) -> str | None:
    if not isinstance(patch_items, list) or not all(isinstance(item, dict) for item in patch_items):
        return None
    if field == "ports":
        items = [*patch_items, *(current if isinstance(current, list) else [])]
        if any(isinstance(item, dict) and "containerPort" in item for item in items):
            return "containerPort"
        return "port" if any(isinstance(item, dict) and "port" in item for item in items) else None
    return MERGE_KEYS.get(field)


def _merge_list(current: Any, patch_items: list[JsonObj], merge_key: str, order: Any) -> list[Any]:
    if any(item.get("$patch") == "replace" for item in patch_items):
        return [strategic_merge_patch(None, item) for item in patch_items if item.get("$patch") != "replace"]
    result: list[Any] = list(current) if isinstance(current, list) else []
    for item in patch_items:
        at = next(
            (i for i, old in enumerate(result) if isinstance(old, dict) and old.get(merge_key) == item.get(merge_key)),
            None,
        )
        if item.get("$patch") == "delete":
            if at is not None:
                del result[at]
            continue
        merged = strategic_merge_patch(result[at] if at is not None else None, item)
        if at is None:
            result.append(merged)
        else:
            result[at] = merged
    if isinstance(order, list):
        wanted = [entry.get(merge_key) for entry in order if isinstance(entry, dict)]
        position = {key: index for index, key in enumerate(wanted)}
        result.sort(key=lambda item: position.get(item.get(merge_key) if isinstance(item, dict) else None, len(wanted)))
    return result


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer {path!r}: must start with '/'")
    return [_unescape(token) for token in path[1:].split("/")]


def _index(container: list[Any], token: str, path: str, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit():
        raise unprocessable_patch(f"invalid array index {token!r} in {path!r}")
    index = int(token)
    if index > len(container) or (index == len(container) and not allow_end):
        raise unprocessable_patch(f"array index {index} out of bounds in {path!r}")
    return index


def _parent(doc: Any, tokens: list[str], path: str) -> Any:
    current = doc
    for token in tokens[:-1]:
        if isinstance(current, dict):
            if token not in current:
                raise unprocessable_patch(f"doc is missing path: {path!r}")
            current = current[token]
        elif isinstance(current, list):
            current = current[_index(current, token, path, allow_end=False)]
        else:
            raise unprocessable_patch(f"doc is missing path: {path!r}")
    return current


def _get(doc: Any, path: str) -> Any:
    tokens = _pointer(path)
    if not tokens:
        return doc
    parent = _parent(doc, tokens, path)
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, path, allow_end=False)]
    raise unprocessable_patch(f"doc is missing path: {path!r}")


def _remove(doc: Any, path: str) -> Any:
    tokens = _pointer(path)
    if not tokens:
        raise unprocessable_patch("cannot remove the whole document")
    parent = _parent(doc, tokens, path)
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, path, allow_end=False))
    raise unprocessable_patch(f"unable to remove nonexistent key: {path!r}")


def _add(doc: Any, path: str, value: Any, replace: bool) -> Any:
    tokens = _pointer(path)
    if not tokens:
        return value
    parent = _parent(doc, tokens, path)
    last = tokens[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise unprocessable_patch(f"replace operation does not apply: doc is missing key: {path!r}")
        parent[last] = value
    elif isinstance(parent, list):
        index = _index(parent, last, path, allow_end=not replace)
        if replace:
            parent[index] = value
        else:
            parent.insert(index, value)
    else:
        raise unprocessable_patch(f"doc is missing path: {path!r}")
    return doc


def _decode_operations(operations: Any, field_validation: str) -> list[JsonObj]:
    """The operations as kube-apiserver's patch.go reads them. Under fieldValidation Warn (its
    default) or Strict it first decodes the whole patch into []jsonPatchOp{Op, Path, From string;
    Value any}: an item that is not an object, or an op, path or from that is neither a string nor
    null, is a 400 there, before any operation applies. Under Ignore evanphx/json-patch reads them as
    raw JSON and the operation fails later (a 422). A null item decodes as an empty operation, and
    a null patch as no operations (a no-op, 200)."""
    if operations is None:
        return []
    if not isinstance(operations, list):
        raise bad_request("json patch must be a list of operations")
    decoded: list[JsonObj] = []
    for operation in operations:
        if operation is not None and not isinstance(operation, dict):
            raise bad_request(
                f"error decoding patch: json: cannot unmarshal {json_type(operation)} into Go value of type "
                "handlers.jsonPatchOp"
            )
        operation = operation or {}
        if field_validation != "Ignore":
            for key in ("op", "path", "from"):
                value = operation.get(key)
                if value is not None and not isinstance(value, str):
                    raise bad_request(
                        f"error decoding patch: json: cannot unmarshal {json_type(value)} into Go struct field "
                        f"jsonPatchOp.{key} of type string"
                    )
        decoded.append(operation)
    return decoded


def _operation_field(operation: JsonObj, kind: str, key: str) -> str:
    """evanphx/json-patch's Operation.Path()/From() as its ops wrap their errors: a field absent or
    null is "missing value", one that is not a string fails to decode; either fails the op (422)."""
    value = operation.get(key)
    if isinstance(value, str):
        return value
    if key == "path" and kind in ("add", "remove", "copy"):
        reason = "missing value"  # these wrap ErrMissing, whatever the cause
    elif value is None:
        reason = f"operation{',' if key == 'from' else ''} missing {key} field: missing value"
    else:
        reason = f"json: cannot unmarshal {json_type(value)} into Go value of type string"
    raise unprocessable_patch(f"{kind} operation failed to decode {key}: {reason}")


# jsonPatchOp's fields: patch.go decodes the operations into it with kjson.UnmarshalStrict.
_OPERATION_FIELDS = frozenset({"op", "path", "from", "value"})


def unknown_operation_fields(operations: Any) -> list[str]:
    """The strict decoding errors of patch.go's jsonPatchOp decoding (under fieldValidation Warn and
    Strict), as it words them: ``json patch unknown field "[0].valeu"``. (A duplicate field, the
    other strict error, is gone once the body is parsed here.)"""
    if not isinstance(operations, list):
        return []
    return [
        f'json patch unknown field "[{number}].{key}"'
        for number, operation in enumerate(operations)
        if isinstance(operation, dict)
        for key in operation
        if key not in _OPERATION_FIELDS
    ]


def json_patch(target: Any, operations: Any, field_validation: str = "Warn") -> Any:
    """Apply RFC 6902 operations to a deep copy of ``target`` as kube-apiserver does: a patch that
    does not decode is a 400 (see _decode_operations), an operation that fails (a failed ``test``,
    an unknown or absent ``op``, an absent ``path``) a 422. An ``add``, ``replace`` or ``test``
    without a ``value`` takes null, as evanphx/json-patch v4 does (Operation.value() is a nil node,
    which marshals as null): a label added so decodes as "". (A ``test`` without one on an absent or
    null path makes evanphx dereference nil, a 500 in kube-apiserver; here it passes.)"""
    doc = copy.deepcopy(target)
    decoded = _decode_operations(operations, field_validation)
    if len(decoded) > MAX_JSON_PATCH_OPERATIONS:
        raise ApiError(
            413,
            "RequestEntityTooLarge",
            f"Request entity too large: The allowed maximum operations in a JSON patch is "
            f"{MAX_JSON_PATCH_OPERATIONS}, got {len(decoded)}",
        )
    copied_bytes = 0
    for operation in decoded:
        op = operation.get("op")
        kind = op if isinstance(op, str) else "unknown"  # evanphx's Operation.Kind()
        if kind not in ("add", "replace", "test", "remove", "move", "copy"):
            raise unprocessable_patch(f"Unexpected kind: {kind}")
        # move and copy read their "from" before their "path", as evanphx/json-patch does.
        source = _operation_field(operation, kind, "from") if kind in ("move", "copy") else ""
        path = _operation_field(operation, kind, "path")
        value = operation.get("value")
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(value), replace=False)
        elif kind == "replace":
            doc = _add(doc, path, copy.deepcopy(value), replace=True)
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "test":
            try:
                actual = _get(doc, path)
            except ApiError:
                actual = None
            if actual != value:
                raise unprocessable_patch(
                    f"the server rejected our request due to an error in our "
                    f"request: testing value {path} failed: test failed"
                )
        elif kind == "move":
            doc = _add(doc, path, _remove(doc, source), replace=False)
        else:
            original = _get(doc, source)
            # Measured (as the JSON evanphx marshals) before anything is duplicated.
            copied_bytes += len(
                json.dumps(original, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
            )
            if copied_bytes > JSON_PATCH_MAX_COPY_BYTES:
                raise unprocessable_patch(
                    f"Unable to complete the copy, the accumulated size increase of copy is {copied_bytes}, "
                    f"exceeding the limit {JSON_PATCH_MAX_COPY_BYTES}"
                )
            doc = _add(doc, path, copy.deepcopy(original), replace=False)
    return doc


MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


def apply_patch(target: JsonObj, patch: Any, content_type: str, field_validation: str = "Warn") -> Any:
    if content_type == JSON_PATCH:
        return json_patch(target, patch, field_validation)
    if not isinstance(patch, dict):
        raise bad_request("a merge patch must be a JSON object")
    if content_type == MERGE_PATCH:
        return merge_patch(copy.deepcopy(target), patch)
    return strategic_merge_patch(copy.deepcopy(target), patch)
