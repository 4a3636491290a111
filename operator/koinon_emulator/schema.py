"""Structural-schema processing of custom resources: pruning, defaulting and validation.

Follows the order of kube-apiserver: drop unknown fields (or report them under
``fieldValidation=Strict``) and nulls of non-nullable fields, apply ``default`` values, then validate.
Messages use the Kubernetes wording (``spec.replicas in body should be greater than or equal to 1``)
so clients print what they would print against a real cluster. CEL rules
(``x-kubernetes-validations``) are not evaluated.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .errors import FieldCause

JsonObj = dict[str, Any]
ROOT_RESERVED = ("apiVersion", "kind", "metadata")


@dataclass
class SchemaResult:
    obj: JsonObj
    unknown_fields: list[str] = field(default_factory=list)
    causes: list[FieldCause] = field(default_factory=list)


def admit(obj: JsonObj, schema: JsonObj | None, *, only: str | None = None) -> SchemaResult:
    """Prune, default and validate ``obj`` (a deep copy is processed; the input is left alone).

    ``only`` restricts processing to one top-level field (``"status"`` for status writes, where the
    rest of the object was already admitted).
    """
    result = SchemaResult(copy.deepcopy(obj))
    if not schema:
        return result
    properties = schema.get("properties", {})
    for key in list(result.obj):
        if key in ROOT_RESERVED or (only is not None and key != only):
            continue
        if key not in properties and not _preserves(schema):
            result.unknown_fields.append(key)
            del result.obj[key]
            continue
        value = result.obj[key]
        sub = properties.get(key)
        if value is None and sub is not None and not sub.get("nullable"):
            del result.obj[key]
            continue
        if sub is not None:
            result.obj[key] = _prune(value, sub, key, result.unknown_fields)
    for key, sub in properties.items():
        if key in ROOT_RESERVED or (only is not None and key != only):
            continue
        if key not in result.obj and "default" in sub:
            result.obj[key] = copy.deepcopy(sub["default"])
        if key in result.obj:
            result.obj[key] = _default(result.obj[key], sub)
    for key in schema.get("required", []):
        if key not in result.obj and key not in ROOT_RESERVED and (only is None or key == only):
            result.causes.append(FieldCause(key, "Required value", "FieldValueRequired"))
    for key, sub in properties.items():
        if key in ROOT_RESERVED or key not in result.obj or (only is not None and key != only):
            continue
        _validate(result.obj[key], sub, key, result.causes)
    return result


def _preserves(schema: JsonObj) -> bool:
    return bool(schema.get("x-kubernetes-preserve-unknown-fields"))


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _prune(value: Any, schema: JsonObj, path: str, unknown: list[str]) -> Any:
    if isinstance(value, dict) and not schema.get("x-kubernetes-int-or-string"):
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        embedded = schema.get("x-kubernetes-embedded-resource")
        for key in list(value):
            sub = properties.get(key)
            if sub is None and isinstance(additional, dict):
                sub = additional
            if value[key] is None and sub is not None and not sub.get("nullable"):
                del value[key]
                continue
            if sub is not None:
                value[key] = _prune(value[key], sub, _child(path, key), unknown)
            elif not (_preserves(schema) or additional is True or (embedded and key in ROOT_RESERVED)):
                unknown.append(_child(path, key))
                del value[key]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        for index, item in enumerate(value):
            value[index] = _prune(item, items, f"{path}[{index}]", unknown)
    return value


def _default(value: Any, schema: JsonObj) -> Any:
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _default(value[key], sub)
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            for key in value:
                if key not in schema.get("properties", {}):
                    value[key] = _default(value[key], additional)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            value[index] = _default(item, schema["items"])
    return value


def show(value: Any) -> str:
    """A value as Kubernetes prints it in field errors (strings quoted, numbers bare)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


_TYPE_CHECKS = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    # kube-openapi takes a float64 as an integer only when whole and within 2^53 (a JSON integer
    # beyond int64 is decoded as a float64 first, see requests.as_go_decodes).
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer() and abs(v) <= 2.0**53)
    ),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


# kube-openapi's strfmt (RFC 3339 as kube-apiserver checks `format: date` and `date-time`): a date is
# exactly YYYY-MM-DD (Go's time.Parse("2006-01-02"): a real day); a date-time is lowercased and split
# on "t", the part before the first "t" a date, the part after it a time with seconds and a
# mandatory offset WITH a colon ("z" or +hh:mm). So a space separator, no offset or "+0100" fail
# there, as they fail here. ("." is any character there too, and parts after a second "t" are not
# looked at: quirks kept so that the emulator takes exactly what a cluster takes.)
_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_TIME = re.compile(r"([0-9]{2}):([0-9]{2}):([0-9]{2})(.[0-9]+)?(z|([+-][0-9]{2}:[0-9]{2}))")


