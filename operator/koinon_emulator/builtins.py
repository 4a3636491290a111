"""Server-side behaviour of built-in kinds that clients rely on: what kube-apiserver does to them on
every write (Secret.stringData, Namespace phase) and the checks of theirs that this project's
manifests, charts and clients could fail (Secret data and types, a Deployment's selector)."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from . import errors
from .errors import FieldCause

JsonObj = dict[str, Any]

# Secret data keys: kube-apiserver's IsConfigMapKey.
_DATA_KEY = re.compile(r"[-._a-zA-Z0-9]+")
# Keys a Secret of each type must hold (kube-apiserver's ValidateSecret).
_REQUIRED_SECRET_KEYS = {
    "kubernetes.io/tls": ("tls.crt", "tls.key"),
    "kubernetes.io/basic-auth": (),
    "kubernetes.io/dockerconfigjson": (".dockerconfigjson",),
}


def normalize_builtin(group: str, plural: str, obj: JsonObj, old: JsonObj | None = None) -> None:
    """Apply in place what the real API server does to these kinds on every write; raise its
    error where it would refuse the object."""
    name = str((obj.get("metadata") or {}).get("name", ""))
    if group == "" and plural == "secrets":
        _normalize_secret(obj, old, name)
        _check_immutable(obj, old, name, "Secret", ("data",))
    elif group == "" and plural == "configmaps":
        _check_configmap_data(obj)
        _check_immutable(obj, old, name, "ConfigMap", ("data", "binaryData"))
    elif group == "" and plural == "namespaces":
        status = obj.setdefault("status", {})
        if isinstance(status, dict):
            status.setdefault("phase", "Active")
    elif group == "apps" and plural in ("deployments", "statefulsets", "daemonsets", "replicasets"):
        _check_selector(obj, name, kind={"deployments": "Deployment", "statefulsets": "StatefulSet",
                                         "daemonsets": "DaemonSet", "replicasets": "ReplicaSet"}[plural])  # fmt: skip


def _normalize_secret(obj: JsonObj, old: JsonObj | None, name: str) -> None:
    data = obj.get("data") or {}
    if not isinstance(data, dict):
        raise errors.bad_request("Secret.data must be a map of keys to base64 strings")
    for key, value in data.items():
        # map[string][]byte: decoded from base64 while the request is read (a 400 when it is not).
        try:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {type(value).__name__}")
            base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error) as error:
            raise errors.bad_request(
                f'Secret in version "v1" cannot be handled as a Secret: data[{key}]: {error}'
            ) from error
    string_data = obj.pop("stringData", None)
    if string_data is not None:
        if not isinstance(string_data, dict) or not all(isinstance(v, str) for v in string_data.values()):
            raise errors.bad_request(
                'Secret in version "v1" cannot be handled as a Secret: stringData values must be strings'
            )
        data = dict(data)
        for key, value in string_data.items():
            data[key] = base64.b64encode(value.encode()).decode()
        obj["data"] = data
    obj.setdefault("type", "Opaque")
    key_help = "a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
    causes = [
        FieldCause(f"data[{key}]", f"Invalid value: {key!r}: {key_help}")
        for key in data
        if not _DATA_KEY.fullmatch(str(key))
    ]
    causes += [
        FieldCause(f"data[{key}]", "Required value")
        for key in _REQUIRED_SECRET_KEYS.get(str(obj["type"]), ())
        if key not in data
    ]
    if old is not None and old.get("type", "Opaque") != obj["type"]:
        causes.append(FieldCause("type", f"Invalid value: {obj['type']!r}: field is immutable"))
    if causes:
        raise errors.invalid("", "Secret", name, causes)


def _check_configmap_data(obj: JsonObj) -> None:
    """data is map[string]string and binaryData map[string][]byte (base64): anything else fails
    to decode in kube-apiserver, a 400 (stored as it came, a number then broke every reader).

    As Go's decoder does, a null value is taken: into a string it decodes as "" (stored so), into
    []byte as nil (kept null), which is what kubectl sends for `data: {KEY: }` and the Python client
    for None; and base64 is decoded ignoring CR and LF (line-wrapped, as `base64` writes it),
    stored as it is served back: unwrapped."""
    for field, go_type in (("data", "string"), ("binaryData", "[]uint8")):
        values = obj.get(field)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise errors.cannot_decode("ConfigMap", "v1", field, values, f"map[string]{go_type}")
        for key, value in list(values.items()):
            if value is None:
                if field == "data":
                    values[key] = ""
                continue
            if not isinstance(value, str):
                raise errors.cannot_decode("ConfigMap", "v1", field, value, go_type)
            if field == "binaryData":
                try:
                    decoded = base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
                except (ValueError, binascii.Error) as error:
                    raise errors.bad_request(
                        f'ConfigMap in version "v1" cannot be handled as a ConfigMap: binaryData[{key}]: {error}'
                    ) from error
                values[key] = base64.b64encode(decoded).decode()


def _check_immutable(obj: JsonObj, old: JsonObj | None, name: str, kind: str, fields: tuple[str, ...]) -> None:
    """ValidateConfigMapUpdate / ValidateSecretUpdate: once ``immutable: true`` is set, neither it
    nor the data may change (422); the object can only be deleted and created again."""
    if old is None or old.get("immutable") is not True:
        return
    immutable = "field is immutable when `immutable` is set"
    causes = (
        [FieldCause("immutable", f"Forbidden: {immutable}", "FieldValueForbidden")]
        if obj.get("immutable") is not True
        else []
    )
    causes += [
        FieldCause(key, f"Forbidden: {immutable}", "FieldValueForbidden")
        for key in fields
        if (obj.get(key) or {}) != (old.get(key) or {})
    ]
    if causes:
        raise errors.invalid("", kind, name, causes)


def _decoded(value: Any, kind: str, field: str, go_type: str, expected: type = dict) -> Any:
    """``value`` if it is of the JSON type ``go_type`` decodes from (absent or null: empty);
    else kube-apiserver's decoding error, a 400 (here it was an AttributeError, a 500)."""
    if value is None:
        return expected()
    if not isinstance(value, expected):
        raise errors.cannot_decode(kind, "v1", field, value, go_type)
    return value


