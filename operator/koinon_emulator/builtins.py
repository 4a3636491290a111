"""Server-side behaviour of built-in kinds that clients rely on (Secret.stringData, Namespace phase)."""

from __future__ import annotations

import base64
from typing import Any

JsonObj = dict[str, Any]


def normalize_builtin(group: str, plural: str, obj: JsonObj) -> None:
    """Apply in place what the real API server does to these kinds on every write."""
    if group != "":
        return
    if plural == "secrets":
        string_data = obj.pop("stringData", None)
        if isinstance(string_data, dict):
            data = dict(obj.get("data") or {})
            for key, value in string_data.items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data
        obj.setdefault("type", "Opaque")
    elif plural == "namespaces":
        status = obj.setdefault("status", {})
        if isinstance(status, dict):
            status.setdefault("phase", "Active")