def is_date(value: str) -> bool:
    """strfmt.IsDate: time.Parse("2006-01-02", value)."""
    if (match := _DATE.fullmatch(value)) is None:
        return False
    try:
        datetime.date(*(int(part) for part in match.groups()))
    except ValueError:
        return False
    return True


def is_date_time(value: str) -> bool:
    """strfmt.IsDateTime, as kube-openapi writes it."""
    parts = value.lower().split("t")
    if len(value) < 4 or len(parts) < 2 or not is_date(parts[0]):
        return False
    # Go's `$` is the end of the text (fullmatch), not "or before a final newline" like Python's.
    if (match := _TIME.fullmatch(parts[1])) is None:
        return False
    hour, minute, second = match.group(1, 2, 3)
    return hour <= "23" and minute <= "59" and second <= "59"


# What Go's RE2 refuses where Python's re takes it (lookarounds, atomic groups, backreferences,
# comments): kube-apiserver refuses a CRD whose pattern does not compile (must be RE2 syntax).
_PERL_ONLY = ("(?=", "(?!", "(?<=", "(?<!", "(?>", "(?P=", "(?#")
_MULTILINE_FLAG = re.compile(r"\(\?[imsU-]*m[imsU-]*[:)]")


def re2_pattern(pattern: str) -> str:
    r"""A CRD ``pattern`` (Go RE2 syntax, as kube-apiserver matches it) rewritten for Python's re.

    Without the ``m`` flag, RE2's ``$`` matches only at the end of the text; Python's also matches
    before a final newline, so "ABC\n" would pass '^[A-Z]{3}$' here and be a 422 on a cluster:
    ``$`` outside a character class becomes ``\Z`` (and RE2's ``\z`` too). Raises ValueError, with
    RE2's wording, for syntax RE2 does not have.
    """
    multiline = _MULTILINE_FLAG.search(pattern) is not None  # then `$` means the same in both
    out: list[str] = []
    index, in_class = 0, False
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            escaped = pattern[index + 1]
            # A lone \1..\9 is a backreference to Python; RE2 has none (it reads \12 as octal).
            if escaped in "123456789" and not in_class and not pattern[index + 2 : index + 3].isdigit():
                raise ValueError(f"error parsing regexp: invalid escape sequence: `\\{escaped}`")
            out.append("\\Z" if escaped == "z" and not in_class else pattern[index : index + 2])
            index += 2
            continue
        if in_class:
            if char == "]":
                in_class = False
        elif char == "[":
            in_class = True
            out.append(char)
            index += 1
            # A "]" first in a class (after an optional "^") is a literal one, in both syntaxes.
            if pattern.startswith("^", index):
                out.append("^")
                index += 1
            if pattern.startswith("]", index):
                out.append("]")
                index += 1
            continue
        elif char == "(" and (construct := next((c for c in _PERL_ONLY if pattern.startswith(c, index)), None)):
            raise ValueError(f"error parsing regexp: invalid or unsupported Perl syntax: `{construct}`")
        elif char == "$" and not multiline:
            char = "\\Z"
        out.append(char)
        index += 1
    return "".join(out)


@lru_cache(maxsize=512)
def _compiled(pattern: str) -> re.Pattern[str]:
    # re.ASCII: RE2's \d, \s and \w are ASCII-only (Python's would take Arabic digits, and count a
    # no-break space as whitespace, refusing `\S` values a cluster stores).
    return re.compile(re2_pattern(pattern), re.ASCII)


def _format_ok(fmt: str, value: str) -> bool:
    try:
        if fmt == "date-time":
            return is_date_time(value)
        if fmt == "date":
            # Not date.fromisoformat: since Python 3.11 it also takes "20240501" and "2024-W18-3".
            return is_date(value)
        elif fmt == "uuid":
            uuid.UUID(value)
        elif fmt == "int32":
            return -(2**31) <= int(value) < 2**31
        elif fmt == "int64":
            return -(2**63) <= int(value) < 2**63
        elif fmt == "byte":
            import base64

            base64.b64decode(value, validate=True)
        elif fmt == "email":
            return bool(re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", value))
        elif fmt == "hostname":
            return bool(re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", value))
        elif fmt in ("ipv4", "ipv6", "ip"):
            import ipaddress

            ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _validate(value: Any, schema: JsonObj, path: str, causes: list[FieldCause]) -> None:
    def fail(message: str, reason: str = "FieldValueInvalid") -> None:
        causes.append(FieldCause(path, message, reason))

    def invalid(detail: str) -> None:
        fail(f"Invalid value: {show(value)}: {path} in body {detail}")

    if value is None:
        if not schema.get("nullable"):
            fail(
                f'Invalid value: "null": {path} in body must be of type {schema.get("type", "object")}: "null"',
                "FieldValueTypeInvalid",
            )
        return
    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, (int, str)) and not isinstance(value, bool)):
            fail(
                f"Invalid value: {show(value)}: {path} in body must be of type int-or-string: "
                f"{json.dumps(type(value).__name__)}",
                "FieldValueTypeInvalid",
            )
            return
    elif (kind := schema.get("type")) in _TYPE_CHECKS and not _TYPE_CHECKS[kind](value):
        actual = {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), "number")
        fail(
            f'Invalid value: {show(value)}: {path} in body must be of type {kind}: "{actual}"', "FieldValueTypeInvalid"
        )
        return

    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(show(v) for v in schema["enum"])
        fail(f"Unsupported value: {show(value)}: supported values: {supported}", "FieldValueNotSupported")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _validate_number(value, schema, invalid)
    if isinstance(value, str):
        _validate_string(value, schema, path, invalid)
    if isinstance(value, list):
        _validate_array(value, schema, path, causes, invalid)
    if isinstance(value, dict):
        _validate_object(value, schema, path, causes, invalid)
    _validate_combinators(value, schema, path, causes, invalid)


