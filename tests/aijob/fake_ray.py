"""A fake Ray Job API, a settable clock and a driver that applies a reconcile pass's status the way
the API server applies kopf's patch (a JSON merge patch), for reconciler tests without Ray."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from koinon_emulator.patching import merge_patch
from koinon_operator.api.constants import FINALIZER
from koinon_operator.inventory import RayNodeCache
from koinon_operator.placement import FirstFitPlacer
from koinon_operator.ray_jobs import RayJobInfo, RayJobState, RayNodeInfo, RayRequestError, Submission, SubmittedAs
from koinon_operator.reconciler import AIJobReconciler, Outcome, submission_id_for

UID = "8f6e8530-892f-46a5-a4e3-ba60e32a06d0"
GPU = {"model": "NVIDIA L4", "memoryMiB": 24000}


def volunteer(owner: str, address: str, gpus: int = 1, **status: Any) -> dict[str, Any]:
    """A VolunteerNode as the gateway writes it: joined with ``gpus`` GPUs (spec.gpus, which bound
    what its Ray node is booked for), Ready at the virtual ``address`` its Ray node must run at."""
    return {"spec": {"owner": owner, "gpus": [GPU] * gpus}, "status": {"phase": "Ready", "address": address, **status}}


def node_address(name: str) -> str:
    """A fixed virtual address per node name, as the gateway gives each VolunteerNode one."""
    digest = hashlib.sha256(name.encode()).digest()
    return f"127.{digest[0]}.{digest[1]}.{digest[2] | 1}"


NODES = [RayNodeInfo("r1", "127.0.20.1", True, False, {"GPU": 1, "CPU": 4}, {"koinon.dev/node": "vn-1"})]
VOLUNTEERS: dict[str, dict[str, Any]] = {"vn-1": volunteer("alice", "127.0.20.1")}


def submitted_as(submission: Submission) -> SubmittedAs:
    """Ray's record of what ``submission`` was submitted with, as Ray 2.60's Job API reports it
    back: a JSON round trip of its entrypoint, runtime_env and metadata (its entrypoint resources
    are left out of the reply)."""
    return SubmittedAs(
        entrypoint=submission.entrypoint,
        runtime_env=json.loads(json.dumps(dict(submission.runtime_env))),
        metadata=dict(submission.metadata),
    )


def stop_stamped(ray: FakeRay, submission_id: str, clock: Clock) -> None:
    """``ray.stop`` as Ray does it: a job it stops ends then (its end time is the stop's)."""
    ray.stopped.append(submission_id)
    info = ray.jobs.get(submission_id)
    if info is not None and not info.state.terminal:
        end_ms = int(clock.now.timestamp() * 1000)
        ray.jobs[submission_id] = replace(info, state=RayJobState.STOPPED, end_time_ms=end_ms)


@dataclass
class FakeRay:
    jobs: dict[str, RayJobInfo] = field(default_factory=dict)
    submissions: list[Submission] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    logs_text: str = "KOINON_RESULT 42\n"
    reject_submit: str | None = None  # a RayRequestError message
    # Per submission: the Ray node its driver is pinned to (its entrypoint resource's address), as
    # listed when it was submitted; Ray's record names it once the driver runs (set_state).
    driver_nodes: dict[str, str] = field(default_factory=dict)

    async def nodes(self) -> list[RayNodeInfo]:
        return NODES

    async def submit(self, submission: Submission) -> bool:
        if self.reject_submit:
            raise RayRequestError(self.reject_submit)
        self.submissions.append(submission)
        if submission.submission_id in self.jobs:
            return False
        submitted = submitted_as(submission)  # what Ray reports back it was submitted with
        pinned = {key.removeprefix("node:") for key in submission.entrypoint_resources if key.startswith("node:")}
        for node in await self.nodes():
            if node.address in pinned and node.alive:
                self.driver_nodes[submission.submission_id] = node.node_id
        self.jobs[submission.submission_id] = RayJobInfo(
            submission.submission_id, RayJobState.PENDING, "", None, None, None, None, submitted=submitted
        )
        return True

    async def get(self, submission_id: str) -> RayJobInfo | None:
        return self.jobs.get(submission_id)

    async def list_unfinished_jobs(self) -> list[RayJobInfo]:
        return list(self.jobs.values())

    async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        return self.logs_text

    async def stop(self, submission_id: str) -> None:
        self.stopped.append(submission_id)
        info = self.jobs.get(submission_id)
        if info is not None and not info.state.terminal:
            self.set_state(submission_id, RayJobState.STOPPED)

    def set_state(
        self,
        submission_id: str,
        state: RayJobState,
        exit_code: int | None = None,
        message: str = "",
        error_type: str | None = None,
    ) -> None:
        # Ray's start_time is stamped once, when the job is submitted: a change of state keeps it
        # (None from this fake's submit, so the operator's clock stands in for it).
        previous = self.jobs.get(submission_id)
        started = previous.start_time_ms if previous is not None else None
        submitted = previous.submitted if previous is not None else None  # what it was submitted with
        # Ray's supervisor records the driver's node as the driver starts (RUNNING), and keeps it:
        # every job whose driver ran (SUCCEEDED, an exit code) names it; one that failed before
        # (its runtime_env not set up) or was stopped while PENDING names none.
        driver = previous.driver_node_id if previous is not None else None
        if state is RayJobState.RUNNING or state is RayJobState.SUCCEEDED or exit_code is not None:
            driver = driver or self.driver_nodes.get(submission_id)
        self.jobs[submission_id] = RayJobInfo(
            submission_id, state, message, driver, started, 1, exit_code, error_type, submitted
        )


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 0, 0, 10, tzinfo=UTC)
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds


