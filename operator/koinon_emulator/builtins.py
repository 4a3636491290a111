"""Server-side behaviour of built-in kinds that clients rely on: what kube-apiserver does to them on
every write (Secret.stringData, Namespace phase) and the checks of theirs that this project's
manifests, charts and clients could fail (Secret data and types, a Deployment's selector, a
NetworkPolicy's ports, peers and CIDRs)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from typing import Any

from . import errors
from .errors import FieldCause
from .labels import label_problems, qualified_name_problem

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
    elif group == "networking.k8s.io" and plural == "networkpolicies":
        _default_network_policy(obj)
        _check_network_policy(obj, name)


def _normalize_secret(obj: JsonObj, old: JsonObj | None, name: str) -> None:
    data = obj.get("data") or {}
    if not isinstance(data, dict):
        raise errors.cannot_decode("Secret", "v1", "data", data, "map[string][]uint8")
    for key, value in list(data.items()):
        # map[string][]byte: decoded from base64 while the request is read (a 400 when it is not).
        # As ConfigMap binaryData: base64 with CR/LF in it (wrapped, as `base64` writes it) is
        # taken and stored unwrapped. A null value decodes to empty bytes, which kube-apiserver
        # serves back as "" (etcd's protobuf returns empty bytes, not nil): kubectl sends one for
        # `data: {KEY: }`, the Python client for data={KEY: None}.
        if value is None:
            data[key] = ""
            continue
        try:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {type(value).__name__}")
            decoded = base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
        except (ValueError, binascii.Error) as error:
            raise errors.DecodeError("Secret", "v1", f"data[{key}]: {error}") from error
        data[key] = base64.b64encode(decoded).decode()
    string_data = obj.pop("stringData", None)
    if string_data is not None:
        # map[string]string: a null value decodes as "".
        if not isinstance(string_data, dict) or not all(v is None or isinstance(v, str) for v in string_data.values()):
            raise errors.DecodeError("Secret", "v1", "stringData values must be strings")
        data = dict(data)
        for key, value in string_data.items():
            data[key] = base64.b64encode((value or "").encode()).decode()
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
                    raise errors.DecodeError("ConfigMap", "v1", f"binaryData[{key}]: {error}") from error
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


# -- NetworkPolicy (networking.k8s.io/v1) ---------------------------------------------------------
# Stored, never enforced (no pods run here), so the agent chart's and the gateway's policies apply;
# validated as kube-apiserver's ValidateNetworkPolicy does, so one a cluster refuses fails here too.

_NP = "NetworkPolicy"
_PROTOCOLS = ("SCTP", "TCP", "UDP")
_POLICY_TYPES = ("Egress", "Ingress")
_PORT_NAME = re.compile(r"[-a-z0-9]+")
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def _default_network_policy(obj: JsonObj) -> None:
    """SetDefaults_NetworkPolicy(Port): podSelector is a plain struct (always serialized), a port
    without protocol is TCP, and policyTypes left out is Ingress, plus Egress when egress rules
    are given."""
    spec = _decoded(obj.get("spec"), _NP, "spec", "v1.NetworkPolicySpec")
    obj["spec"] = spec
    if spec.get("podSelector") is None:
        spec["podSelector"] = {}
    for direction in ("ingress", "egress"):
        rules = _decoded(
            spec.get(direction), _NP, f"spec.{direction}", f"[]v1.NetworkPolicy{direction.title()}Rule", list
        )
        # Each item written back: a null one is the zero rule or port kube-apiserver decodes and
        # stores ({}, its port then defaulted to TCP), and validation reads the stored items.
        for index, rule in enumerate(rules):
            rule = rules[index] = _decoded(rule, _NP, f"spec.{direction}", f"v1.NetworkPolicy{direction.title()}Rule")
            ports = _decoded(rule.get("ports"), _NP, f"spec.{direction}.ports", "[]v1.NetworkPolicyPort", list)
            for port_index, port in enumerate(ports):
                port = ports[port_index] = _decoded(port, _NP, f"spec.{direction}.ports", "v1.NetworkPolicyPort")
                if port.get("protocol") is None:
                    port["protocol"] = "TCP"
    if not spec.get("policyTypes"):
        spec["policyTypes"] = ["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]


def _shown(value: Any) -> str:
    return json.dumps(value)


def _port_number_problem(value: int) -> str:
    return "" if 1 <= value <= 65535 else "must be between 1 and 65535, inclusive"


def _port_name_problems(name: str) -> list[str]:
    """apimachinery's IsValidPortName (an IANA service name)."""
    problems = []
    if len(name) > 15:
        problems.append("must be no more than 15 characters")
    if not _PORT_NAME.fullmatch(name):
        problems.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not re.search("[a-z]", name):
        problems.append("must contain at least one letter (a-z)")
    if "--" in name:
        problems.append("must not contain consecutive hyphens")
    if name.startswith("-") or name.endswith("-"):
        problems.append("must not begin or end with a hyphen")
    return problems


