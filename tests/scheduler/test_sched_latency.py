"""Smoothed RTT: exponential smoothing with alpha 0.2 and expiry after 300 s."""

from __future__ import annotations

import pytest
from koinon_operator.scheduler import DEFAULT_CONFIG, current_rtt_ms, is_stale, observe_rtt

LC = DEFAULT_CONFIG.latency


def test_first_sample_is_taken_as_is_then_smoothed() -> None:
    est = observe_rtt(None, 100.0, 0.0, LC)
    assert est.smoothed_ms == 100.0
    est = observe_rtt(est, 200.0, 10.0, LC)
    assert est.smoothed_ms == pytest.approx(0.2 * 200 + 0.8 * 100)
    assert est.updated_at == 10.0


def test_estimate_expires_and_restarts_from_a_fresh_sample() -> None:
    est = observe_rtt(None, 100.0, 0.0, LC)
    assert not is_stale(est, 300.0, LC) and is_stale(est, 300.1, LC)
    assert current_rtt_ms(est.smoothed_ms, est.updated_at, 299.0, LC) == 100.0
    assert current_rtt_ms(est.smoothed_ms, est.updated_at, 301.0, LC) is None
    assert current_rtt_ms(None, None, 0.0, LC) is None
    assert observe_rtt(est, 20.0, 1000.0, LC).smoothed_ms == 20.0


def test_converges_to_a_steady_rtt() -> None:
    est = observe_rtt(None, 300.0, 0.0, LC)
    for t in range(1, 40):
        est = observe_rtt(est, 50.0, float(t), LC)
    assert est.smoothed_ms == pytest.approx(50.0, abs=0.1)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_sample_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="RTT sample"):
        observe_rtt(None, bad, 0.0, LC)
