"""Reputation evidence is counted once per outcome, also when an operator restart replays a pass,
and survives a concurrent status writer (the gateway's heartbeats) through conditional writes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_operator.reconciler import NodeWork
from koinon_operator.reputation_book import (
    RECORDED_OUTCOMES_CAP,
    RECORDED_OUTCOMES_KEPT,
    RECORDED_OUTCOMES_WINDOW_S,
    ReputationBook,
    outcome_key,
    owner_pooled_disagreements,
    updated_status,
    uptime_sample,
)
from koinon_operator.scheduler import DEFAULT_CONFIG
from kubernetes.client.exceptions import ApiException

from tests.emulator.helpers import EmulatorThread, emulator_for_kube_client

CRD = Path(__file__).resolve().parents[2] / "manifests" / "crds" / "volunteernodes.koinon.dev.yaml"
API = "koinon.dev/v1alpha1"
NOW = 1_800_000_000.0
AT = "@1800000000"  # the second an entry recorded at NOW carries
CONFIG = DEFAULT_CONFIG.reputation


def test_outcome_key_follows_attempt_and_verification_round() -> None:
    assert outcome_key("u1", {}) == "u1/0/0"
    assert outcome_key("u1", {"attempts": 2, "verificationReruns": 1}) == "u1/2/1"
    assert outcome_key("u1", {"attempts": 2}) != outcome_key("u1", {"attempts": 3})


def test_same_key_is_counted_once_and_other_keys_still_count() -> None:
    first = updated_status({}, "success", NOW, CONFIG, "u1/1/0")
    assert first is not None
    assert first["jobs"] == {"succeeded": 1}
    assert first["reputation"]["recordedOutcomes"] == [f"u1/1/0{AT}"]
    assert updated_status(first, "success", NOW + 1, CONFIG, "u1/1/0") is None
    # Another kind under the same key is not new evidence: a pass replayed after a restart may see
    # the attempt end otherwise (its Ray job failed, then its node was lost) and must not count twice.
    assert updated_status(first, "timeout", NOW + 1, CONFIG, "u1/1/0") is None
    # Entries written before the kind left the key, or before entries carried a time, still count.
    for old in ("u1/1/0:failure", "u1/1/0"):
        legacy = {"reputation": {**first["reputation"], "recordedOutcomes": [old]}}
        assert updated_status(legacy, "timeout", NOW + 1, CONFIG, "u1/1/0") is None
    # Another attempt is new evidence.
    second = updated_status(first, "success", NOW + 1, CONFIG, "u1/2/0")
    assert second is not None
    assert second["jobs"] == {"succeeded": 2}
    assert second["reputation"]["successes"] > first["reputation"]["successes"]


def test_recorded_keys_are_bounded_and_keep_the_newest() -> None:
    status: dict[str, Any] = {}
    many = RECORDED_OUTCOMES_CAP + 10
    for attempt in range(many):  # all within the hour: only the cap bounds them
        fields = updated_status(status, "failure", NOW + attempt, CONFIG, f"u/{attempt}/0")
        assert fields is not None
        status = fields
    kept = status["reputation"]["recordedOutcomes"]
    assert len(kept) == RECORDED_OUTCOMES_CAP
    assert kept[-1] == f"u/{many - 1}/0@{int(NOW) + many - 1}"
    assert status["jobs"] == {"failed": many}
    # Past the hour only the latest entries stay, whatever their age.
    later = NOW + many + RECORDED_OUTCOMES_WINDOW_S
    fields = updated_status(status, "failure", later, CONFIG, "u/last/0")
    assert fields is not None
    kept = fields["reputation"]["recordedOutcomes"]
    assert len(kept) == RECORDED_OUTCOMES_KEPT
    assert kept[-2:] == [f"u/{many - 1}/0@{int(NOW) + many - 1}", f"u/last/0@{int(later)}"]


def _apply(status: dict[str, Any], kind: str, key: str, now: float) -> dict[str, Any]:
    fields = updated_status(status, kind, now, CONFIG, key, NodeWork(hours=0.02, gpu_seconds=72.0))
    return status if fields is None else {**status, **fields}


def test_a_replay_within_the_hour_counts_nothing_on_a_busy_node() -> None:
    """Remembering 64 entries (32 outcomes, each with its work) forgot a failure after a busy node
    had finished 32 other jobs (an 8-GPU node with one-minute jobs: four minutes, a rescheduled
    operator pod's restart), and its replay counted it again."""
    status = _apply({}, "failure", "uid-x/1/0", NOW)
    # 8 GPUs of one-minute jobs for almost an hour: 16 entries a minute, 944 in all.
    for i in range(59 * 8):
        status = _apply(status, "success", f"uid-{i}/1/0", NOW + 60 + 7.5 * i)
    before = dict(status)
    replayed = NOW + RECORDED_OUTCOMES_WINDOW_S - 1
    assert updated_status(status, "failure", replayed, CONFIG, "uid-x/1/0", NodeWork(0.02, 72.0)) is None
    assert _apply(status, "failure", "uid-x/1/0", replayed) == before
    assert status["jobs"] == {"failed": 1, "succeeded": 59 * 8}


def test_the_kept_outcomes_fit_the_crd_bound() -> None:
    schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    recorded = schema["properties"]["status"]["properties"]["reputation"]["properties"]["recordedOutcomes"]
    assert recorded["maxItems"] == RECORDED_OUTCOMES_CAP
    # A full list stays small: far under etcd's 1.5 MiB per object.
    entry = f"{'0' * 8}-0000-0000-0000-{'0' * 12}/99/9/work@{int(NOW)}"
    assert len(str([entry] * RECORDED_OUTCOMES_CAP)) < 200_000


def test_an_uptime_sample_forgets_outcomes_older_than_the_hour_beyond_the_latest() -> None:
    status: dict[str, Any] = {"phase": "Ready"}
    for i in range(RECORDED_OUTCOMES_KEPT + 5):  # evidence only: one entry each
        fields = updated_status(status, "success", NOW + i, CONFIG, f"uid-{i}/1/0")
        assert fields is not None
        status.update(fields)
    assert len(status["reputation"]["recordedOutcomes"]) == RECORDED_OUTCOMES_KEPT + 5
    within = uptime_sample(status, NOW + RECORDED_OUTCOMES_WINDOW_S, CONFIG, max_gap_s=120)
    assert within is not None
    assert within["reputation"]["recordedOutcomes"] == status["reputation"]["recordedOutcomes"]
    after = uptime_sample(status, NOW + RECORDED_OUTCOMES_WINDOW_S + 100, CONFIG, max_gap_s=120)
    assert after is not None
    assert after["reputation"]["recordedOutcomes"] == status["reputation"]["recordedOutcomes"][-RECORDED_OUTCOMES_KEPT:]


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorThread]:
    with emulator_for_kube_client(tmp_path, monkeypatch, yaml.safe_load(CRD.read_text())) as server:
        node = {"apiVersion": API, "kind": "VolunteerNode", "metadata": {"name": "vn-a"}, "spec": {"owner": "alice"}}
        server.call(lambda e: e.create(node))
        yield server


