"""Ray's own runtime_env check raises multi-line ValueErrors (pip with conda): the refusal is read
from the exception line under the last traceback header, not from the message's last line."""

from __future__ import annotations

import traceback

from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import submission_id_for

from tests.aijob.fake_ray import UID, Clock, FakeRay, make_body, make_reconciler, step


def _ray_message(submission_id: str) -> str:
    from ray._private.utils import parse_runtime_env_for_task_or_actor

    try:  # what ActorClass.options(runtime_env=...) runs inside JobManager.submit_job's try
        parse_runtime_env_for_task_or_actor({"pip": ["numpy"], "conda": {"dependencies": ["scipy"]}})
    except Exception as e:
        tb_str = traceback.format_exc()
        return f"Failed to start supervisor actor {submission_id}: '{e}'. Full traceback:\n{tb_str}"
    raise AssertionError("Ray accepted pip and conda together")


async def test_a_multiline_value_error_from_ray_validation_is_a_rejection() -> None:
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    spec = {"entrypoint": "python x.py", "backoffLimit": 3,
            "runtimeEnv": {"pip": ["numpy"], "conda": {"dependencies": ["scipy"]}}}  # fmt: skip
    body = make_body(spec)
    await step(reconciler, body)
    await step(reconciler, body)  # submitted
    sid = submission_id_for(UID, 1)
    ray.set_state(sid, RayJobState.FAILED, message=_ray_message(sid), error_type="JOB_SUPERVISOR_ACTOR_START_FAILURE")
    await step(reconciler, body)
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "SubmitRejected"), (
        status["reason"],
        status["message"][:300],
    )
