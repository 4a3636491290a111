"""Whether a trusted volunteer's job is spot-checked (run again elsewhere) is a coin only the
operator can compute: the volunteer can learn the AIJob's uid and attempt the coin is drawn from
(its Ray submission id, its driver's KOINON_ATTEMPT), and with the public, unsalted coin it had, a
liar knew when its copy was the only one and lied only then, never caught. The coin is drawn from
the uid, not the name: an AIJob re-created under the same name draws afresh.

Reconciler passes against the fake Ray Job API and the real scheduler, as in
tests/aijob/test_verification_rounds.py."""

from __future__ import annotations

from typing import Any

from koinon_operator.inventory import build_capacity
from koinon_operator.placement import PlacementRequest
from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import copy_submission_id_from
from koinon_operator.scheduler import DEFAULT_CONFIG
from koinon_operator.scheduler.verification import TrustRecord, skip_probability, stable_seed, unit_interval
from koinon_operator.scheduling import ReputationPlacer

from .fake_ray import Clock, make_body, step
from .test_verification_rounds import FORGED, SEED_KEY, CopiesRay, ray_node, reconciler, volunteers

TRUSTED = {"consecutiveValid": 50, "successes": 50}
SKIP = skip_probability(TrustRecord(consecutive_valid=50), DEFAULT_CONFIG.verification)


def trusted_volunteers(names: list[str]) -> dict[str, dict[str, Any]]:
    vols = volunteers(names)
    for name in names:
        vols[name]["status"]["reputation"] = dict(TRUSTED)
    return vols


def uid_of(name: str) -> str:
    """The uid the tests give the AIJob ``name`` (each its own, as the API server would)."""
    return f"uid-{name}"


def replicated(name: str, uid: str | None = None) -> dict[str, Any]:
    spec = {"entrypoint": "python x.py", "verification": {"mode": "replicated", "quorum": 2}}
    return make_body(spec, name=name, uid=uid_of(name) if uid is None else uid)


async def submit_all(rec: Any, ray: CopiesRay, clock: Clock, body: dict[str, Any], v: dict[str, Any]) -> list[str]:
    """Passes until every copy of the attempt is submitted; their submission ids."""
    for _ in range(10):
        await step(rec, body, v)
        clock.advance(40)
        status = body["status"]
        copies = int((status.get("scheduling") or {}).get("copies") or 1)
        ids = [copy_submission_id_from(status.get("submissionId"), k) or "" for k in range(copies)]
        if status.get("assignedNodes") and all(i in ray.jobs for i in ids):
            return ids
    raise AssertionError(body["status"])


def public_coin_copies(uid: str, attempt: int) -> int:
    """What a volunteer computes from the uid and attempt it can learn, with the coin it can know."""
    return 1 if unit_interval(stable_seed(uid, attempt)) < SKIP else 2


async def test_a_trusted_node_cannot_tell_from_its_own_env_whether_it_is_spot_checked() -> None:
    runs, predicted_right, checked = 24, 0, 0
    for i in range(runs):
        ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
        rec, body = reconciler(ray, clock), replicated(f"job-{i}")
        ids = await submit_all(rec, ray, clock, body, trusted_volunteers(ray.present))
        env = next(s for s in ray.submissions if s.submission_id == ids[0]).runtime_env["env_vars"]
        uid = body["metadata"]["uid"]  # in the submission id, for the volunteer to read
        predicted_right += public_coin_copies(uid, int(env["KOINON_ATTEMPT"])) == len(ids)
        checked += len(ids) > 1
    assert 0 < checked < runs  # trusted nodes skip, and are still spot-checked
    assert predicted_right < runs, "every spot-check was predicted by the node from its own environment"


def trusted_capacity() -> list[Any]:
    names = ["vn-a", "vn-c"]
    return build_capacity([ray_node(i, n) for i, n in enumerate(names)], trusted_volunteers(names), [])


def copies_drawn(placer: ReputationPlacer, keys: list[str], uids: list[str] | None = None) -> list[int]:
    """The copies `placer` gives each job (attempt 1) on two trusted nodes of distinct owners; each
    job's uid is `uid_of` its name unless ``uids`` are given."""
    capacity, out = trusted_capacity(), []
    for k, key in enumerate(keys):
        uid = uid_of(key.split("/")[1]) if uids is None else uids[k]
        request = PlacementRequest(key, 1, 1, 1.0, distinct_owners=True, verification_quorum=2, attempt=1, uid=uid)
        decision = placer.place(request, capacity)
        assert decision.placed, decision.message
        out.append(decision.copies)
    return out


JOBS = [f"ns/job-{i}" for i in range(200)]


def test_a_placer_given_no_key_keys_its_coin_with_a_secret_of_its_process() -> None:
    """A placer given no key (the operator gives it one derived from its Secret: test_submission_ids)
    keys the coin with a random key of its own: not the public coin, not another process's; and a
    job asking again (one still waiting for nodes) gets the same coin."""
    one, other = ReputationPlacer(), ReputationPlacer()
    drawn = copies_drawn(one, JOBS)
    assert 1 in drawn and 2 in drawn
    assert copies_drawn(one, JOBS) == drawn  # the same jobs, placed again by the same process
    assert drawn != [public_coin_copies(uid_of(key.split("/")[1]), 1) for key in JOBS]
    assert copies_drawn(other, JOBS) != drawn
    # Reproducible for whoever holds the key.
    assert copies_drawn(ReputationPlacer(seed_key=SEED_KEY), JOBS) == copies_drawn(
        ReputationPlacer(seed_key=SEED_KEY), JOBS
    )


