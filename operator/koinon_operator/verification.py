"""Deciding a replicated AIJob attempt from its copies' results (pure).

Copies of a verified job run as separate Ray jobs on nodes of distinct owners; each declares a
result whose digest is compared. The majority digest of distinct owners is accepted; copies that
disagree are penalised; with no majority the job reruns on fresh nodes of fresh owners, and the
next attempt is judged together with the results of the earlier ones. A copy votes once, under its
first (driver) node and that node's owner (``CopyResult.node``), however many replicas it ran on; the
reconciler gives the verdict on it to every one of its nodes.

With no majority nobody is penalised yet: nothing tells the honest copy from the dishonest one, and
charging both let any adversary (by lying or crashing on its own copy) cost every volunteer it was
paired with a disagreement. The dissenters are known, and penalised, once a later attempt gives a
majority; until then only copies that failed are charged (as failures).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from koinon_operator.scheduler import Accepted, NodeResult, NoMajority, decide_quorum


@dataclass(frozen=True)
class CopyResult:
    copy: int
    node: str
    owner: str
    digest: str | None  # None: the copy failed and returned nothing


@dataclass(frozen=True)
class Verdict:
    accepted_digest: str | None
    agreeing: tuple[str, ...]
    disagreeing: tuple[str, ...]
    failed: tuple[str, ...]
    votes: Mapping[str, int]

    @property
    def accepted(self) -> bool:
        return self.accepted_digest is not None


def judge(copies: Sequence[CopyResult], earlier: Sequence[CopyResult] = ()) -> Verdict:
    """Accept the digest returned by a strict majority of the distinct owners that ran a copy of
    this attempt or answered in an earlier one (``earlier``: their results, none of them failed).

    ``agreeing`` and ``disagreeing`` name nodes of every attempt judged; ``failed`` this attempt's
    (earlier failures were charged in their own attempt).
    """
    answered = {c.node: NodeResult(owner=c.owner, digest=c.digest) for c in (*earlier, *copies) if c.digest is not None}
    failed = tuple(sorted(c.node for c in copies if c.digest is None))
    owners = {c.owner for c in copies} | {c.owner for c in earlier if c.digest is not None}
    majority = len(owners) // 2 + 1
    decision: Accepted | NoMajority = decide_quorum(answered, majority) if answered else NoMajority({}, majority)
    if isinstance(decision, Accepted):
        return Verdict(decision.digest, decision.agreeing, decision.disagreeing, failed, {})
    return Verdict(None, (), (), failed, decision.owner_votes)