def _check_workload_types(spec: Any, kind: str) -> None:
    """The parts of a workload's spec _check_selector reads, of the types they decode into."""
    spec = _decoded(spec, kind, "spec", f"v1.{kind}Spec")
    selector = _decoded(spec.get("selector"), kind, "spec.selector", "v1.LabelSelector")
    match_labels = _decoded(selector.get("matchLabels"), kind, "spec.selector.matchLabels", "map[string]string")
    _decoded(
        selector.get("matchExpressions"), kind, "spec.selector.matchExpressions", "[]v1.LabelSelectorRequirement", list
    )
    template = _decoded(spec.get("template"), kind, "spec.template", "v1.PodTemplateSpec")
    template_meta = _decoded(template.get("metadata"), kind, "spec.template.metadata", "v1.ObjectMeta")
    labels = _decoded(template_meta.get("labels"), kind, "spec.template.metadata.labels", "map[string]string")
    for field, values in (("spec.selector.matchLabels", match_labels), ("spec.template.metadata.labels", labels)):
        for value in values.values():
            _decoded(value, kind, field, "string", str)
    pod_spec = _decoded(template.get("spec"), kind, "spec.template.spec", "v1.PodSpec")
    containers = _decoded(pod_spec.get("containers"), kind, "spec.template.spec.containers", "[]v1.Container", list)
    for container in containers:
        container = _decoded(container, kind, "spec.template.spec.containers", "v1.Container")
        for field in ("name", "image"):
            _decoded(container.get(field), kind, f"spec.template.spec.containers.{field}", "string", str)


def _check_selector(obj: JsonObj, name: str, kind: str) -> None:
    _check_workload_types(obj.get("spec"), kind)
    spec = obj.get("spec") or {}
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    causes: list[FieldCause] = []
    if not selector and not (spec.get("selector") or {}).get("matchExpressions"):
        causes.append(FieldCause("spec.selector", "Required value"))
    elif any(labels.get(key) != value for key, value in selector.items()):
        causes.append(
            FieldCause(
                "spec.template.metadata.labels",
                f"Invalid value: {labels!r}: `selector` does not match template `labels`",
            )
        )
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers")
    if not containers:
        causes.append(FieldCause("spec.template.spec.containers", "Required value"))
    else:
        for index, container in enumerate(containers):
            for required in ("name", "image"):
                if not (isinstance(container, dict) and container.get(required)):
                    causes.append(FieldCause(f"spec.template.spec.containers[{index}].{required}", "Required value"))
    if causes:
        raise errors.invalid("apps", kind, name, causes)