def _label_selector_causes(selector: Any, path: str) -> list[FieldCause]:
    """ValidateLabelSelector: matchLabels as labels, and each expression's key and operator, with
    values exactly when the operator is In or NotIn."""
    selector = _decoded(selector, _NP, path, "v1.LabelSelector")
    match_labels = _decoded(selector.get("matchLabels"), _NP, f"{path}.matchLabels", "map[string]string")
    for value in match_labels.values():
        _decoded(value, _NP, f"{path}.matchLabels", "string", str)
    causes = [FieldCause(f"{path}.matchLabels", cause.message) for cause in label_problems(match_labels)]
    expressions = _decoded(
        selector.get("matchExpressions"), _NP, f"{path}.matchExpressions", "[]v1.LabelSelectorRequirement", list
    )
    for index, expression in enumerate(expressions):
        at = f"{path}.matchExpressions[{index}]"
        expression = _decoded(expression, _NP, f"{path}.matchExpressions", "v1.LabelSelectorRequirement")
        key, operator = expression.get("key") or "", expression.get("operator") or ""
        values = _decoded(expression.get("values"), _NP, f"{path}.matchExpressions.values", "[]string", list)
        if problem := qualified_name_problem(str(key)):
            causes.append(FieldCause(f"{at}.key", f"Invalid value: {_shown(key)}: {problem}"))
        if operator in ("In", "NotIn") and not values:
            causes.append(
                FieldCause(
                    f"{at}.values",
                    "Required value: must be specified when `operator` is 'In' or 'NotIn'",
                    "FieldValueRequired",
                )
            )
        elif operator in ("Exists", "DoesNotExist") and values:
            causes.append(
                FieldCause(
                    f"{at}.values",
                    "Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                    "FieldValueForbidden",
                )
            )
        elif operator not in _SELECTOR_OPERATORS:
            causes.append(
                FieldCause(f"{at}.operator", f"Invalid value: {_shown(operator)}: not a valid selector operator")
            )
    return causes


def _without_leading_zeros(address: str) -> str:
    """``address`` with its IPv4 octets' leading zeros dropped (a whole address, or the dotted tail
    of an IPv6 one): Go's parser before 1.17, which netutils.ParseIPSloppy keeps, reads them as
    decimal, while Python's ipaddress refuses them. (Stripped, not int(): a run of zeros of any
    length is one octet to Go.)"""
    head, colon, tail = address.rpartition(":")
    octets = tail.split(".")
    if len(octets) != 4 or not all(octet.isascii() and octet.isdigit() for octet in octets):
        return address
    return head + colon + ".".join(octet.lstrip("0") or "0" for octet in octets)


def _network(text: str, path: str, causes: list[FieldCause]) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """netutils.ParseCIDRSloppy, which IsValidCIDRForLegacyField uses while the StrictIPCIDRValidation
    gate is off (its default): ADDRESS/PREFIXLEN with the length in decimal digits (ip_network alone
    also took a bare address and a netmask), no IPv6 zone, leading zeros allowed, host bits too."""
    address, slash, length = text.partition("/")
    if slash and length.isascii() and length.isdigit() and "%" not in address:
        try:
            length = length.lstrip("0") or "0"
            return ipaddress.ip_network(f"{_without_leading_zeros(address)}/{length}", strict=False)
        except ValueError:
            pass
    causes.append(
        FieldCause(
            path, f"Invalid value: {_shown(text)}: must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"
        )
    )
    return None


def _ip_block_causes(block: Any, path: str) -> list[FieldCause]:
    """ValidateIPBlock: cidr required and a CIDR; each except a CIDR strictly inside it."""
    block = _decoded(block, _NP, path, "v1.IPBlock")
    cidr = _decoded(block.get("cidr"), _NP, f"{path}.cidr", "string", str)
    if not cidr:
        return [FieldCause(f"{path}.cidr", "Required value", "FieldValueRequired")]
    causes: list[FieldCause] = []
    outer = _network(cidr, f"{path}.cidr", causes)
    for index, text in enumerate(_decoded(block.get("except"), _NP, f"{path}.except", "[]string", list)):
        at = f"{path}.except[{index}]"
        inner = _network(_decoded(text, _NP, f"{path}.except", "string", str), at, causes)
        if outer is None or inner is None:
            continue
        # Go's IPNet.Contains of the except's address, and a longer prefix (so not equal).
        if inner.version != outer.version or inner.network_address not in outer or inner.prefixlen <= outer.prefixlen:
            causes.append(FieldCause(at, f"Invalid value: {_shown(text)}: must be a strict subset of `cidr`"))
    return causes


