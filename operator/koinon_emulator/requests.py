"""Parsing of API request URLs, query parameters and headers into typed values."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from . import errors
from .resources import ResourceRegistry, ResourceType
from .selectors import ObjectFilter, build_filter
from .service import WriteOptions

JsonObj = dict[str, Any]


@dataclass(frozen=True)
class ResourcePath:
    """``/api/v1/namespaces/ns/pods/name/status`` split into its parts."""

    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None
    legacy_watch: bool


def parse_resource_path(parts: list[str], registry: ResourceRegistry) -> ResourcePath | None:
    """``parts`` starts after ``/api/{v}`` or ``/apis/{g}/{v}``; ``None`` when it names no resource."""
    if len(parts) < 2:
        return None
    if parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    legacy_watch = bool(rest) and rest[0] == "watch"
    if legacy_watch:
        rest = rest[1:]
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        scoped = registry.lookup(group, version, rest[2])
        if scoped is not None and scoped.namespaced:
            namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        return None
    return ResourcePath(
        group,
        version,
        rest[0],
        namespace,
        rest[1] if len(rest) > 1 else None,
        rest[2] if len(rest) > 2 else None,
        legacy_watch,
    )


def table_request(accept: str) -> str | None:
    """The Table apiVersion asked for by ``Accept: application/json;as=Table;v=v1;g=meta.k8s.io``."""
    for entry in accept.split(","):
        params = dict(part.strip().split("=", 1) for part in entry.split(";")[1:] if "=" in part)
        if params.get("as") == "Table" and params.get("g") == "meta.k8s.io":
            return f"meta.k8s.io/{params.get('v', 'v1')}"
    return None


def partial_metadata_request(accept: str) -> bool:
    return "as=PartialObjectMetadata" in accept


def write_options(request: web.Request) -> WriteOptions:
    dry_run = request.query.getall("dryRun", [])
    validation = request.query.get("fieldValidation", "Warn")
    if validation not in ("Strict", "Warn", "Ignore"):
        raise errors.bad_request(f'fieldValidation must be one of "Ignore", "Warn" or "Strict", got "{validation}"')
    if any(value != "All" for value in dry_run):
        raise errors.bad_request(f"dryRun values must be All, got {dry_run}")
    return WriteOptions(dry_run=bool(dry_run), field_validation=validation)


def delete_options(request: web.Request, body: Any) -> WriteOptions:
    """The query's write options, with DeleteOptions' ``dryRun`` from the body: client-go (``kubectl
    delete --dry-run=server``) sends it there, not in the query."""
    if body is not None and not isinstance(body, dict):
        raise errors.bad_request(
            'DeleteOptions in version "v1" cannot be handled as a DeleteOptions: json: cannot unmarshal '
            f"{errors.json_type(body)} into Go value of type v1.DeleteOptions"
        )
    options = write_options(request)
    dry_run = body.get("dryRun") if isinstance(body, dict) else None
    if dry_run:
        if dry_run != ["All"]:
            raise errors.bad_request(f"dryRun values must be All, got {dry_run!r}")
        options = replace(options, dry_run=True)
    return options


def delete_preconditions(body: Any) -> JsonObj | None:
    """DeleteOptions.preconditions, of the type it decodes into ({uid, resourceVersion}, strings):
    anything else is kube-apiserver's decoding error, a 400 (here it was an AttributeError, a 500)."""
    preconditions = body.get("preconditions") if isinstance(body, dict) else None
    if preconditions is None:
        return None
    if not isinstance(preconditions, dict):
        raise errors.cannot_decode("DeleteOptions", "v1", "preconditions", preconditions, "v1.Preconditions")
    for key in ("uid", "resourceVersion"):
        value = preconditions.get(key)
        if value is not None and not isinstance(value, str):
            raise errors.cannot_decode("DeleteOptions", "v1", f"preconditions.{key}", value, "string")
    return preconditions


_ALWAYS_SELECTABLE = ("metadata.name", "metadata.namespace")
_BUILTIN_SELECTABLE: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "events"): ("involvedObject.", "reason", "reportingComponent", "source", "type"),
    ("", "secrets"): ("type",),
    ("", "pods"): ("spec.nodeName", "status.phase", "spec.restartPolicy"),
    ("", "namespaces"): ("status.phase",),
}


