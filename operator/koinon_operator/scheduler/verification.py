"""Replicated verification: how many copies to run, which digest to accept, who pays for lying.

Adaptive replication follows BOINC: a node becomes trusted after `trust_after_valid` validated
results in a row (reset to 0 by a disagreement), then skips replication with probability
1 - 1/(skip_ramp * n), capped so trusted nodes are still spot-checked. The coin is a keyed hash of
the job's uid (its key where none is given) and attempt (`VerificationConfig.seed_key`): reproducible
for whoever holds the key, and unpredictable to a node, which can learn the uid and attempt (its Ray
submission id, its driver's env) but never the secret (with the coin public, a trusted node would lie
exactly when it runs the only copy). A quorum counts distinct owners, never nodes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from .config import ReputationConfig, VerificationConfig
from .reputation import ReputationEvidence, record_agreement, record_disagreement


def stable_seed(*parts: object, key: bytes = b"") -> int:
    """A 64-bit seed from the parts' text (stable across processes, unlike `hash`).

    With a `key` (at most 64 bytes) it is BLAKE2b's MAC of the parts: nobody without the key can
    tell it from random. The empty key is plain BLAKE2b, the seed this function always gave."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "big")


def unit_interval(seed: int) -> float:
    """A number in [0, 1) determined by `seed` alone."""
    return (stable_seed("u", seed) >> 11) / float(1 << 53)


@dataclass(frozen=True, slots=True)
class TrustRecord:
    """What adaptive replication looks at for one node."""

    consecutive_valid: int
    owner_disagreements: float = 0.0
    """Decayed disagreements of all nodes of the same owner (this node's included)."""


def skip_probability(record: TrustRecord, cfg: VerificationConfig) -> float:
    """Probability that a job on this node runs without a second copy."""
    if record.owner_disagreements > cfg.owner_disagreement_tolerance:
        return 0.0
    n = record.consecutive_valid
    if n < cfg.trust_after_valid:
        return 0.0
    return min(1.0 - 1.0 / (cfg.skip_ramp * n), cfg.max_skip_probability)


def plan_replication(quorum: int, record: TrustRecord, seed: int, cfg: VerificationConfig) -> int:
    """Copies to run: 1 when the job needs no verification or the trusted node drew a skip."""
    if quorum <= 1:
        return 1
    skip = skip_probability(record, cfg)
    return 1 if skip > 0.0 and unit_interval(seed) < skip else quorum


@dataclass(frozen=True, slots=True)
class NodeResult:
    owner: str
    digest: str


@dataclass(frozen=True, slots=True)
class Accepted:
    digest: str
    agreeing: tuple[str, ...]
    disagreeing: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NoMajority:
    owner_votes: dict[str, int]
    """Digest -> number of distinct owners that returned it."""
    more_copies: int
    """Copies that could still decide it (at least 1)."""


def decide_quorum(results: Mapping[str, NodeResult], quorum: int) -> Accepted | NoMajority:
    """Accept the digest returned by at least `quorum` distinct owners that are also a strict
    majority of all owners that answered; otherwise say how many more copies could decide it."""
    if quorum < 1:
        raise ValueError(f"quorum must be >= 1, got {quorum}")
    owners_by_digest: dict[str, set[str]] = {}
    for result in results.values():
        owners_by_digest.setdefault(result.digest, set()).add(result.owner)
    all_owners = {r.owner for r in results.values()}
    votes = {d: len(o) for d, o in owners_by_digest.items()}
    # Sorted so a tie between digests resolves the same way whatever the input order.
    for digest, count in sorted(votes.items(), key=lambda kv: (-kv[1], kv[0])):
        if count >= quorum and 2 * count > len(all_owners):
            agreeing = tuple(sorted(n for n, r in results.items() if r.digest == digest))
            disagreeing = tuple(sorted(n for n, r in results.items() if r.digest != digest))
            return Accepted(digest, agreeing, disagreeing)
        break
    best = max(votes.values(), default=0)
    others = len(all_owners) - best
    # Copies needed so the leading digest could reach both the quorum and a strict majority.
    more = max(quorum - best, others - best + 1, 1)
    return NoMajority(votes, more)


def apply_quorum_outcome(
    evidence: Mapping[str, ReputationEvidence], decision: Accepted, now: float, cfg: ReputationConfig
) -> dict[str, ReputationEvidence]:
    """Updated evidence of every node that took part: agreement for the majority, disagreement
    (ten failures' worth by default, trust counter reset) for the rest."""
    out: dict[str, ReputationEvidence] = {}
    for name in decision.agreeing:
        out[name] = record_agreement(evidence[name], now, cfg)
    for name in decision.disagreeing:
        out[name] = record_disagreement(evidence[name], now, cfg)
    return out


@dataclass(frozen=True, slots=True)
class Revoke:
    """An accepted result loses its standing. With votes in `keep`, `more_copies` new copies (on
    owners other than `keep`'s and the caught ones) complete the quorum; with none kept the job is
    pending again and placed afresh like any job (adaptive replication decides its copies; the
    caught owners stay excluded), `more_copies` being the full quorum it needs if replicated."""

    keep: tuple[str, ...]
    """Nodes whose agreeing results still count (their owners were not caught)."""
    more_copies: int


def recheck_accepted(
    agreeing: Mapping[str, NodeResult],
    caught_owners: frozenset[str] | set[str],
    quorum: int,
    standing_support: int = 1,
) -> Revoke | None:
    """Retroactive invalidation (BOINC): once an owner is caught returning a wrong result, the
    results it vouched for lose that vote. An accepted result stands while at least
    `standing_support` distinct owners that were not caught still vouch for it; otherwise it is
    revoked and rerun until `quorum` clean owners agree.

    With the default `standing_support=1` this revokes exactly the results a caught owner produced
    that were accepted without replication (or whose every voucher was caught): a result another,
    uncaught owner confirmed stands. `agreeing`: node -> result of every node that returned the
    accepted digest. Results no caught owner vouched for are never revoked (None)."""
    if quorum < 1:
        raise ValueError(f"quorum must be >= 1, got {quorum}")
    if not 1 <= standing_support <= quorum:
        raise ValueError(f"standing_support must be within 1..quorum ({quorum}), got {standing_support}")
    owners = {r.owner for r in agreeing.values()}
    if not owners & caught_owners:
        return None
    clean_owners = owners - caught_owners
    if len(clean_owners) >= standing_support:
        return None
    keep = tuple(sorted(n for n, r in agreeing.items() if r.owner not in caught_owners))
    return Revoke(keep, quorum - len(clean_owners))
