"""Label and field selectors (``?labelSelector=`` / ``?fieldSelector=``) parsed once, matched per object."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import bad_request

JsonObj = dict[str, Any]

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET_RE = re.compile(rf"^\s*({_KEY})\s+(in|notin)\s+\((.*)\)\s*$")
_CMP_RE = re.compile(rf"^\s*({_KEY})\s*(==|!=|=|>|<)\s*({_VALUE})\s*$")
_EXISTS_RE = re.compile(rf"^\s*(!?)\s*({_KEY})\s*$")
_VALUE_RE = re.compile(rf"^{_VALUE}$")


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    operator: str  # in, notin, exists, !exists, gt, lt
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "exists":
            return present
        if self.operator == "!exists":
            return not present
        if self.operator == "in":
            return present and labels[self.key] in self.values
        if self.operator == "notin":
            return not present or labels[self.key] not in self.values
        if not present:
            return False
        try:
            actual, bound = int(labels[self.key]), int(next(iter(self.values)))
        except ValueError:
            return False
        return actual > bound if self.operator == "gt" else actual < bound


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses: ``a in (x,y),b`` has two requirements."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part for part in parts if part.strip()]


def parse_label_selector(text: str) -> list[LabelRequirement]:
    requirements = []
    for part in _split_top_level(text):
        if match := _SET_RE.match(part):
            values = [v.strip() for v in match.group(4).split(",") if v.strip()]
            if not values or not all(_VALUE_RE.match(v) for v in values):
                raise bad_request(f"unable to parse requirement: invalid values in {part.strip()!r}")
            requirements.append(LabelRequirement(match.group(1), match.group(3), frozenset(values)))
        elif match := _CMP_RE.match(part):
            key, op, value = match.group(1), match.group(3), match.group(4)
            operator = {"=": "in", "==": "in", "!=": "notin", ">": "gt", "<": "lt"}[op]
            requirements.append(LabelRequirement(key, operator, frozenset([value])))
        elif match := _EXISTS_RE.match(part):
            operator = "!exists" if match.group(1) else "exists"
            requirements.append(LabelRequirement(match.group(2), operator, frozenset()))
        else:
            raise bad_request(f"unable to parse requirement: found {part.strip()!r}, expected a selector")
    return requirements


@dataclass(frozen=True)
class FieldRequirement:
    path: str
    value: str
    negate: bool

    def matches(self, obj: JsonObj, getter: Callable[[JsonObj, str], str]) -> bool:
        equal = getter(obj, self.path) == self.value
        return not equal if self.negate else equal


def parse_field_selector(text: str, allowed: Callable[[str], bool]) -> list[FieldRequirement]:
    requirements = []
    for part in _split_top_level(text):
        for op in ("!=", "==", "="):
            if op in part:
                path, value = (s.strip() for s in part.split(op, 1))
                break
        else:
            raise bad_request(f"invalid selector: {text!r}; can't understand {part!r}")
        if not allowed(path):
            raise bad_request(
                f'"{path}" is not a known field selector: only "metadata.name", '
                '"metadata.namespace" and resource-specific fields are supported'
            )
        requirements.append(FieldRequirement(path, value, op == "!="))
    return requirements


def field_value(obj: JsonObj, path: str) -> str:
    """The string form of a dotted field, as field selectors compare it (missing → empty string)."""
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, dict):
            return ""
        current = current.get(part)
    if current is None:
        return ""
    if isinstance(current, bool):
        return "true" if current else "false"
    return str(current)


@dataclass(frozen=True)
class ObjectFilter:
    """Namespace + label + field selection, shared by list and watch."""

    namespace: str | None = None
    labels: tuple[LabelRequirement, ...] = ()
    fields: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: JsonObj) -> bool:
        metadata = obj.get("metadata", {})
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        if self.labels:
            labels = metadata.get("labels") or {}
            if not all(req.matches(labels) for req in self.labels):
                return False
        return all(req.matches(obj, field_value) for req in self.fields)

    def with_field(self, path: str, value: str) -> ObjectFilter:
        return ObjectFilter(self.namespace, self.labels, (*self.fields, FieldRequirement(path, value, False)))


def build_filter(
    namespace: str | None,
    label_selector: str | None,
    field_selector: str | None,
    allowed_field: Callable[[str], bool],
) -> ObjectFilter:
    labels = tuple(parse_label_selector(label_selector)) if label_selector else ()
    fields = tuple(parse_field_selector(field_selector, allowed_field)) if field_selector else ()
    return ObjectFilter(namespace, labels, fields)
