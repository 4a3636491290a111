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


def stored_ready_condition(status: dict[str, Any]) -> ReadyCondition | None:
    """The Ready condition an object carries (what an earlier gateway process wrote), if readable."""
    for item in status.get("conditions") or ():
        if isinstance(item, dict) and item.get("type") == "Ready" and item.get("status") in ("True", "False"):
            when = item.get("lastTransitionTime")
            if isinstance(when, str) and when:
                return ReadyCondition(
                    item["status"], str(item.get("reason") or ""), str(item.get("message") or ""), when
                )
    return None


def never_connected_status(address: str) -> dict[str, Any]:
    """A joined node's status until its agent first registers (as a Node's before its kubelet reports)."""
    condition = ReadyCondition("False", "NeverConnected", "joined; the agent has not connected yet", rfc3339())
    return {"phase": "Pending", "connected": False, "address": address, "conditions": [condition.as_dict()]}


def next_condition(previous: ReadyCondition | None, ready: bool, reason: str, message: str) -> ReadyCondition:
    """Keeps lastTransitionTime unless the Ready status actually flips."""
    status = "True" if ready else "False"
    if previous is not None and previous.status == status:
        return ReadyCondition(status, reason, message, previous.last_transition)
    return ReadyCondition(status, reason, message, rfc3339())


def gpus_to_status(gpus: list[tuple[str, int]]) -> list[dict[str, Any]]:
    return [{"model": model, "memoryMiB": memory} for model, memory in gpus]
