"""Kubernetes ``Status`` errors as the API server returns them.

kubectl and kopf parse these bodies (``kind: Status``, ``reason``, ``details.causes``) to print
messages and to decide on retries, so the shapes and wording follow kube-apiserver.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

JsonObj = dict[str, Any]


@dataclass(frozen=True)
class FieldCause:
    """One field-level problem; rendered as ``field: message`` like Kubernetes field errors."""

    field: str
    message: str
    reason: str = "FieldValueInvalid"

    def render(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def as_json(self) -> JsonObj:
        return {"reason": self.reason, "message": self.message, "field": self.field}


class ApiError(Exception):
    """An error that becomes a ``Status`` response with ``code`` as the HTTP status."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: JsonObj | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> JsonObj:
        body: JsonObj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if not self.reason:
            del body["reason"]  # StatusReasonUnknown: omitted (omitempty), as kube-apiserver writes it
        if self.details is not None:
            body["details"] = self.details
        return body


def _qualified(group: str, name: str) -> str:
    return f"{name}.{group}" if group else name


def _details(group: str, kind: str, name: str) -> JsonObj:
    details: JsonObj = {"name": name, "kind": kind}
    if group:
        details["group"] = group
    return details


def not_found(group: str, plural: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{_qualified(group, plural)} "{name}" not found', _details(group, plural, name))


def already_exists(group: str, plural: str, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{_qualified(group, plural)} "{name}" already exists',
        _details(group, plural, name),
    )


def conflict(group: str, plural: str, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_qualified(group, plural)} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        _details(group, plural, name),
    )


def invalid(group: str, kind: str, name: str, causes: list[FieldCause]) -> ApiError:
    rendered = [cause.render() for cause in causes]
    summary = rendered[0] if len(rendered) == 1 else "[" + ", ".join(rendered) + "]"
    details = _details(group, kind, name)
    details["causes"] = [cause.as_json() for cause in causes]
    return ApiError(422, "Invalid", f'{_qualified(group, kind)} "{name}" is invalid: {summary}', details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def json_type(value: Any) -> str:
    """The JSON type of ``value``, as Go's decoder names it in its errors."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else "null"


class DecodeError(ApiError):
    """A body kube-apiserver's decoder cannot turn into its Go type: a 400 on create and update,
    ``Kind in version "v1" cannot be handled as a Kind: DETAIL``. A patch whose *result* does not
    decode is answered differently (see ``patch_invalid``), quoting only ``detail``."""

    def __init__(self, kind: str, version: str, detail: str) -> None:
        super().__init__(400, "BadRequest", f'{kind} in version "{version}" cannot be handled as a {kind}: {detail}')
        self.detail = detail


def type_meta_error(key: str, value: Any) -> DecodeError:
    """An ``apiVersion`` or ``kind`` that is not a string: kube-apiserver's json serializer reads them
    into TypeMeta's strings before it knows the kind (its Interpret), so the 400 quotes only that
    error; a patch whose result holds one is a 422 on "patch", as for other decoding errors."""
    detail = (
        f"couldn't get version/kind; json parse error: json: cannot unmarshal {json_type(value)} "
        f"into Go struct field .{key} of type string"
    )
    error = DecodeError("", "", detail)
    error.message = detail
    error.args = (detail,)
    return error


def cannot_decode(kind: str, version: str, field: str, value: Any, go_type: str) -> DecodeError:
    """kube-apiserver's answer to a body its Go types cannot hold (a string for a list, a number
    for a string): the decoding fails, a 400 before any validation, naming the field."""
    return DecodeError(
        kind,
        version,
        f"json: cannot unmarshal {json_type(value)} into Go struct field {kind}.{field} of type {go_type}",
    )


def go_format(value: Any) -> str:
    """``value`` as Go's ``fmt.Sprintf("%+v", ...)`` prints what kjson decoded: maps with sorted keys."""
    if isinstance(value, dict):
        return "map[" + " ".join(f"{key}:{go_format(value[key])}" for key in sorted(value)) + "]"
    if isinstance(value, list):
        return "[" + " ".join(go_format(item) for item in value) + "]"
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def patch_invalid(patched: str, detail: str) -> ApiError:
    """patch.go's answer when the patched object does not decode (or, under fieldValidation=Strict,
    decodes with unknown fields): not the 400 a POST or PUT body gets, but
    ``errors.NewInvalid(schema.GroupKind{}, "", field.Invalid(field.NewPath("patch"), patched, err))``,
    a 422 Invalid with no kind or name. ``patched`` is the patched object's JSON (merge and JSON
    patch) or the patch as Go prints it (strategic merge patch)."""
    cause = FieldCause("patch", f"Invalid value: {json.dumps(patched, ensure_ascii=False)}: {detail}")
    return ApiError(422, "Invalid", f' "" is invalid: {cause.render()}', {"causes": [cause.as_json()]})


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def method_not_allowed(message: str) -> ApiError:
    return ApiError(405, "MethodNotAllowed", message)


def unsupported_media_type(content_type: str, custom_resource: bool = False) -> ApiError:
    if custom_resource:
        return ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types include: "
            f"application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml "
            f"(got {content_type!r}: custom resources take no strategic merge patch)",
        )
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types include: "
        f"application/json, application/merge-patch+json, application/json-patch+json, "
        f"application/strategic-merge-patch+json (got {content_type!r}; the Koinon Kubernetes API "
        f"emulator does not implement protobuf bodies or server-side apply)",
    )


def not_acceptable(accept: str) -> ApiError:
    return ApiError(406, "NotAcceptable", f"only application/json responses are available, not {accept!r}")


def forbidden(message: str, details: JsonObj | None = None) -> ApiError:
    return ApiError(403, "Forbidden", message, details)


def unprocessable_patch(message: str) -> ApiError:
    # kube-apiserver answers failed JSON-patch `test` ops with 422; kopf relies on it to retry.
    return ApiError(422, "Invalid", message)