def _status(cluster: EmulatorThread) -> dict[str, Any]:
    return dict(cluster.call(lambda e: e.get(API, "VolunteerNode", "vn-a")).get("status") or {})


async def test_replayed_pass_does_not_count_evidence_twice(cluster: EmulatorThread) -> None:
    book = ReputationBook(clock=lambda: NOW)
    await book.record([("vn-a", "success")], "uid-1/1/0")
    after_first = _status(cluster)
    # The operator died before the job's status write; the restarted one replays the same pass.
    await book.record([("vn-a", "success")], "uid-1/1/0")
    assert _status(cluster) == after_first
    assert after_first["jobs"] == {"succeeded": 1}
    await book.record([("vn-a", "success")], "uid-2/1/0")
    assert _status(cluster)["jobs"] == {"succeeded": 2}


def test_work_is_counted_once_per_key_with_or_without_evidence() -> None:
    work = NodeWork(hours=0.5, gpu_seconds=3600.04)
    first = updated_status({}, "success", NOW, CONFIG, "u1/1/0", work)
    assert first is not None
    assert first["contributedGpuSeconds"] == 3600.0  # to 0.1 s
    assert first["reputation"]["exposureHours"] == pytest.approx(0.5)
    assert first["reputation"]["recordedOutcomes"] == [f"u1/1/0{AT}", f"u1/1/0/work{AT}"]
    assert updated_status(first, "success", NOW + 1, CONFIG, "u1/1/0", work) is None
    # Work with no evidence (a copy stopped, or failed on its own) counts too, and once.
    second = updated_status(first, None, NOW + 1, CONFIG, "u1/2/0", NodeWork(0.25, 900.0))
    assert second is not None
    assert "jobs" not in second  # no evidence, no job counted
    assert second["contributedGpuSeconds"] == 4500.0
    assert second["reputation"]["exposureHours"] == pytest.approx(0.75, rel=1e-3)
    assert updated_status({**first, **second}, None, NOW + 2, CONFIG, "u1/2/0", NodeWork(0.25, 900.0)) is None
    # A replay that now has evidence for the node counts the evidence, not the work again.
    replay = updated_status({**first, **second}, "failure", NOW + 2, CONFIG, "u1/2/0", NodeWork(0.25, 900.0))
    assert replay is not None
    assert replay.get("contributedGpuSeconds") is None
    assert replay["jobs"] == {"succeeded": 1, "failed": 1}
    assert replay["reputation"]["exposureHours"] == pytest.approx(0.75, rel=1e-3)
    assert updated_status({}, None, NOW, CONFIG, "u1/1/0") is None  # nothing to count


