"""CustomResourceDefinition handling: checking a CRD, turning it into served resource types, its status."""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import FieldCause
from .resources import ResourceType
from .schema import re2_pattern

JsonObj = dict[str, Any]

_LOWER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_crd(crd: JsonObj) -> list[FieldCause]:
    """The checks of kube-apiserver that matter for a usable CRD, as field causes."""
    causes: list[FieldCause] = []
    spec = crd.get("spec")
    if not isinstance(spec, dict):
        return [FieldCause("spec", "Required value", "FieldValueRequired")]
    group, names = spec.get("group"), spec.get("names")
    if not isinstance(group, str) or "." not in group:
        causes.append(FieldCause("spec.group", f"Invalid value: {group!r}: should be a domain with at least one dot"))
    if not isinstance(names, dict):
        causes.append(FieldCause("spec.names", "Required value", "FieldValueRequired"))
        return causes
    plural, kind = names.get("plural"), names.get("kind")
    if not isinstance(plural, str) or not _LOWER_NAME.match(plural):
        causes.append(
            FieldCause(
                "spec.names.plural",
                f"Invalid value: {plural!r}: a lowercase RFC 1123 label is required",
                "FieldValueInvalid",
            )
        )
    if not isinstance(kind, str) or not kind:
        causes.append(FieldCause("spec.names.kind", "Required value", "FieldValueRequired"))
    expected = f"{plural}.{group}"
    if crd.get("metadata", {}).get("name") != expected:
        causes.append(
            FieldCause(
                "metadata.name",
                f'Invalid value: "{crd.get("metadata", {}).get("name")}": must be spec.names.plural+"."+spec.group',
            )
        )
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        causes.append(
            FieldCause(
                "spec.scope",
                f'Unsupported value: "{spec.get("scope")}": supported values: "Cluster", "Namespaced"',
                "FieldValueNotSupported",
            )
        )
    versions = spec.get("versions")
    if not isinstance(versions, list) or not versions:
        causes.append(
            FieldCause("spec.versions", "Invalid value: null: must have exactly one version marked as storage version")
        )
        return causes
    if sum(1 for v in versions if isinstance(v, dict) and v.get("storage")) != 1:
        causes.append(
            FieldCause("spec.versions", "Invalid value: must have exactly one version marked as storage version")
        )
    for index, version in enumerate(versions):
        if not isinstance(version, dict) or not isinstance(version.get("name"), str):
            causes.append(FieldCause(f"spec.versions[{index}].name", "Required value", "FieldValueRequired"))
            continue
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if not isinstance(schema, dict):
            causes.append(
                FieldCause(
                    f"spec.versions[{index}].schema.openAPIV3Schema",
                    "Required value: schemas are required",
                    "FieldValueRequired",
                )
            )
            continue
        causes += _pattern_problems(schema, f"spec.versions[{index}].schema.openAPIV3Schema")
    return causes


def _pattern_problems(schema: Any, path: str) -> list[FieldCause]:
    """kube-apiserver compiles every ``pattern`` of a CRD's schema with Go's regexp (RE2) and refuses
    the CRD when one does not compile: lookarounds and backreferences, which Python's re would take
    (and then match with), are a 422 there."""
    if not isinstance(schema, dict):
        return []
    causes: list[FieldCause] = []
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        try:
            re2_pattern(pattern)
        except ValueError as error:  # Perl syntax that Python's re takes and RE2 refuses
            causes.append(
                FieldCause(
                    f"{path}.pattern",
                    f"Invalid value: {json.dumps(pattern)}: must be a valid regular expression, but isn't: {error}",
                )
            )
    for key in ("properties", "patternProperties", "definitions"):
        for name, sub in (schema.get(key) or {}).items() if isinstance(schema.get(key), dict) else ():
            causes += _pattern_problems(sub, f"{path}.{key}[{name}]")
    for key in ("items", "additionalProperties", "not"):
        causes += _pattern_problems(schema.get(key), f"{path}.{key}")
    for key in ("allOf", "anyOf", "oneOf"):
        for number, sub in enumerate(schema.get(key) or ()) if isinstance(schema.get(key), list) else ():
            causes += _pattern_problems(sub, f"{path}.{key}[{number}]")
    return causes


def crd_resource_types(crd: JsonObj) -> list[ResourceType]:
    spec, name = crd["spec"], crd["metadata"]["name"]
    names = spec["names"]
    types = []
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        types.append(
            ResourceType(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec["scope"] == "Namespaced",
                singular=names.get("singular") or names["kind"].lower(),
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                status_subresource="status" in (version.get("subresources") or {}),
                schema=(version.get("schema") or {}).get("openAPIV3Schema"),
                printer_columns=tuple(version.get("additionalPrinterColumns") or ()),
                selectable_fields=tuple(f["jsonPath"].lstrip(".") for f in version.get("selectableFields") or ()),
                crd_name=name,
            )
        )
    return types


def crd_status(crd: JsonObj, old_status: JsonObj | None, now: str) -> JsonObj:
    """Status as the apiextensions controllers would settle it: names accepted, established."""
    names = crd["spec"]["names"]
    previous = {c.get("type"): c for c in (old_status or {}).get("conditions", []) if isinstance(c, dict)}

    def condition(kind: str, reason: str, message: str) -> JsonObj:
        since = previous.get(kind, {}).get("lastTransitionTime", now)
        return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": since}

    accepted: JsonObj = {
        "plural": names["plural"],
        "singular": names.get("singular") or names["kind"].lower(),
        "kind": names["kind"],
        "listKind": names.get("listKind") or f"{names['kind']}List",
    }
    if names.get("shortNames"):
        accepted["shortNames"] = list(names["shortNames"])
    if names.get("categories"):
        accepted["categories"] = list(names["categories"])
    stored = list((old_status or {}).get("storedVersions") or [])
    storage = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
    if storage not in stored:
        stored.append(storage)
    return {
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "acceptedNames": accepted,
        "storedVersions": stored,
    }