def selectable(resource: ResourceType, path: str) -> bool:
    if path in _ALWAYS_SELECTABLE or path in resource.selectable_fields:
        return True
    allowed = _BUILTIN_SELECTABLE.get((resource.group, resource.plural), ())
    return any(path == item or (item.endswith(".") and path.startswith(item)) for item in allowed)


def object_filter(request: web.Request, resource: ResourceType, namespace: str | None) -> ObjectFilter:
    return build_filter(
        namespace,
        request.query.get("labelSelector"),
        request.query.get("fieldSelector"),
        lambda path: selectable(resource, path),
    )


async def json_body(request: web.Request) -> Any:
    content_type = request.content_type
    raw = await request.read()
    if "protobuf" in content_type or "cbor" in content_type:
        raise errors.unsupported_media_type(content_type)
    if not raw:
        return None
    try:
        # NaN and Infinity are not JSON: Python would accept them, kube-apiserver refuses them.
        document = json.loads(raw, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as error:
        raise errors.bad_request(f"the request body is not valid JSON: {error}") from error
    except RecursionError as error:
        raise errors.bad_request("the request body is not valid JSON: nested too deeply") from error
    if _depth(document) > MAX_NESTING:
        # Everything after this (schema, patches, copies) recurses: past Python's stack that was a
        # 500 with no word on why.
        raise errors.bad_request(
            f"the request body is nested deeper than {MAX_NESTING} levels (this emulator's limit; "
            "kube-apiserver's is 10000)"
        )
    return as_go_decodes(document)


# Deep enough for any real object; shallow enough for the emulator's recursive walks.
MAX_NESTING = 200
_INT64 = range(-(2**63), 2**63)
# Floats that are whole and at most 2^53 come back from kube-apiserver as integers (Go prints the
# float64 2.0 as 2), and are integers to its schema checks.
_EXACT_FLOAT = 2.0**53


def _depth(document: Any) -> int:
    deepest, stack = 0, [(document, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_NESTING:
            break
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    return deepest


def as_go_decodes(value: Any) -> Any:
    """Numbers as kube-apiserver holds them: an integer beyond int64 is a float64 (and so not an
    integer to the schema), a whole float64 within 2^53 is served as an integer."""
    if isinstance(value, dict):
        return {key: as_go_decodes(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_go_decodes(item) for item in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value not in _INT64:
        return float(value)
    if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_FLOAT:
        return int(value)
    return value


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def query_int(request: web.Request, name: str, default: int) -> int:
    """A non-negative integer query parameter; anything else is a 400, as kube-apiserver answers."""
    text = request.query.get(name, "")
    if not text:
        return default
    value = parse_uint(text, 2**63 - 1)  # kube-apiserver parses these as int64 (strconv.ParseInt)
    if value is None:
        raise errors.bad_request(f"{name}: expected a non-negative integer, got {text[:64]!r}")
    return value


def parse_uint(text: str, maximum: int) -> int | None:
    """``text`` as Go's strconv parses an unsigned decimal up to ``maximum``, or None: digits only
    (no sign, space or "_", which int() would take), and the range checked on the digits before
    int() runs: it refuses strings of more than 4300 digits with a ValueError (a 500 here before)."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(maximum)) or int(digits) > maximum:
        return None
    return int(digits)


# kube-apiserver's limit on a request body (its MaxRequestBodyBytes): larger writes get a 413.
MAX_REQUEST_BODY_BYTES = 3 * 1024 * 1024


def encode_continue(snapshot_id: str, start: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps([snapshot_id, *start]).encode()).decode()


def decode_continue(token: str) -> tuple[str, tuple[str, str]]:
    """(snapshot id, key of the last item served)."""
    try:
        snapshot_id, namespace, name = json.loads(base64.urlsafe_b64decode(token.encode()))
        return str(snapshot_id), (str(namespace), str(name))
    except (ValueError, TypeError, binascii.Error) as error:
        raise errors.bad_request(f"continue key is not valid: {error}") from error