async def test_replayed_pass_does_not_count_work_twice(cluster: EmulatorThread) -> None:
    book = ReputationBook(clock=lambda: NOW)
    outcome = {"vn-a": NodeWork(hours=2.0, gpu_seconds=14_400.0)}
    await book.record([("vn-a", "success")], "uid-1/1/0", outcome)
    after_first = _status(cluster)
    assert after_first["contributedGpuSeconds"] == 14_400.0
    assert after_first["reputation"]["exposureHours"] == pytest.approx(2.0)
    assert after_first["jobs"] == {"succeeded": 1}
    # The operator died before the job's status write; the restarted one replays the same pass.
    await book.record([("vn-a", "success")], "uid-1/1/0", outcome)
    assert _status(cluster) == after_first
    # Another attempt's work, without evidence (its copy was stopped), adds up; replayed, it does not.
    for _ in range(2):
        await book.record([], "uid-1/2/0", {"vn-a": NodeWork(hours=0.5, gpu_seconds=1800.0)})
    status = _status(cluster)
    assert status["contributedGpuSeconds"] == 16_200.0
    assert status["reputation"]["exposureHours"] == pytest.approx(2.5)
    assert status["jobs"] == {"succeeded": 1}
    assert status["reputation"]["recordedOutcomes"] == [f"uid-1/1/0{AT}", f"uid-1/1/0/work{AT}", f"uid-1/2/0/work{AT}"]


async def test_concurrent_writer_costs_a_retry_not_a_lost_count(cluster: EmulatorThread) -> None:
    raced: list[bool] = []

    def clock_with_racing_writers() -> float:
        # Called between the book's read and its write: two other writers change the object first,
        # the gateway (latency) and a second operator recording another job's outcome.
        if not raced:
            raced.append(True)
            latency = {"status": {"latency": {"smoothedMs": 42.0}}}
            cluster.call(lambda e: e.patch(API, "VolunteerNode", "vn-a", latency, subresource="status"))
            ReputationBook(clock=lambda: NOW)._apply("vn-a", "success", "uid-2/1/0")
        return NOW

    await ReputationBook(clock=clock_with_racing_writers).record([("vn-a", "failure")], "uid-1/1/0")
    status = _status(cluster)
    assert raced == [True]
    assert status["latency"] == {"smoothedMs": 42.0}
    # A write based on the stale read would have reset the other outcome's counts.
    assert status["jobs"] == {"failed": 1, "succeeded": 1}
    assert status["reputation"]["failures"] == pytest.approx(1.0)
    assert status["reputation"]["successes"] == pytest.approx(1.0)
    assert status["reputation"]["recordedOutcomes"] == [f"uid-2/1/0{AT}", f"uid-1/1/0{AT}"]


async def test_evidence_for_a_node_without_volunteernode_is_dropped(cluster: EmulatorThread) -> None:
    await ReputationBook(clock=lambda: NOW).record([("bare-ray-worker", "success")], "uid-1/1/0")
    assert "jobs" not in _status(cluster)


