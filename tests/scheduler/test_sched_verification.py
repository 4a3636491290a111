"""Replicated verification: adaptive replication, quorum decisions, liars losing work over rounds."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from koinon_operator.scheduler import (
    DEFAULT_CONFIG,
    Accepted,
    Gpu,
    JobRequest,
    NodeResult,
    NodeSnapshot,
    NoMajority,
    ReputationEvidence,
    TrustRecord,
    apply_quorum_outcome,
    decide_quorum,
    lower_bound,
    plan_replication,
    record_success,
    schedule,
    skip_probability,
    stable_seed,
)

VC = DEFAULT_CONFIG.verification
RC = DEFAULT_CONFIG.reputation


def test_untrusted_nodes_always_replicate_and_no_verification_means_one_copy() -> None:
    below_trust = TrustRecord(consecutive_valid=VC.trust_after_valid - 1)
    for seed in range(200):
        assert plan_replication(2, below_trust, seed, VC) == 2
        assert plan_replication(1, TrustRecord(consecutive_valid=0), seed, VC) == 1


def test_trusted_nodes_skip_with_probability_one_minus_one_over_ramp_n_capped() -> None:
    assert VC.trust_after_valid == 3 and VC.skip_ramp == 2.0  # the documented defaults
    assert skip_probability(TrustRecord(2), VC) == 0.0
    assert skip_probability(TrustRecord(3), VC) == 1.0 - 1.0 / 6.0
    assert skip_probability(TrustRecord(4), VC) == 1.0 - 1.0 / 8.0
    assert skip_probability(TrustRecord(5), VC) == 0.9
    assert skip_probability(TrustRecord(1000), VC) == VC.max_skip_probability
    assert skip_probability(TrustRecord(50, owner_disagreements=1.0), VC) == 0.0
    seeds = [stable_seed("ns/job", i) for i in range(4000)]
    skipped = sum(plan_replication(2, TrustRecord(10), s, VC) == 1 for s in seeds) / len(seeds)
    assert 0.88 < skipped < 0.92
    checked_new = sum(plan_replication(2, TrustRecord(3), s, VC) == 2 for s in seeds) / len(seeds)
    assert 0.14 < checked_new < 0.19  # one in six


@settings(max_examples=30, deadline=None)
@given(st.text(min_size=1, max_size=20), st.integers(0, 5), st.integers(0, 60))
def test_plan_is_deterministic_for_a_seed(key: str, attempt: int, valid: int) -> None:
    seed = stable_seed(key, attempt)
    assert plan_replication(3, TrustRecord(valid), seed, VC) == plan_replication(3, TrustRecord(valid), seed, VC)


def test_quorum_accepts_majority_and_names_dissenters() -> None:
    results = {"a": NodeResult("o1", "X"), "b": NodeResult("o2", "Y"), "c": NodeResult("o3", "X")}
    decision = decide_quorum(results, 2)
    assert decision == Accepted("X", ("a", "c"), ("b",))


def test_quorum_without_majority_asks_for_more_copies() -> None:
    decision = decide_quorum({"a": NodeResult("o1", "X"), "b": NodeResult("o2", "Y")}, 2)
    assert isinstance(decision, NoMajority) and decision.more_copies == 1
    assert decision.owner_votes == {"X": 1, "Y": 1}
    assert decide_quorum({"a": NodeResult("o1", "X")}, 3) == NoMajority({"X": 1}, 2)


def test_quorum_counts_owners_not_nodes() -> None:
    results = {f"s{i}": NodeResult("mallory", "BAD") for i in range(5)}
    results["h"] = NodeResult("alice", "GOOD")
    decision = decide_quorum(results, 2)
    assert isinstance(decision, NoMajority)
    results["h2"] = NodeResult("bob", "GOOD")
    assert decide_quorum(results, 2) == Accepted("GOOD", ("h", "h2"), tuple(f"s{i}" for i in range(5)))


def test_quorum_outcome_updates_reputation() -> None:
    ev = {n: ReputationEvidence(consecutive_valid=4) for n in "abc"}
    out = apply_quorum_outcome(ev, Accepted("X", ("a", "c"), ("b",)), 100.0, RC)
    assert out["a"].consecutive_valid == 5 and out["a"].agreements == 1
    assert out["b"].consecutive_valid == 0 and out["b"].disagreements == 1


def _node(name: str, owner: str, rtt: float, ev: ReputationEvidence, now: float) -> NodeSnapshot:
    return NodeSnapshot(name, owner, "eu", True, False, (Gpu("A", 24576),), 1, 8.0, rtt, now, ev)


def test_a_liar_loses_reputation_and_stops_receiving_replicated_work() -> None:
    """Rounds of replicated jobs through the pure functions; the liar is the fastest node."""
    evidence = {f"h{i}": ReputationEvidence() for i in range(8)}
    evidence["liar"] = ReputationEvidence()
    owners = {n: f"owner-{n}" for n in evidence}
    rtt = {n: 200.0 for n in evidence} | {"liar": 5.0}
    liar_jobs = []
    wrong_accepted = 0
    for rnd in range(60):
        now = 1000.0 + 600.0 * rnd
        nodes = [_node(n, owners[n], rtt[n], evidence[n], now) for n in evidence]
        job = JobRequest(f"ns/job-{rnd}", verification_quorum=2)
        (placement,) = schedule([job], nodes, now).placements
        liar_jobs.append("liar" in placement.nodes)
        results = {n: NodeResult(owners[n], "BAD" if n == "liar" else "OK") for n in placement.nodes}
        if placement.copies == 1:
            (n,) = placement.nodes
            evidence[n] = record_success(evidence[n], now, RC)
            wrong_accepted += results[n].digest != "OK"
            continue
        decision = decide_quorum(results, 2)
        while isinstance(decision, NoMajority):
            extra = JobRequest(
                job.key,
                verification_quorum=1,
                replicas=decision.more_copies,
                excluded_owners=frozenset(r.owner for r in results.values()),
            )
            (more,) = schedule([extra], nodes, now).placements
            results |= {n: NodeResult(owners[n], "BAD" if n == "liar" else "OK") for n in more.nodes}
            decision = decide_quorum(results, 2)
        assert decision.digest == "OK"
        evidence |= apply_quorum_outcome(evidence, decision, now, RC)
    assert liar_jobs[0], "the liar starts out preferred (fast, fresh)"
    assert not any(liar_jobs[10:]), "the liar kept receiving work"
    assert wrong_accepted == 0
    assert lower_bound(evidence["liar"], now, RC) < 0.05
    assert min(lower_bound(evidence[f"h{i}"], now, RC) for i in range(8)) > lower_bound(evidence["liar"], now, RC)


def _trusted_pair(now: float) -> list[NodeSnapshot]:
    proven = ReputationEvidence(successes=50, agreements=50, consecutive_valid=50, last_updated=now)
    return [_node("a", "alice", 20.0, proven, now), _node("b", "bob", 20.0, proven, now)]


def _copies(key: bytes | None, count: int = 200) -> list[int]:
    config = DEFAULT_CONFIG if key is None else replace(DEFAULT_CONFIG, verification=replace(VC, seed_key=key))
    nodes = _trusted_pair(1000.0)
    jobs = [JobRequest(f"ns/job-{i}", verification_quorum=2, attempt=1) for i in range(count)]
    return [schedule([job], nodes, 1000.0, config).placements[0].copies for job in jobs]


def test_the_skip_coin_is_keyed_and_the_unkeyed_coin_is_the_public_one() -> None:
    """A node knows the job key and attempt; with `seed_key` the coin is a MAC of them it cannot
    compute. Without one (simulations, tests) it is the plain hash it always was, so recorded
    figures are reproduced; with one, still a pure function of the inputs."""
    public = _copies(None)
    assert public == [plan_replication(2, TrustRecord(50), stable_seed(f"ns/job-{i}", 1), VC) for i in range(200)]
    assert stable_seed("ns/job", 1) == int.from_bytes(hashlib.blake2b(b"ns/job\x1f1", digest_size=8).digest(), "big")
    keyed = _copies(b"operator secret")
    assert keyed == _copies(b"operator secret") and keyed != public and keyed != _copies(b"another secret")
    assert 0.8 < keyed.count(1) / len(keyed) < 0.97  # the same skip rate (0.9), other jobs skipped


def test_the_coin_is_drawn_from_the_uid_so_a_recreated_job_draws_afresh() -> None:
    """An AIJob re-created under the same name (same key, same attempt 1) is another object: the
    coin is drawn from its uid, so the re-creations are spot-checked about 1 time in 10 rather
    than all or never. Without a uid (the simulator) the key stands for it, as before."""
    config = replace(DEFAULT_CONFIG, verification=replace(VC, seed_key=b"operator secret"))
    nodes = _trusted_pair(1000.0)
    jobs = [JobRequest("ns/nightly", verification_quorum=2, attempt=1, uid=f"uid-{i}") for i in range(200)]
    drawn = [schedule([job], nodes, 1000.0, config).placements[0].copies for job in jobs]
    assert 0.8 < drawn.count(1) / len(drawn) < 0.97
    public = [schedule([job], nodes, 1000.0).placements[0].copies for job in jobs]
    assert public == [plan_replication(2, TrustRecord(50), stable_seed(f"uid-{i}", 1), VC) for i in range(200)]
    unnamed = JobRequest("ns/nightly", verification_quorum=2, attempt=1)
    expected = plan_replication(2, TrustRecord(50), stable_seed("ns/nightly", 1), VC)
    assert schedule([unnamed], nodes, 1000.0).placements[0].copies == expected


def test_the_seed_key_stays_out_of_the_config_repr_and_fits_blake2b() -> None:
    assert "operator secret" not in repr(replace(DEFAULT_CONFIG, verification=replace(VC, seed_key=b"operator secret")))
    with pytest.raises(ValueError, match="seed_key"):
        replace(VC, seed_key=bytes(65))


def test_an_attempt_after_a_checked_one_is_checked_whatever_the_coin() -> None:
    """least_copies (an earlier attempt of the job drew a check): no coin is drawn below it, so a
    node that stops its check copy (the attempt ends uncounted) cannot redraw the skip."""
    now = 1000.0
    trusted = ReputationEvidence(successes=50.0, consecutive_valid=50, last_updated=now)
    nodes = [_node(n, f"owner-{n}", 20.0, trusted, now) for n in ("a", "b", "c")]
    jobs = [JobRequest(f"ns/job-{i}", verification_quorum=2, attempt=2) for i in range(60)]
    drawn = [schedule([job], nodes, now).placements[0].copies for job in jobs]
    assert 1 in drawn and 2 in drawn  # trusted nodes: the coin decides
    kept = [schedule([replace(job, least_copies=2)], nodes, now).placements[0].copies for job in jobs]
    assert kept == [2] * len(jobs)
    # Never more than the quorum, and a floor of 1 is the coin's own draw.
    assert [schedule([replace(job, least_copies=5)], nodes, now).placements[0].copies for job in jobs] == kept
    assert [schedule([replace(job, least_copies=1)], nodes, now).placements[0].copies for job in jobs] == drawn
