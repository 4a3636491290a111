"""Reputation model: bounds, monotonicity, decay, status round trip, owner pooling."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from koinon_operator.scheduler import (
    DEFAULT_CONFIG,
    FRESH,
    ReputationConfig,
    ReputationEvidence,
    decayed,
    from_status,
    lower_bound,
    record_agreement,
    record_disagreement,
    record_failure,
    record_success,
    score,
    to_status,
    uptime,
)
from koinon_operator.scheduler.reputation import owner_extra_disagreements

RC = DEFAULT_CONFIG.reputation
NOW = 1_000_000.0

counts = st.floats(min_value=0, max_value=500, allow_nan=False)
evidence = st.builds(
    ReputationEvidence,
    successes=counts,
    failures=counts,
    timeouts=counts,
    agreements=counts,
    disagreements=counts,
    heartbeats_seen=counts,
    heartbeats_missed=counts,
    consecutive_valid=st.integers(0, 100),
    last_updated=st.floats(min_value=0, max_value=NOW),
)


@settings(max_examples=60, deadline=None)
@given(evidence)
def test_scores_are_bounded(ev: ReputationEvidence) -> None:
    for value in (score(ev, NOW, RC), lower_bound(ev, NOW, RC), uptime(ev)):
        assert 0.0 <= value <= 1.0
    assert lower_bound(ev, NOW, RC) <= score(ev, NOW, RC) + 1e-12


@settings(max_examples=60, deadline=None)
@given(evidence)
def test_more_successes_never_lower_and_disagreements_never_raise(ev: ReputationEvidence) -> None:
    better = record_agreement(record_success(ev, NOW, RC), NOW, RC)
    worse = record_disagreement(ev, NOW, RC)
    failed = record_failure(ev, NOW, RC)
    for fn in (score, lower_bound):
        base = fn(ev, NOW, RC)
        assert fn(better, NOW, RC) >= base - 1e-12
        assert fn(worse, NOW, RC) <= base + 1e-12
        assert fn(failed, NOW, RC) <= base + 1e-12


def test_disagreement_costs_far_more_than_a_failure() -> None:
    proven = ReputationEvidence(successes=20, agreements=20, last_updated=NOW)
    after_failure = lower_bound(record_failure(proven, NOW, RC), NOW, RC)
    after_lie = lower_bound(record_disagreement(proven, NOW, RC), NOW, RC)
    assert after_lie < after_failure - 0.1
    assert record_disagreement(ReputationEvidence(consecutive_valid=12), NOW, RC).consecutive_valid == 0


def _quarantined_until(
    disagreements: int, record: Callable[[ReputationEvidence, float, ReputationConfig], ReputationEvidence]
) -> int:
    """How many results of ``record`` (record_success or record_agreement) lift a node with
    ``disagreements`` out of quarantine (beta mean >= `quarantine_below`)."""
    ev = FRESH
    for _ in range(disagreements):
        ev = record_disagreement(ev, NOW, RC)
    for n in range(100):
        if score(ev, NOW, RC) >= DEFAULT_CONFIG.scoring.quarantine_below:
            return n
        ev = record(ev, NOW, RC)
    raise AssertionError("never left quarantine")


def test_quarantine_thresholds_are_those_the_config_states() -> None:
    """`ScoringConfig.quarantine_below`'s docstring: one disagreement keeps a node quarantined until
    3 unchecked successes or 2 agreements, two until 6 successes or 3 agreements (the review found
    it said "two before ~8": (r + 1) / (r + 22) < 0.25 holds for r < 6)."""
    assert _quarantined_until(1, record_success) == 3
    assert _quarantined_until(1, record_agreement) == 2
    assert _quarantined_until(2, record_success) == 6
    assert _quarantined_until(2, record_agreement) == 3


@settings(max_examples=50, deadline=None)
@given(evidence, st.floats(min_value=1, max_value=1e8))
def test_decay_moves_toward_the_prior(ev: ReputationEvidence, elapsed: float) -> None:
    prior = RC.prior_alpha / (RC.prior_alpha + RC.prior_beta)
    now = ev.last_updated
    before = score(ev, now, RC)
    after = score(ev, now + elapsed, RC)
    assert abs(after - prior) <= abs(before - prior) + 1e-12
    assert (before - prior) * (after - prior) >= -1e-12  # never crosses to the other side


def test_decay_halves_evidence_after_one_half_life() -> None:
    ev = ReputationEvidence(successes=8, disagreements=2, last_updated=0.0)
    aged = decayed(ev, RC.half_life_s, RC)
    assert math.isclose(aged.successes, 4.0) and math.isclose(aged.disagreements, 1.0)


def test_fresh_node_starts_at_prior_and_earns_trust() -> None:
    assert score(FRESH, NOW, RC) == pytest.approx(0.5)
    ev = FRESH
    bounds = []
    for _ in range(30):
        ev = record_agreement(ev, NOW, RC)
        bounds.append(lower_bound(ev, NOW, RC))
    assert bounds == sorted(bounds) and bounds[-1] > 0.9 > lower_bound(FRESH, NOW, RC)


def test_owner_disagreements_pool_to_siblings() -> None:
    sibling = ReputationEvidence(successes=10, agreements=10, last_updated=NOW)
    extra = owner_extra_disagreements(sibling, owner_total_disagreements=2.0, cfg=RC)
    assert extra == 2.0
    assert lower_bound(sibling, NOW, RC, extra) < lower_bound(sibling, NOW, RC) - 0.3


def test_status_round_trip() -> None:
    ev = ReputationEvidence(
        successes=12,
        failures=1,
        timeouts=2,
        agreements=5,
        disagreements=1,
        heartbeats_seen=100,
        heartbeats_missed=4,
        consecutive_valid=3,
        last_updated=1_700_000_000.0,
    )
    status = to_status(ev, 1_700_000_000.0, RC)
    assert status["lastUpdated"] == "2023-11-14T22:13:20Z"
    assert 0 <= status["lowerBound"] <= status["score"] <= 1
    assert from_status(status) == ev
    assert from_status(None) == FRESH


@pytest.mark.parametrize(
    ("status", "field"),
    [
        ({"successes": "many"}, "successes"),
        ({"failures": -1}, "failures"),
        ({"consecutiveValid": 1.5}, "consecutiveValid"),
        ({"lastUpdated": "yesterday"}, "lastUpdated"),
    ],
)
def test_bad_status_names_the_field(status: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field if field != "failures" else "failures"):
        from_status(status)
