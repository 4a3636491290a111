"""Label keys and values as kube-apiserver validates them (apimachinery's IsQualifiedName and
IsValidLabelValue): a write with a malformed one gets 422, so the emulator refuses it too."""

from __future__ import annotations

import re
from collections.abc import Mapping

from .errors import FieldCause

_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_VALUE_HELP = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
    "and must start and end with an alphanumeric character"
)


def qualified_name_problem(key: str) -> str:
    """Why ``key`` is not a qualified name ("prefix/name" or "name"); "" when it is."""
    prefix, slash, name = key.rpartition("/")
    if slash and not (prefix and len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain"
    if not name or len(name) > 63 or not _NAME.fullmatch(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
            "with an alphanumeric character, at most 63 characters"
        )
    return ""


def label_problems(labels: Mapping[str, str]) -> list[FieldCause]:
    causes: list[FieldCause] = []
    for key, value in labels.items():
        if problem := qualified_name_problem(key):
            causes.append(FieldCause("metadata.labels", f"Invalid value: {key!r}: {problem}"))
        if value and (len(value) > 63 or not _NAME.fullmatch(value)):
            causes.append(FieldCause("metadata.labels", f"Invalid value: {value!r}: {_VALUE_HELP} (at most 63)"))
    return causes
