"""Beta reputation of a volunteer node: evidence, decay, conservative score, status dict.

Evidence is kept as decayed counts so a person can read why a node has its score. The score is
Jøsang's beta expectation (r + a) / (r + s + a + b); placement and `minReputation` use the one-sided
Wilson lower bound of that proportion instead, so a node with little evidence cannot outrank a
proven one. Pure functions only: `now` is always an argument, never read from a clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from .config import ReputationConfig

# The evidence counts of `ReputationEvidence` (they decay together), in a fixed order.
COUNT_FIELDS = (
    "successes",
    "failures",
    "timeouts",
    "agreements",
    "disagreements",
    "heartbeats_seen",
    "heartbeats_missed",
    "exposure_hours",
)


@dataclass(frozen=True, slots=True)
class ReputationEvidence:
    """What the platform has observed about one node, as (decayed) counts."""

    successes: float = 0.0
    failures: float = 0.0
    timeouts: float = 0.0
    agreements: float = 0.0
    disagreements: float = 0.0
    heartbeats_seen: float = 0.0
    heartbeats_missed: float = 0.0
    exposure_hours: float = 0.0
    """Hours of execution observed on the node, finished or not (the exposure behind the crash
    rate: failures per hour of work, not per job, so short and long jobs weigh correctly)."""
    consecutive_valid: int = 0
    """Validated results in a row since the last disagreement (BOINC's trust counter)."""
    last_updated: float = 0.0
    """Seconds since the epoch at which the counts were last decayed."""

    def __post_init__(self) -> None:
        for name in COUNT_FIELDS:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"reputation evidence field {name!r} must be a finite count >= 0, got {value!r}")
        if self.consecutive_valid < 0:
            raise ValueError(f"consecutive_valid must be >= 0, got {self.consecutive_valid}")


FRESH = ReputationEvidence()


def decay_factor(elapsed_s: float, cfg: ReputationConfig) -> float:
    """Weight left to evidence that is `elapsed_s` old (1 for no time, 0.5 after one half-life)."""
    if elapsed_s <= 0:
        return 1.0
    return float(0.5 ** (elapsed_s / cfg.half_life_s))


def decayed(ev: ReputationEvidence, now: float, cfg: ReputationConfig) -> ReputationEvidence:
    """Evidence aged to `now`: every count shrinks toward zero, so the score moves toward the prior.

    A `now` earlier than `last_updated` leaves the evidence unchanged (time never runs backward).
    """
    if now <= ev.last_updated:
        return ev
    f = decay_factor(now - ev.last_updated, cfg)
    return replace(
        ev,
        successes=ev.successes * f,
        failures=ev.failures * f,
        timeouts=ev.timeouts * f,
        agreements=ev.agreements * f,
        disagreements=ev.disagreements * f,
        heartbeats_seen=ev.heartbeats_seen * f,
        heartbeats_missed=ev.heartbeats_missed * f,
        exposure_hours=ev.exposure_hours * f,
        last_updated=now,
    )


def beta_counts(ev: ReputationEvidence, cfg: ReputationConfig, extra_disagreements: float = 0.0) -> tuple[float, float]:
    """(positive, negative) evidence weights; `extra_disagreements` are pooled from the owner."""
    r = cfg.success_weight * ev.successes + cfg.agreement_weight * ev.agreements
    s = (
        cfg.failure_weight * ev.failures
        + cfg.timeout_weight * ev.timeouts
        + cfg.disagreement_weight * (ev.disagreements + extra_disagreements)
    )
    return r, s


def beta_score(r: float, s: float, cfg: ReputationConfig) -> float:
    """Jøsang's expectation of the beta distribution: (r + a) / (r + s + a + b)."""
    return (r + cfg.prior_alpha) / (r + s + cfg.prior_alpha + cfg.prior_beta)


def wilson_lower_bound(r: float, s: float, cfg: ReputationConfig) -> float:
    """One-sided Wilson lower bound of the success proportion, counting the prior as evidence."""
    n = r + s + cfg.prior_alpha + cfg.prior_beta
    p = (r + cfg.prior_alpha) / n
    z2 = cfg.confidence_z**2
    centre = p + z2 / (2 * n)
    spread = cfg.confidence_z * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0))
    return min(1.0, max(0.0, (centre - spread) / (1 + z2 / n)))


def score(ev: ReputationEvidence, now: float, cfg: ReputationConfig, extra_disagreements: float = 0.0) -> float:
    """Beta expectation of the node's evidence aged to `now` (in [0, 1])."""
    r, s = beta_counts(decayed(ev, now, cfg), cfg, extra_disagreements)
    return beta_score(r, s, cfg)


def lower_bound(ev: ReputationEvidence, now: float, cfg: ReputationConfig, extra_disagreements: float = 0.0) -> float:
    """Conservative reputation used for placement and for `spec.constraints.minReputation`."""
    r, s = beta_counts(decayed(ev, now, cfg), cfg, extra_disagreements)
    return wilson_lower_bound(r, s, cfg)


def uptime(ev: ReputationEvidence) -> float:
    """Share of expected heartbeats that arrived, with a uniform prior ((seen+1)/(seen+missed+2))."""
    return (ev.heartbeats_seen + 1.0) / (ev.heartbeats_seen + ev.heartbeats_missed + 2.0)


def _add(ev: ReputationEvidence, now: float, cfg: ReputationConfig, **deltas: float) -> ReputationEvidence:
    base = decayed(ev, now, cfg)
    values = {name: getattr(base, name) + delta for name, delta in deltas.items()}
    return replace(base, last_updated=max(now, base.last_updated), **values)


