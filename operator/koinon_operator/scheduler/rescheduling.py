"""What to do with a job attempt when a node is lost or the job fails (pure decisions)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class JobAttemptState:
    key: str
    attempt: int
    """Attempts that counted against `backoffLimit` so far."""
    backoff_limit: int
    assigned_nodes: tuple[str, ...]
    excluded_nodes: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Reschedule:
    """Place the job again (same attempt number unless the job itself failed)."""

    excluded_nodes: frozenset[str]
    attempt: int
    counts_against_backoff: bool
    reason: str


@dataclass(frozen=True, slots=True)
class FailJob:
    reason: str


@dataclass(frozen=True, slots=True)
class Ignore:
    reason: str


Action = Reschedule | FailJob | Ignore


def on_node_lost(state: JobAttemptState, node: str) -> Action:
    """A node of the attempt vanished: fail over elsewhere, excluding it, without spending backoff
    (the job did nothing wrong). A node the attempt does not use changes nothing."""
    if node not in state.assigned_nodes:
        return Ignore(f"node {node} does not run {state.key}")
    return Reschedule(
        excluded_nodes=state.excluded_nodes | {node},
        attempt=state.attempt,
        counts_against_backoff=False,
        reason=f"NodeLost: {node} stopped heartbeating while running {state.key}",
    )


def on_job_failed(state: JobAttemptState, node: str, message: str = "") -> Action:
    """The job's own process failed: counts against `backoffLimit`; the node is excluded from the
    retry so a broken machine cannot eat all attempts."""
    used = state.attempt + 1
    detail = f": {message}" if message else ""
    if used > state.backoff_limit:
        return FailJob(f"BackoffLimitExceeded: {used} failed attempts (backoffLimit {state.backoff_limit}){detail}")
    return Reschedule(
        excluded_nodes=state.excluded_nodes | {node},
        attempt=used,
        counts_against_backoff=True,
        reason=f"AttemptFailed on {node}{detail}",
    )
