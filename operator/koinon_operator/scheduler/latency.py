"""Smoothed round-trip time from heartbeat samples (Petals: alpha 0.2, expiry after 300 s)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import LatencyConfig


@dataclass(frozen=True, slots=True)
class RttEstimate:
    """Exponentially smoothed RTT and the time of the sample that last updated it."""

    smoothed_ms: float
    updated_at: float


def observe_rtt(previous: RttEstimate | None, sample_ms: float, now: float, cfg: LatencyConfig) -> RttEstimate:
    """Fold one RTT sample in; a missing or stale estimate restarts from the sample itself."""
    if not math.isfinite(sample_ms) or sample_ms < 0:
        raise ValueError(f"RTT sample must be a finite number of ms >= 0, got {sample_ms!r}")
    if previous is None or is_stale(previous, now, cfg):
        return RttEstimate(sample_ms, now)
    smoothed = cfg.alpha * sample_ms + (1 - cfg.alpha) * previous.smoothed_ms
    return RttEstimate(smoothed, max(now, previous.updated_at))


def is_stale(estimate: RttEstimate, now: float, cfg: LatencyConfig) -> bool:
    """True when no sample arrived within `stale_after_s`."""
    return now - estimate.updated_at > cfg.stale_after_s


def current_rtt_ms(smoothed_ms: float | None, updated_at: float | None, now: float, cfg: LatencyConfig) -> float | None:
    """The usable RTT of a node at `now`, or None when unknown or expired."""
    if smoothed_ms is None or updated_at is None:
        return None
    if now - updated_at > cfg.stale_after_s:
        return None
    return smoothed_ms
