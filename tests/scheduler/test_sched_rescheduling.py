"""Failover when a node is lost mid-job, and backoff when the job itself fails."""

from __future__ import annotations

from koinon_operator.scheduler import (
    FailJob,
    Gpu,
    Ignore,
    JobAttemptState,
    JobRequest,
    NodeSnapshot,
    Reschedule,
    on_job_failed,
    on_node_lost,
    schedule,
)

NOW = 5000.0


def _nodes() -> list[NodeSnapshot]:
    return [
        NodeSnapshot(f"n{i}", f"o{i}", "eu", True, False, (Gpu("A", 16384),), 1, 4.0, 10.0 + i, NOW) for i in range(3)
    ]


def test_lost_node_leads_to_a_retry_elsewhere_without_spending_backoff() -> None:
    nodes = _nodes()
    job = JobRequest("ns/train")
    (first,) = schedule([job], nodes, NOW).placements
    lost = first.nodes[0]
    state = JobAttemptState("ns/train", attempt=0, backoff_limit=0, assigned_nodes=first.nodes)
    action = on_node_lost(state, lost)
    assert isinstance(action, Reschedule)
    assert action.excluded_nodes == {lost} and action.attempt == 0 and not action.counts_against_backoff
    # The lost node may even be back and the best scored: it stays excluded.
    retry = JobRequest("ns/train", excluded_nodes=action.excluded_nodes, attempt=action.attempt)
    (second,) = schedule([retry], nodes, NOW).placements
    assert lost not in second.nodes


def test_losing_an_unrelated_node_changes_nothing() -> None:
    state = JobAttemptState("ns/train", attempt=0, backoff_limit=1, assigned_nodes=("n1",))
    assert isinstance(on_node_lost(state, "n2"), Ignore)


def test_job_failures_count_against_backoff_limit() -> None:
    state = JobAttemptState("ns/train", attempt=0, backoff_limit=1, assigned_nodes=("n1",))
    first = on_job_failed(state, "n1", "exit code 1")
    assert isinstance(first, Reschedule) and first.counts_against_backoff and first.attempt == 1
    state = JobAttemptState(
        "ns/train", attempt=1, backoff_limit=1, assigned_nodes=("n2",), excluded_nodes=first.excluded_nodes
    )
    final = on_job_failed(state, "n2", "exit code 1")
    assert isinstance(final, FailJob) and "BackoffLimitExceeded" in final.reason
