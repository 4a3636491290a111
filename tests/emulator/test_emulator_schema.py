"""Structural schema processing, selectors, patches and JSONPath as plain functions."""

from __future__ import annotations

from typing import Any

import pytest
from koinon_emulator.errors import ApiError
from koinon_emulator.jsonpath import find
from koinon_emulator.patching import json_patch, merge_patch, strategic_merge_patch
from koinon_emulator.schema import admit
from koinon_emulator.selectors import parse_label_selector
from koinon_emulator.tables import human_duration

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 2, "maxLength": 5, "pattern": "^[a-z]+$"},
                "port": {"x-kubernetes-int-or-string": True},
                "when": {"type": "string", "format": "date-time"},
                "ratio": {"type": "number", "minimum": 0, "maximum": 1},
                "maybe": {"type": "string", "nullable": True},
                "gone": {"type": "string"},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "env": {"type": "object", "additionalProperties": {"type": "integer"}},
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 2,
                    "items": {"type": "object", "properties": {"n": {"type": "integer", "default": 7}}},
                },
                "nested": {
                    "type": "object",
                    "default": {},
                    "properties": {
                        "deep": {
                            "type": "object",
                            "default": {},
                            "properties": {"x": {"type": "string", "default": "d"}},
                        }
                    },
                },
            },
        },
    },
}


def _messages(spec: dict[str, Any]) -> dict[str, str]:
    return {cause.field: cause.message for cause in admit({"spec": spec}, SCHEMA).causes}


def test_defaults_apply_recursively_and_inside_arrays() -> None:
    result = admit({"spec": {"name": "ab", "items": [{}, {"n": 1}]}}, SCHEMA)
    assert not result.causes
    assert result.obj["spec"]["nested"] == {"deep": {"x": "d"}}
    assert result.obj["spec"]["items"] == [{"n": 7}, {"n": 1}]


def test_pruning_keeps_preserved_and_additional_properties() -> None:
    spec = {"name": "ab", "junk": 1, "free": {"any": {"thing": 1}}, "env": {"A": 1}, "items": [{"n": 1, "x": 2}]}
    result = admit({"spec": spec, "top": 1}, SCHEMA)
    assert sorted(result.unknown_fields) == ["spec.items[0].x", "spec.junk", "top"]
    assert result.obj["spec"]["free"] == {"any": {"thing": 1}} and result.obj["spec"]["env"] == {"A": 1}
    assert "top" not in result.obj


def test_nulls_dropped_unless_nullable() -> None:
    result = admit({"spec": {"name": "ab", "maybe": None, "gone": None}}, SCHEMA)
    assert not result.causes
    assert result.obj["spec"]["maybe"] is None and "gone" not in result.obj["spec"]


def test_validation_messages_follow_kubernetes_wording() -> None:
    messages = _messages(
        {"name": "A", "ratio": 2, "port": 1.5, "when": "yesterday", "env": {"A": "x"}, "items": [{}, {}, {}]}
    )
    assert messages["spec.name"].startswith('Invalid value: "A": spec.name in body should')
    assert messages["spec.ratio"] == "Invalid value: 2: spec.ratio in body should be less than or equal to 1"
    assert "int-or-string" in messages["spec.port"]
    assert messages["spec.when"] == (
        'Invalid value: "yesterday": spec.when in body must be of type date-time: "yesterday"'
    )
    assert messages["spec.env[A]"].endswith('must be of type integer: "string"')
    assert messages["spec.items"] == "Too many: 3: must have at most 2 items"
    assert _messages({}) == {"spec.name": "Required value"}
    assert admit({"spec": {"name": "ab", "port": "http"}}, SCHEMA).causes == []


def test_status_only_admission_leaves_spec_alone() -> None:
    result = admit({"spec": {"bogus": 1}, "status": {"x": 1}}, SCHEMA, only="status")
    assert result.obj["spec"] == {"bogus": 1} and result.causes == []


def test_label_selector_parsing() -> None:
    requirements = parse_label_selector("a=1,b!=2,c in (x, y),d notin (z),e,!f,g==3")
    labels = {"a": "1", "b": "3", "c": "y", "e": "", "g": "3"}
    assert all(req.matches(labels) for req in requirements)
    with pytest.raises(ApiError):
        parse_label_selector("a in ()")


def test_patches() -> None:
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {"a": {"c": 2, "d": 3}}
    assert strategic_merge_patch(
        {"a": {"b": 1}, "l": [1]}, {"a": {"$patch": "replace", "c": 1}, "$setElementOrder/l": [1]}
    ) == {"a": {"c": 1}, "l": [1]}
    doc = {"m": {"f": ["x"]}}
    patched = json_patch(
        doc,
        [
            {"op": "add", "path": "/m/f/-", "value": "y"},
            {"op": "move", "from": "/m/f", "path": "/m/g"},
            {"op": "copy", "from": "/m/g/0", "path": "/m/h"},
            {"op": "replace", "path": "/m/h", "value": "z"},
        ],
    )
    assert patched == {"m": {"g": ["x", "y"], "h": "z"}} and doc == {"m": {"f": ["x"]}}
    with pytest.raises(ApiError) as failed:
        json_patch(doc, [{"op": "test", "path": "/m/f/0", "value": "nope"}])
    assert failed.value.code == 422


def test_jsonpath_and_durations() -> None:
    obj = {
        "status": {"conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]},
        "metadata": {"labels": {"app.kubernetes.io/name": "k"}},
    }
    assert find(obj, '.status.conditions[?(@.type=="Ready")].status') == ["True"]
    assert find(obj, ".status.conditions[*].type") == ["A", "Ready"]
    assert find(obj, "{.metadata.labels['app.kubernetes.io/name']}") == ["k"]
    assert find(obj, ".status.conditions[1].type") == ["Ready"]
    assert find(obj, ".missing.path") == []
    assert [human_duration(s) for s in (5, 150, 3600 * 5 + 60, 3600 * 30, 86400 * 3)] == [
        "5s",
        "2m30s",
        "5h1m",
        "30h",
        "3d",
    ]
