"""VolunteerNode status documents written by the gateway."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any


def rfc3339(when: dt.datetime | None = None) -> str:
    return (when or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ReadyCondition:
    status: str  # "True" | "False"
    reason: str
    message: str
    last_transition: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": "Ready",
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": self.last_transition,
        }


def next_condition(previous: ReadyCondition | None, ready: bool, reason: str, message: str) -> ReadyCondition:
    """Keeps lastTransitionTime unless the Ready status actually flips."""
    status = "True" if ready else "False"
    if previous is not None and previous.status == status:
        return ReadyCondition(status, reason, message, previous.last_transition)
    return ReadyCondition(status, reason, message, rfc3339())


def gpus_to_status(gpus: list[tuple[str, int]]) -> list[dict[str, Any]]:
    return [{"model": model, "memoryMiB": memory} for model, memory in gpus]