def record_success(ev: ReputationEvidence, now: float, cfg: ReputationConfig) -> ReputationEvidence:
    """A result came back that nobody checked (it does not advance the trust counter)."""
    return _add(ev, now, cfg, successes=1.0)


def record_failure(ev: ReputationEvidence, now: float, cfg: ReputationConfig) -> ReputationEvidence:
    """An execution crashed on the node."""
    return _add(ev, now, cfg, failures=1.0)


def record_timeout(ev: ReputationEvidence, now: float, cfg: ReputationConfig) -> ReputationEvidence:
    """An execution was lost because the node disappeared mid-job."""
    return _add(ev, now, cfg, timeouts=1.0)


def record_agreement(ev: ReputationEvidence, now: float, cfg: ReputationConfig) -> ReputationEvidence:
    """The node's result matched the accepted quorum digest: a validated success."""
    out = _add(ev, now, cfg, successes=1.0, agreements=1.0)
    return replace(out, consecutive_valid=out.consecutive_valid + 1)


def record_disagreement(ev: ReputationEvidence, now: float, cfg: ReputationConfig) -> ReputationEvidence:
    """The node's result contradicted the accepted digest: heavy penalty, trust counter reset."""
    out = _add(ev, now, cfg, disagreements=1.0)
    return replace(out, consecutive_valid=0)


def record_work(ev: ReputationEvidence, now: float, cfg: ReputationConfig, hours: float) -> ReputationEvidence:
    """An execution on the node ended (finished, crashed, lost or cancelled) after `hours` of work."""
    if not math.isfinite(hours) or hours < 0:
        raise ValueError(f"hours of work must be a finite number >= 0, got {hours}")
    return _add(ev, now, cfg, exposure_hours=hours)


def record_heartbeats(
    ev: ReputationEvidence, now: float, cfg: ReputationConfig, seen: float, missed: float
) -> ReputationEvidence:
    """Heartbeats that arrived and that were expected but missing since the last record."""
    if seen < 0 or missed < 0:
        raise ValueError(f"heartbeat counts must be >= 0, got seen={seen} missed={missed}")
    return _add(ev, now, cfg, heartbeats_seen=seen, heartbeats_missed=missed)


def owner_extra_disagreements(
    own: ReputationEvidence, owner_total_disagreements: float, cfg: ReputationConfig
) -> float:
    """Disagreements of sibling nodes (same owner) charged to this node (Sybil resistance)."""
    return max(0.0, owner_total_disagreements - own.disagreements) * cfg.owner_disagreement_pooling


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def to_status(
    ev: ReputationEvidence, now: float, cfg: ReputationConfig, extra_disagreements: float = 0.0
) -> dict[str, Any]:
    """`VolunteerNode.status.reputation` as a plain dict, evidence aged to `now`."""
    aged = decayed(ev, now, cfg)
    r, s = beta_counts(aged, cfg, extra_disagreements)
    return {
        "score": round(beta_score(r, s, cfg), 6),
        "lowerBound": round(wilson_lower_bound(r, s, cfg), 6),
        "uptime": round(uptime(aged), 6),
        "successes": aged.successes,
        "failures": aged.failures,
        "timeouts": aged.timeouts,
        "agreements": aged.agreements,
        "disagreements": aged.disagreements,
        "ownerDisagreements": extra_disagreements,
        "heartbeatsSeen": aged.heartbeats_seen,
        "heartbeatsMissed": aged.heartbeats_missed,
        "exposureHours": aged.exposure_hours,
        "consecutiveValid": aged.consecutive_valid,
        "lastUpdated": _iso(aged.last_updated),
    }


_STATUS_KEYS = {
    "successes": "successes",
    "failures": "failures",
    "timeouts": "timeouts",
    "agreements": "agreements",
    "disagreements": "disagreements",
    "heartbeatsSeen": "heartbeats_seen",
    "heartbeatsMissed": "heartbeats_missed",
    "exposureHours": "exposure_hours",
}


def from_status(status: Mapping[str, Any] | None) -> ReputationEvidence:
    """Evidence from `VolunteerNode.status.reputation`; missing fields mean no evidence.

    Derived fields (score, lowerBound, uptime) are ignored: they are recomputed from the counts.
    """
    if not status:
        return FRESH
    values: dict[str, Any] = {}
    for key, attr in _STATUS_KEYS.items():
        raw = status.get(key, 0.0)
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"status.reputation.{key} must be a number, got {raw!r}")
        values[attr] = float(raw)
    cv = status.get("consecutiveValid", 0)
    if isinstance(cv, bool) or not isinstance(cv, int | float) or cv != int(cv):
        raise ValueError(f"status.reputation.consecutiveValid must be an integer, got {cv!r}")
    values["consecutive_valid"] = int(cv)
    values["last_updated"] = _parse_time(status.get("lastUpdated"))
    try:
        return ReputationEvidence(**values)
    except ValueError as exc:
        raise ValueError(f"status.reputation: {exc}") from exc


def _parse_time(raw: Any) -> float:
    if raw is None:
        return 0.0
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, str):
        try:
            return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        except ValueError as exc:
            raise ValueError(f"status.reputation.lastUpdated is not an RFC 3339 time: {raw!r}") from exc
    raise ValueError(f"status.reputation.lastUpdated must be an RFC 3339 string, got {raw!r}")
