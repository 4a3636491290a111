"""Percentiles of the benchmarks' latency samples."""

from __future__ import annotations

import math


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least a fraction q of all samples at or
    below it (p99 of 3,000 samples is the 2,970th smallest)."""
    if not samples or not 0 < q <= 1:
        raise ValueError(f"percentile {q} of {len(samples)} samples")
    ordered = sorted(samples)
    # Rounded first: 0.07 * 100 is 7.000000000000001 in floating point, whose ceiling is 8.
    return ordered[max(0, math.ceil(round(q * len(ordered), 9)) - 1)]