def _peer_causes(peer: Any, path: str) -> list[FieldCause]:
    """ValidateNetworkPolicyPeer: at least one of podSelector, namespaceSelector, ipBlock, and
    ipBlock alone."""
    peer = _decoded(peer, _NP, path, "v1.NetworkPolicyPeer")
    causes: list[FieldCause] = []
    given = [key for key in ("podSelector", "namespaceSelector", "ipBlock") if peer.get(key) is not None]
    for key in given:
        if key == "ipBlock":
            causes += _ip_block_causes(peer[key], f"{path}.ipBlock")
        else:
            causes += _label_selector_causes(peer[key], f"{path}.{key}")
    if not given:
        causes.append(FieldCause(path, "Required value: must specify a peer", "FieldValueRequired"))
    elif len(given) > 1 and "ipBlock" in given:
        causes.append(
            FieldCause(path, "Forbidden: may not specify both ipBlock and another peer", "FieldValueForbidden")
        )
    return causes


def _port_causes(port: JsonObj, path: str, go_path: str) -> list[FieldCause]:
    """ValidateNetworkPolicyPort: the protocol, a port number or name, endPort only after a port
    number and not below it."""
    causes: list[FieldCause] = []
    protocol = _decoded(port.get("protocol"), _NP, f"{go_path}.protocol", "v1.Protocol", str)
    if protocol not in _PROTOCOLS:
        supported = ", ".join(_shown(p) for p in _PROTOCOLS)
        causes.append(
            FieldCause(
                f"{path}.protocol",
                f"Unsupported value: {_shown(protocol)}: supported values: {supported}",
                "FieldValueNotSupported",
            )
        )
    number, end = port.get("port"), port.get("endPort")
    if number is not None and (isinstance(number, bool) or not isinstance(number, int | str)):
        raise errors.cannot_decode(_NP, "v1", f"{go_path}.port", number, "intstr.IntOrString")
    if end is not None and (isinstance(end, bool) or not isinstance(end, int)):
        raise errors.cannot_decode(_NP, "v1", f"{go_path}.endPort", end, "int32")
    if isinstance(number, int):
        if problem := _port_number_problem(number):
            causes.append(FieldCause(f"{path}.port", f"Invalid value: {number}: {problem}"))
        if end is not None:
            if end < number:
                causes.append(
                    FieldCause(f"{path}.endPort", f"Invalid value: {number}: must be greater than or equal to `port`")
                )
            if problem := _port_number_problem(end):
                causes.append(FieldCause(f"{path}.endPort", f"Invalid value: {end}: {problem}"))
    elif isinstance(number, str):
        if end is not None:
            causes.append(
                FieldCause(f"{path}.endPort", f"Invalid value: {end}: may not be specified when `port` is non-numeric")
            )
        causes += [
            FieldCause(f"{path}.port", f"Invalid value: {_shown(number)}: {problem}")
            for problem in _port_name_problems(number)
        ]
    elif end is not None:
        causes.append(
            FieldCause(f"{path}.endPort", f"Invalid value: {end}: may not be specified when `port` is not specified")
        )
    return causes


def _check_network_policy(obj: JsonObj, name: str) -> None:
    """ValidateNetworkPolicySpec (after defaulting, so the spec and its lists are of their types)."""
    spec = obj["spec"]
    causes = _label_selector_causes(spec["podSelector"], "spec.podSelector")
    for direction, peers in (("ingress", "from"), ("egress", "to")):
        for index, rule in enumerate(spec.get(direction) or ()):
            for port_index, port in enumerate(rule.get("ports") or ()):
                causes += _port_causes(
                    port, f"spec.{direction}[{index}].ports[{port_index}]", f"spec.{direction}.ports"
                )
            listed = _decoded(rule.get(peers), _NP, f"spec.{direction}.{peers}", "[]v1.NetworkPolicyPeer", list)
            for peer_index, peer in enumerate(listed):
                causes += _peer_causes(peer, f"spec.{direction}[{index}].{peers}[{peer_index}]")
    policy_types = _decoded(spec.get("policyTypes"), _NP, "spec.policyTypes", "[]v1.PolicyType", list)
    if len(policy_types) > len(_POLICY_TYPES):
        causes.append(
            FieldCause(
                "spec.policyTypes", f"Invalid value: {_shown(policy_types)}: may not specify more than two policyTypes"
            )
        )
    else:
        supported = ", ".join(_shown(t) for t in _POLICY_TYPES)
        causes += [
            FieldCause(
                f"spec.policyTypes[{index}]",
                f"Unsupported value: {_shown(value)}: supported values: {supported}",
                "FieldValueNotSupported",
            )
            for index, value in enumerate(policy_types)
            if value not in _POLICY_TYPES
        ]
    if causes:
        raise errors.invalid("networking.k8s.io", _NP, name, causes)