def _validate_number(value: float, schema: JsonObj, invalid: Any) -> None:
    if (low := schema.get("minimum")) is not None:
        if schema.get("exclusiveMinimum") is True and value <= low:
            invalid(f"should be greater than {show(low)}")
        elif value < low:
            invalid(f"should be greater than or equal to {show(low)}")
    if (high := schema.get("maximum")) is not None:
        if schema.get("exclusiveMaximum") is True and value >= high:
            invalid(f"should be less than {show(high)}")
        elif value > high:
            invalid(f"should be less than or equal to {show(high)}")
    if (step := schema.get("multipleOf")) and not _float_is_integer(value / step):
        invalid(f"should be a multiple of {show(step)}")


def _float_is_integer(number: float) -> bool:
    """go-openapi's swag.IsFloat64AJSONInteger: integral within a relative error of 1e-9."""
    nearest = round(number)
    return number == nearest or abs(number - nearest) / max(abs(number) + abs(nearest), 1e-300) < 1e-9


def _validate_string(value: str, schema: JsonObj, path: str, invalid: Any) -> None:
    if (low := schema.get("minLength")) is not None and len(value) < low:
        invalid(f"should be at least {low} chars long")
    if (high := schema.get("maxLength")) is not None and len(value) > high:
        invalid(f"should be at most {high} chars long")
    if (pattern := schema.get("pattern")) and not _compiled(pattern).search(value):
        invalid(f"should match '{pattern}'")
    if (fmt := schema.get("format")) and not _format_ok(fmt, value):
        invalid(f"must be of type {fmt}: {json.dumps(value)}")


def _validate_array(value: list[Any], schema: JsonObj, path: str, causes: list[FieldCause], invalid: Any) -> None:
    if (low := schema.get("minItems")) is not None and len(value) < low:
        invalid(f"should have at least {low} items")
    if (high := schema.get("maxItems")) is not None and len(value) > high:
        causes.append(FieldCause(path, f"Too many: {len(value)}: must have at most {high} items", "FieldValueTooMany"))
    if schema.get("uniqueItems") or schema.get("x-kubernetes-list-type") == "set":
        seen: list[Any] = []
        for index, item in enumerate(value):
            if item in seen:
                causes.append(FieldCause(f"{path}[{index}]", f"Duplicate value: {show(item)}", "FieldValueDuplicate"))
            seen.append(item)
    if isinstance(items := schema.get("items"), dict):
        for index, item in enumerate(value):
            _validate(item, items, f"{path}[{index}]", causes)


def _validate_object(value: JsonObj, schema: JsonObj, path: str, causes: list[FieldCause], invalid: Any) -> None:
    for key in schema.get("required", []):
        if key not in value:
            causes.append(FieldCause(_child(path, key), "Required value", "FieldValueRequired"))
    if (low := schema.get("minProperties")) is not None and len(value) < low:
        invalid(f"should have at least {low} properties")
    if (high := schema.get("maxProperties")) is not None and len(value) > high:
        invalid(f"should have at most {high} properties")
    properties = schema.get("properties", {})
    additional = schema.get("additionalProperties")
    for key, item in value.items():
        if key in properties:
            _validate(item, properties[key], _child(path, key), causes)
        elif isinstance(additional, dict):
            _validate(item, additional, f"{path}[{key}]", causes)


def _validate_combinators(value: Any, schema: JsonObj, path: str, causes: list[FieldCause], invalid: Any) -> None:
    for sub in schema.get("allOf", []):
        _validate(value, sub, path, causes)
    if (any_of := schema.get("anyOf")) and not any(_passes(value, sub, path) for sub in any_of):
        invalid("must validate at least one schema (anyOf)")
    if (one_of := schema.get("oneOf")) and sum(_passes(value, sub, path) for sub in one_of) != 1:
        invalid("must validate one and only one schema (oneOf)")
    if (negated := schema.get("not")) is not None and _passes(value, negated, path):
        invalid("must not validate the schema (not)")


def _passes(value: Any, schema: JsonObj, path: str) -> bool:
    trial: list[FieldCause] = []
    _validate(value, schema, path, trial)
    return not trial
