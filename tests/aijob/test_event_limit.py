"""kopf cuts an Event message over 1024 characters to its first and last ~510: the operator's
"retry 1/2" or "backoffLimit reached" must not sit in the cut middle after a long Ray reason."""

from __future__ import annotations

from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import submission_id_for

from tests.aijob.fake_ray import UID, Clock, FakeRay, make_body, make_reconciler, step
from tests.aijob.test_aijob_api_surface import _run_to_running


def _as_kopf_posts(message: str, limit: int = 1024, infix: str = "...") -> str:
    """kopf._cogs.clients.events.post_event's cut."""
    if len(message) <= limit:
        return message
    return message[: limit // 2 - len(infix) // 2] + infix + message[-limit // 2 + (len(infix) - len(infix) // 2) :]


async def test_retry_words_survive_the_event_limit_after_a_long_ray_reason() -> None:
    ray, clock = FakeRay(), Clock()
    ray.logs_text = "".join(f"step {i}: loss=nan, something went wrong in the training loop here\n" for i in range(20))
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 2})
    await _run_to_running(reconciler, ray, clock, body, attempt=1)
    reason = "Job supervisor actor failed: " + "ray.exceptions.RayActorError: The actor died unexpectedly. " * 12
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=None, message=reason)
    outcome = await step(reconciler, body)
    assert body["status"]["reason"] == "BackOff"
    posted = [_as_kopf_posts(e.message) for e in outcome.events if e.type == "Warning"]
    assert posted and all("retry 1/2" in m for m in posted), posted
