"""Kubernetes-style conditions, updated without losing ``lastTransitionTime`` on no-op writes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    *,
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    now: str,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """Return a new list with the condition ``type_`` set; the transition time moves only when
    the status value changes (as in Kubernetes' meta.SetStatusCondition)."""
    status_text = "Unknown" if status is None else ("True" if status else "False")
    updated: list[dict[str, Any]] = []
    found = False
    for existing in conditions:
        item = dict(existing)
        if item.get("type") == type_:
            found = True
            if item.get("status") != status_text:
                item["lastTransitionTime"] = now
            item.update(status=status_text, reason=reason, message=message)
            if generation is not None:
                item["observedGeneration"] = generation
        updated.append(item)
    if not found:
        new: dict[str, Any] = {
            "type": type_,
            "status": status_text,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
        }
        if generation is not None:
            new["observedGeneration"] = generation
        updated.append(new)
    return updated


def condition_status(conditions: Sequence[Mapping[str, Any]], type_: str) -> str | None:
    for item in conditions:
        if item.get("type") == type_:
            value = item.get("status")
            return str(value) if value is not None else None
    return None
