"""``meta.k8s.io/v1`` Table responses (``kubectl get`` output), from CRD ``additionalPrinterColumns``."""

from __future__ import annotations

import datetime
import json
from typing import Any

from .jsonpath import find
from .resources import ResourceType

JsonObj = dict[str, Any]

_NAME_COLUMN: JsonObj = {
    "name": "Name",
    "type": "string",
    "format": "name",
    "priority": 0,
    "description": "Name must be unique within a namespace.",
}
_AGE_COLUMN: JsonObj = {
    "name": "Age",
    "type": "date",
    "jsonPath": ".metadata.creationTimestamp",
    "description": "CreationTimestamp is a timestamp representing the server time when this object was created.",
}

# Shown as kubectl shows a selector (format_label_selector), not as JSON; recognised by identity,
# so no CRD's printer column can ask for it.
_POD_SELECTOR_COLUMN: JsonObj = {"name": "Pod-Selector", "type": "string", "jsonPath": ".spec.podSelector"}

# Columns kubectl users expect for a few built-ins; everything else gets Name + Age.
_BUILTIN_COLUMNS: dict[tuple[str, str], tuple[JsonObj, ...]] = {
    ("", "namespaces"): ({"name": "Status", "type": "string", "jsonPath": ".status.phase"}, _AGE_COLUMN),
    ("", "events"): (
        {"name": "Type", "type": "string", "jsonPath": ".type"},
        {"name": "Reason", "type": "string", "jsonPath": ".reason"},
        {"name": "Object", "type": "string", "jsonPath": ".involvedObject.name"},
        {"name": "Message", "type": "string", "jsonPath": ".message"},
        _AGE_COLUMN,
    ),
    ("", "secrets"): ({"name": "Type", "type": "string", "jsonPath": ".type"}, _AGE_COLUMN),
    ("networking.k8s.io", "networkpolicies"): (_POD_SELECTOR_COLUMN, _AGE_COLUMN),
}


def format_label_selector(selector: Any) -> str:
    """metav1.FormatLabelSelector, as kubectl shows a selector: ``app=a,tier in (x,y),!gone``;
    ``<none>`` for the empty selector, which selects everything."""
    if not isinstance(selector, dict):
        return "<none>"
    parts = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or ():
        if not isinstance(expression, dict):
            continue
        key, operator, values = expression.get("key"), expression.get("operator"), expression.get("values") or []
        if operator in ("In", "NotIn"):
            parts.append(f"{key} {operator.lower()} ({','.join(sorted(map(str, values)))})")
        elif operator == "Exists":
            parts.append(str(key))
        elif operator == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts) or "<none>"


def human_duration(seconds: float) -> str:
    """The short age format of Kubernetes (``duration.HumanDuration``): 45s, 3m20s, 5h, 2d3h."""
    total = int(seconds)
    if total < -1:
        return "<invalid>"
    if total < 0:
        return "0s"
    if total < 120:
        return f"{total}s"
    minutes = total // 60
    if minutes < 10:
        return f"{minutes}m" if total % 60 == 0 else f"{minutes}m{total % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = total // 3600
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 8760}y" if days == 0 else f"{hours // 8760}y{days}d"
    return f"{hours // 8760}y"


def _age(timestamp: Any) -> str | None:
    if not isinstance(timestamp, str):
        return None
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return human_duration((datetime.datetime.now(datetime.UTC) - then).total_seconds())


def printer_columns(resource: ResourceType) -> tuple[JsonObj, ...]:
    if resource.printer_columns:
        return resource.printer_columns
    return _BUILTIN_COLUMNS.get((resource.group, resource.plural), (_AGE_COLUMN,))


def column_definitions(resource: ResourceType) -> list[JsonObj]:
    definitions = [dict(_NAME_COLUMN)]
    for column in printer_columns(resource):
        definitions.append(
            {
                "name": column["name"],
                "type": column.get("type", "string"),
                "format": column.get("format", ""),
                "description": column.get("description", ""),
                "priority": int(column.get("priority", 0)),
            }
        )
    return definitions


def _cell(column: JsonObj, obj: JsonObj) -> Any:
    try:
        values = find(obj, column.get("jsonPath", ""))
    except ValueError:
        return None
    if not values:
        return None
    value = values[0]
    if column is _POD_SELECTOR_COLUMN:
        return format_label_selector(value)
    kind = column.get("type", "string")
    if kind == "date":
        return _age(value)
    if kind == "integer" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _row_object(obj: JsonObj, include_object: str) -> JsonObj | None:
    if include_object == "None":
        return None
    if include_object == "Object":
        return obj
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}


def table(
    resource: ResourceType,
    objects: list[JsonObj],
    *,
    api_version: str = "meta.k8s.io/v1",
    include_object: str = "Metadata",
    list_metadata: JsonObj | None = None,
    with_columns: bool = True,
) -> JsonObj:
    columns = printer_columns(resource)
    rows = []
    for obj in objects:
        row: JsonObj = {"cells": [obj["metadata"]["name"], *(_cell(c, obj) for c in columns)]}
        row_object = _row_object(obj, include_object)
        if row_object is not None:
            row["object"] = row_object
        rows.append(row)
    result: JsonObj = {"kind": "Table", "apiVersion": api_version, "metadata": list_metadata or {}}
    if with_columns:
        result["columnDefinitions"] = column_definitions(resource)
    result["rows"] = rows
    return result