def test_the_first_look_starts_the_uptime_clock_and_counts_nothing() -> None:
    fields = uptime_sample({"phase": "Ready"}, NOW, CONFIG, max_gap_s=120)
    assert fields is not None
    reputation = fields["reputation"]
    assert reputation["uptimeSampledAt"] == NOW
    assert (reputation["heartbeatsSeen"], reputation["heartbeatsMissed"]) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("phase", "seen", "missed"),
    [("Ready", 12.0, 0.0), ("Draining", 12.0, 0.0), ("NotReady", 0.0, 12.0), ("Failed", 0.0, 12.0)],
)
def test_time_between_looks_counts_as_heartbeats_seen_or_missed(phase: str, seen: float, missed: float) -> None:
    status = uptime_sample({"phase": phase}, NOW, CONFIG, max_gap_s=120)
    assert status is not None
    status["phase"] = phase
    after = uptime_sample(status, NOW + 60, CONFIG, max_gap_s=120)  # 60 s = 12 heartbeats of 5 s
    assert after is not None
    reputation = after["reputation"]
    assert reputation["heartbeatsSeen"] == pytest.approx(seen, rel=1e-3)
    assert reputation["heartbeatsMissed"] == pytest.approx(missed, rel=1e-3)
    assert reputation["uptime"] > 0.9 if seen else reputation["uptime"] < 0.1


def test_a_gap_nobody_watched_counts_only_up_to_the_cap_and_a_repeated_look_not_at_all() -> None:
    status = uptime_sample({"phase": "NotReady"}, NOW, CONFIG, max_gap_s=120)
    assert status is not None
    status["phase"] = "NotReady"
    after = uptime_sample(status, NOW + 3600, CONFIG, max_gap_s=120)  # the operator was down for an hour
    assert after is not None
    assert after["reputation"]["heartbeatsMissed"] == pytest.approx(24.0, rel=1e-2)
    assert uptime_sample({**status, **after}, NOW + 3600, CONFIG, max_gap_s=120) is None


def test_an_uptime_sample_keeps_the_outcome_keys_and_the_evidence() -> None:
    status = updated_status({}, "success", NOW, CONFIG, "u1/1/0")
    assert status is not None
    status["phase"] = "Ready"
    after = uptime_sample(status, NOW + 1, CONFIG, max_gap_s=120)
    assert after is not None
    assert after["reputation"]["recordedOutcomes"] == [f"u1/1/0{AT}"]
    assert after["reputation"]["successes"] == pytest.approx(1.0, rel=1e-3)


async def test_the_sampler_records_uptime_on_each_volunteernode_once_per_look(cluster: EmulatorThread) -> None:
    clock = [NOW]
    book = ReputationBook(clock=lambda: clock[0])
    ready = {"status": {"phase": "Ready", "connected": True}}
    cluster.call(lambda e: e.patch(API, "VolunteerNode", "vn-a", ready, subresource="status"))
    assert await book.sample_uptime(60) == 1  # starts the clock
    clock[0] += 60
    assert await book.sample_uptime(60) == 1
    assert await book.sample_uptime(60) == 0  # the same moment again: nothing new
    reputation = _status(cluster)["reputation"]
    assert reputation["heartbeatsSeen"] == pytest.approx(12.0, rel=1e-3)
    assert reputation["uptimeSampledAt"] == NOW + 60