async def test_copies_recorded_at_placement_are_followed_after_a_restart() -> None:
    """The coin is drawn once, at placement, and the copies are recorded in status: an operator
    restarted (with another key: one from before the coin's key was derived from the Secret)
    between placement and submission submits what was placed."""
    ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
    v = trusted_volunteers(ray.present)
    restarted_key = b"after the restart"
    before = copies_drawn(ReputationPlacer(seed_key=SEED_KEY), JOBS)
    after = copies_drawn(ReputationPlacer(seed_key=restarted_key), JOBS)
    # A job whose coin the restarted operator's key draws the other way.
    name = next(key for key, b, a in zip(JOBS, before, after, strict=True) if b != a).split("/")[1]
    body = replicated(name)
    await step(reconciler(ray, clock), body, v)  # placed; nothing submitted yet
    copies = body["status"]["scheduling"]["copies"]
    ids = await submit_all(reconciler(ray, clock, seed_key=restarted_key), ray, clock, body, v)
    assert len(ids) == copies and len(ray.submissions) == copies


def test_a_job_recreated_under_the_same_name_is_still_spot_checked() -> None:
    """Review repro: the coin was drawn from namespace/name and attempt, so every re-creation of a
    job under one name (a nightly job, the README's "re-create it to run it again" after
    ResultRevoked) drew its predecessor's coin for the life of the process: one that skipped
    verification once skipped it every time. Drawn from the uid, about 1 in 10 is checked."""
    placer = ReputationPlacer(seed_key=SEED_KEY)
    runs = 100
    uids = [f"uid-nightly-{run}" for run in range(runs)]  # each re-creation a new object, attempt 1
    drawn = copies_drawn(placer, ["team-a/nightly"] * runs, uids)
    checked = sum(c > 1 for c in drawn)
    assert 0 < checked < runs, f"{checked}/{runs} re-created runs were spot-checked: the coin never changes"
    # One object asking again (still waiting for nodes) keeps its coin.
    assert copies_drawn(placer, ["team-a/nightly"] * runs, uids) == drawn


async def test_the_operator_draws_a_fresh_coin_for_a_job_recreated_under_the_same_name() -> None:
    """The reconciler hands the AIJob's uid to placement: one operator process (one key) placing
    the same-named AIJob re-created again and again spot-checks some runs and skips others."""
    ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
    v = trusted_volunteers(ray.present)
    drawn = []
    for run in range(60):
        body = replicated("nightly", uid=f"uid-nightly-{run}")
        await step(reconciler(ray, clock), body, v)  # the same key as one process: placed, not submitted
        drawn.append(body["status"]["scheduling"]["copies"])
    assert 1 in drawn and 2 in drawn, drawn


async def test_a_trusted_liar_cannot_reroll_its_spot_check_by_stopping_the_check_copy() -> None:
    """Review repro (dver1): vn-a is trusted and lies. Whenever its job is spot-checked (a second
    copy, which it sees in the head's job list) it stops that copy through the Job API: nothing
    failed, so the attempt ran again uncounted, blaming nobody, and the next attempt drew the coin
    afresh; soon the skip came up and its forged answer, alone, was the job's result, never
    charged. Once an attempt is checked, every later attempt of the job is too, whatever operator
    process (each with its own coin) places it: the job is held (uncounted reruns, denial of service
    only), never accepted unchecked."""
    ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
    vols = trusted_volunteers(ray.present)
    checked_jobs = 0
    for i in range(60):
        body = replicated(f"job-{i}")
        checked_at = None
        for attempt in range(8):
            rec = reconciler(ray, clock, seed_key=SEED_KEY + bytes([attempt]))  # an operator restart
            ids = await submit_all(rec, ray, clock, body, vols)
            status = body["status"]
            nodes = status["assignedNodes"]
            if len(ids) > 1 and checked_at is None:
                checked_at = status["attempts"]
            if checked_at is not None:
                assert len(ids) == 2, f"job-{i}: checked at attempt {checked_at}, attempt {status['attempts']} not"
            for node, sub in zip(nodes, ids, strict=True):
                if node == "vn-a":  # its own copy answers (forged)
                    ray.logs_by_id[sub] = FORGED
                    ray.set_state(sub, RayJobState.SUCCEEDED, exit_code=0)
                elif len(ids) > 1:
                    await ray.stop(sub)  # `ray job stop` through the head, by vn-a
                else:
                    ray.set_state(sub, RayJobState.SUCCEEDED, exit_code=0)
            await step(rec, body, vols)
            if body["status"].get("phase") in ("Succeeded", "Failed"):
                break
        status = body["status"]
        if checked_at is not None:
            checked_jobs += 1
            assert status["phase"] == "Pending", (
                f"job-{i}: spot-checked at attempt {checked_at}, the liar stopped the check copy, and the "
                f"job ended {status['phase']}/{status.get('reason')} at attempt {status['attempts']}: "
                f"{status.get('result')}"
            )
            assert status["reason"] == "RayJobStopped" and not status.get("failures")
            assert status["scheduling"]["checkedCopies"] == 2  # recorded at placement, for later attempts
            if checked_jobs == 3:
                return
    raise AssertionError(f"only {checked_jobs} job(s) spot-checked: the test did not exercise the path")