def no_nonce(uid: str, attempt: int) -> str:
    """A reconciler's ``submission_nonce`` for tests that name an attempt's Ray submissions by
    ``submission_id_for(UID, attempt)``: the ids of attempts placed by an operator before nonces
    (which this one still follows). The keyed nonce has tests of its own (test_submission_ids)."""
    return ""


def make_reconciler(ray: FakeRay, clock: Clock, nonce: Callable[[str, int], str] = no_nonce) -> AIJobReconciler:
    fake: Any = ray
    return AIJobReconciler(
        ray=fake,
        placer=FirstFitPlacer(),
        nodes=RayNodeCache(fake, max_age_seconds=0.0),
        clock=lambda: clock.now,
        monotonic=lambda: clock.mono,
        submission_nonce=nonce,
    )


def make_body(spec: dict[str, Any], name: str = "j", namespace: str = "ns", uid: str = UID) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "finalizers": [FINALIZER],  # kopf's: a timer's passes wait for it (handlers._finalizer_shown)
        },
        "spec": spec,
        "status": {},
    }


async def step(
    reconciler: AIJobReconciler, body: dict[str, Any], volunteers: dict[str, dict[str, Any]] | None = None
) -> Outcome:
    """One pass on ``body``; its status patch is merged into ``body`` as the API server would."""
    outcome = await reconciler.reconcile(copy.deepcopy(body), {}, VOLUNTEERS if volunteers is None else volunteers)
    if outcome.status:
        body["status"] = merge_patch(body.get("status") or {}, outcome.status)
    return outcome


async def failed_to_start(message: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A single-copy job (backoffLimit 2) whose first attempt Ray ends with
    JOB_ENTRYPOINT_COMMAND_START_ERROR and ``message`` (the driver could not be started); the job's
    body and the reputation evidence of the pass that sees it."""
    ray, clock = FakeRay(), Clock()
    rec = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 2})
    await step(rec, body)
    await step(rec, body)  # submitted
    ray.set_state(
        submission_id_for(UID, 1), RayJobState.FAILED, message=message, error_type="JOB_ENTRYPOINT_COMMAND_START_ERROR"
    )
    clock.advance(30)
    return body, (await step(rec, body)).reputation