async def test_one_node_whose_uptime_write_fails_does_not_cost_the_others_theirs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only ValueError was caught per node: an API error on one (a status the schema refuses, a
    timeout) ended the round, and every node after it lost its uptime evidence for that look."""
    nodes = [{"metadata": {"name": n}, "spec": {"owner": n}, "status": {"phase": "Ready"}} for n in ("a", "b", "c")]
    sampled: list[str] = []

    def apply(self: Any, node: str, max_gap_s: float, owner_extra: float) -> int:
        if node == "a":
            error = ApiException(status=422, reason="Unprocessable Entity")
            error.body = '{"message": "the whole response"}'
            raise error
        if node == "b":
            raise ConnectionResetError("peer went away")
        sampled.append(node)
        return 1

    monkeypatch.setattr(ReputationBook, "_volunteers", staticmethod(lambda: nodes))
    monkeypatch.setattr(ReputationBook, "_apply_uptime", apply)
    with caplog.at_level(logging.WARNING, logger="koinon_operator.reputation_book"):
        assert await ReputationBook(clock=lambda: NOW).sample_uptime(60.0) == 1
    assert sampled == ["c"]
    assert "uptime of a not recorded: ApiException 422 Unprocessable Entity" in caplog.text
    assert "uptime of b not recorded: ConnectionResetError: peer went away" in caplog.text
    assert "the whole response" not in caplog.text  # the status and reason, not the reply


def _volunteer(name: str, owner: str | None, disagreements: float = 0.0) -> dict[str, Any]:
    status = updated_status({}, "disagreement", NOW, CONFIG, f"{name}/1/0") if disagreements else {}
    spec = {"owner": owner} if owner else {}
    return {"metadata": {"name": name}, "spec": spec, "status": status or {}}


def test_a_liars_disagreements_are_pooled_onto_its_siblings_only() -> None:
    volunteers = [_volunteer("liar", "mallory", 1.0), _volunteer("sibling", "mallory"), _volunteer("other", "bob"),
                  _volunteer("ownerless", None)]  # fmt: skip
    pooled = owner_pooled_disagreements(volunteers, NOW, CONFIG)
    assert pooled["sibling"] == pytest.approx(CONFIG.owner_disagreement_pooling)
    assert pooled["liar"] == 0.0  # its own disagreement is already in its own counts
    assert pooled["other"] == 0.0 and pooled["ownerless"] == 0.0
    # Aged as the evidence is: a year later the pooled weight has decayed with it.
    assert owner_pooled_disagreements(volunteers, NOW + 365 * 86400, CONFIG)["sibling"] < pooled["sibling"] / 100


async def test_the_sampler_writes_the_siblings_pooled_disagreements_into_their_score(
    cluster: EmulatorThread,
) -> None:
    """``ownerDisagreements`` was written as 0 whatever the owner's other nodes did, and the score
    in status left it out, so `kubectl get vn` showed a liar's sibling as clean while the scheduler
    already held its owner's lies against it."""
    sibling = {"apiVersion": API, "kind": "VolunteerNode", "metadata": {"name": "vn-b"}, "spec": {"owner": "alice"}}
    cluster.call(lambda e: e.create(sibling))
    ready = {"status": {"phase": "Ready", "connected": True}}
    cluster.call(lambda e: e.patch(API, "VolunteerNode", "vn-a", ready, subresource="status"))
    cluster.call(lambda e: e.patch(API, "VolunteerNode", "vn-b", ready, subresource="status"))
    book = ReputationBook(clock=lambda: NOW)
    await book.sample_uptime(60)
    clean = cluster.call(lambda e: e.get(API, "VolunteerNode", "vn-b"))["status"]["reputation"]
    assert clean["ownerDisagreements"] == 0
    await book.record([("vn-a", "disagreement")], "uid-1/1/0")  # vn-a is caught lying
    book = ReputationBook(clock=lambda: NOW + 60)
    await book.sample_uptime(60)
    pooled = cluster.call(lambda e: e.get(API, "VolunteerNode", "vn-b"))["status"]["reputation"]
    assert pooled["ownerDisagreements"] == pytest.approx(CONFIG.owner_disagreement_pooling, rel=1e-3)
    assert pooled["lowerBound"] < clean["lowerBound"]
    # Evidence recorded on the sibling before the next look keeps the pooled share in its score.
    await book.record([("vn-b", "success")], "uid-2/1/0")
    after = cluster.call(lambda e: e.get(API, "VolunteerNode", "vn-b"))["status"]["reputation"]
    assert after["ownerDisagreements"] == pooled["ownerDisagreements"]


async def test_a_busy_node_still_gets_its_evidence(cluster: EmulatorThread) -> None:
    """Five quick tries lost the evidence when other writers (the gateway's status, other passes)
    went first five times in a row; retried with pauses, it is counted."""
    races: list[int] = []

    def clock_with_eight_racing_writes() -> float:
        if len(races) < 8:  # called between each read and its write
            races.append(1)
            latency = {"status": {"latency": {"smoothedMs": float(len(races))}}}
            cluster.call(lambda e: e.patch(API, "VolunteerNode", "vn-a", latency, subresource="status"))
        return NOW

    await ReputationBook(clock=clock_with_eight_racing_writes).record([("vn-a", "success")], "uid-1/1/0")
    status = _status(cluster)
    assert len(races) == 8
    assert status["jobs"] == {"succeeded": 1}
    assert status["latency"] == {"smoothedMs": 8.0}


def _outage(reason: str, since: float) -> dict[str, Any]:
    when = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ready = {"type": "Ready", "status": "False", "reason": reason, "message": "-", "lastTransitionTime": when}
    return {"phase": "NotReady", "connected": False, "conditions": [ready]}


@pytest.mark.parametrize("reason", ["GatewayStopped", "GatewayRestarted"])
def test_the_gateways_own_outage_is_not_the_volunteers_downtime(reason: str) -> None:
    """Every node is NotReady while the gateway restarts: that was counted as missed heartbeats
    against every volunteer (uptime weighs on placement)."""
    start = uptime_sample({"phase": "Ready"}, NOW, CONFIG, max_gap_s=120)
    assert start is not None
    after = uptime_sample({**_outage(reason, NOW), **start}, NOW + 60, CONFIG, max_gap_s=120)
    assert after is not None
    assert after["reputation"]["heartbeatsMissed"] == 0.0 and after["reputation"]["uptimeSampledAt"] == NOW + 60
    # A node still not back ten minutes after the gateway is down as any other.
    later = uptime_sample({**_outage(reason, NOW), **after}, NOW + 660, CONFIG, max_gap_s=120)
    assert later is not None and later["reputation"]["heartbeatsMissed"] == pytest.approx(24.0, rel=1e-3)
    # The volunteer's own reasons count at once.
    own = uptime_sample({**_outage("HeartbeatTimeout", NOW), **start}, NOW + 60, CONFIG, max_gap_s=120)
    assert own is not None and own["reputation"]["heartbeatsMissed"] == pytest.approx(12.0, rel=1e-3)


def test_a_node_that_never_connected_has_no_uptime_evidence() -> None:
    start = uptime_sample({"phase": "Pending"}, NOW, CONFIG, max_gap_s=120)
    assert start is not None
    after = uptime_sample({"phase": "Pending", **start}, NOW + 60, CONFIG, max_gap_s=120)
    assert after is not None
    assert (after["reputation"]["heartbeatsSeen"], after["reputation"]["heartbeatsMissed"]) == (0.0, 0.0)


def test_a_ready_status_nobody_refreshed_for_minutes_earns_no_uptime() -> None:
    # The gateway refreshes a connected node's lastHeartbeat every 30 s. One that is down (or
    # crash-looping before it marks its nodes) leaves them Ready with an ever older heartbeat:
    # they were credited with uptime hour after hour. Nobody knows: no evidence either way.
    def heard(seconds_ago: float) -> dict[str, Any]:
        when = datetime.fromtimestamp(NOW - seconds_ago, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"phase": "Ready", "connected": True, "lastHeartbeat": when}

    start = uptime_sample(heard(3600), NOW - 60, CONFIG, max_gap_s=120)
    assert start is not None
    silent = uptime_sample({**heard(3600), **start}, NOW, CONFIG, max_gap_s=120)
    assert silent is not None
    assert (silent["reputation"]["heartbeatsSeen"], silent["reputation"]["heartbeatsMissed"]) == (0.0, 0.0)
    fresh = uptime_sample({**heard(20), **start}, NOW, CONFIG, max_gap_s=120)
    assert fresh is not None and fresh["reputation"]["heartbeatsSeen"] == pytest.approx(12.0, rel=1e-3)


async def test_an_api_outage_ends_the_uptime_round_after_a_few_failures(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With the API unreachable every node's write fails alike: a request and a warning for each
    of 500 volunteers once a minute, for as long as the outage lasts."""
    nodes = [
        {"metadata": {"name": f"n{i}"}, "spec": {"owner": f"o{i}"}, "status": {"phase": "Ready"}} for i in range(500)
    ]
    tried: list[str] = []

    def apply(self: Any, node: str, max_gap_s: float, owner_extra: float) -> int:
        tried.append(node)
        if node == "n1":  # one node's own refusal resets the count
            raise ApiException(status=422, reason="Unprocessable Entity")
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    monkeypatch.setattr(ReputationBook, "_volunteers", staticmethod(lambda: nodes))
    monkeypatch.setattr(ReputationBook, "_apply_uptime", apply)
    with caplog.at_level(logging.WARNING, logger="koinon_operator.reputation_book"):
        assert await ReputationBook(clock=lambda: NOW).sample_uptime(60.0) == 0
    assert tried == ["n0", "n1", "n2", "n3", "n4"]
    assert "uptime round ended: 3 API failures in a row" in caplog.text
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 6
