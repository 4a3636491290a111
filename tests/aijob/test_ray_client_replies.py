"""Replies of the Ray Job API that are JSON but not of the shape the client knows (a proxy's, another
Ray version's) count as Ray failing: retried with backoff and reported on the AIJob, not raised out
of the handler. Against a local HTTP server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from koinon_operator.inventory import RayNodeCache
from koinon_operator.placement import FirstFitPlacer
from koinon_operator.ray_jobs import RayJobsClient, RayJobState, RayUnavailableError, Submission
from koinon_operator.reconciler import AIJobReconciler, foreign_submission, submission_id_for

from tests.aijob.fake_ray import UID, VOLUNTEERS, make_body


@pytest.fixture
async def ray_api() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(base URL, replies by path): every request gets 200 with the JSON stored for its path (an
    int stored: that status, no body). The paths asked are listed under "asked"."""
    replies: dict[str, Any] = {"asked": []}

    async def handler(request: web.Request) -> web.Response:
        replies["asked"].append(request.path)
        reply = replies.get(request.path, {})
        if isinstance(reply, int):
            return web.Response(status=reply)
        if isinstance(reply, bytes):  # as Ray serves a log file: raw bytes, text/plain, no charset
            return web.Response(body=reply, content_type="text/plain")
        return web.json_response(reply)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", replies
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "reply",
    [{}, {"status": "QUEUED"}, {"job": {"status": "RUNNING"}}, {"status": "RUNNING", "driver_exit_code": "0"}],
    ids=["empty-object", "unknown-status", "wrapped", "exit-code-as-text"],
)
async def test_job_status_of_another_shape_is_ray_failing(ray_api: tuple[str, dict[str, Any]], reply: Any) -> None:
    url, replies = ray_api
    replies["/api/jobs/x"] = reply
    client = RayJobsClient(url)
    try:
        with pytest.raises(RayUnavailableError, match="malformed reply to job status"):
            await client.get("x")
        replies["/api/jobs/x"] = {"status": "RUNNING", "start_time": 1.0e12, "driver_exit_code": None}
        info = await client.get("x")  # the shape Ray 2.60 answers is read as before
        assert info is not None and (info.state, info.start_time_ms) == (RayJobState.RUNNING, 10**12)
    finally:
        await client.close()


async def test_the_job_list_skips_rows_it_cannot_read_and_a_reply_of_another_shape_is_ray_failing(
    ray_api: tuple[str, dict[str, Any]],
) -> None:
    """The orphan sweep's list: unfinished jobs only; one odd row (a driver started by hand has no
    submission id, another Ray version's status) does not hide the others; a reply that is no list
    is Ray failing."""
    url, replies = ray_api
    client = RayJobsClient(url)
    try:
        replies["/api/jobs/"] = [
            {"submission_id": None, "status": "RUNNING"},
            {"submission_id": "koinon-x-1", "status": "QUEUED"},
            {"submission_id": "koinon-z-1", "status": "SUCCEEDED", "start_time": 1.0e12, "entrypoint": "e"},
            "garbage",
            {"submission_id": "koinon-y-1", "status": "RUNNING", "start_time": 1.0e12, "entrypoint": "e",
             "metadata": {"koinon.dev/aijob": "ns/y"}},
        ]  # fmt: skip
        (job,) = await client.list_unfinished_jobs()
        assert (job.submission_id, job.state, job.start_time_ms) == ("koinon-y-1", RayJobState.RUNNING, 10**12)
        assert job.submitted is not None and job.submitted.metadata == {"koinon.dev/aijob": "ns/y"}
        replies["/api/jobs/"] = {"jobs": []}
        with pytest.raises(RayUnavailableError, match="job list"):
            await client.list_unfinished_jobs()
    finally:
        await client.close()


@pytest.mark.parametrize(
    "reply",
    [{"data": []}, {"data": {"result": {"result": [{"node_ip": "127.0.20.1", "state": "ALIVE"}]}}}],
    ids=["data-is-a-list", "row-without-node_id"],
)
async def test_node_list_of_another_shape_is_ray_failing(ray_api: tuple[str, dict[str, Any]], reply: Any) -> None:
    url, replies = ray_api
    replies["/api/v0/nodes"] = reply
    client = RayJobsClient(url)
    try:
        with pytest.raises(RayUnavailableError, match="malformed reply to node list"):
            await client.nodes()
    finally:
        await client.close()


async def test_a_malformed_status_reply_is_reported_on_the_aijob(ray_api: tuple[str, dict[str, Any]]) -> None:
    url, replies = ray_api
    replies[f"/api/jobs/koinon-{UID}-1"] = {"status": "QUEUED"}
    client = RayJobsClient(url)
    reconciler = AIJobReconciler(ray=client, placer=FirstFitPlacer(), nodes=RayNodeCache(client))
    body = make_body({"entrypoint": "python x.py"})
    body["status"] = {
        "phase": "Scheduled",
        "attempts": 1,
        "submissionId": f"koinon-{UID}-1",
        "assignedNodes": ["vn-1"],
        "traceId": UID.replace("-", ""),
    }
    try:
        outcome = await reconciler.reconcile(body, {}, {})
    finally:
        await client.close()
    conditions = {c["type"]: c for c in outcome.status["conditions"]}
    assert conditions["RayReachable"]["status"] == "False"
    assert "malformed reply to job status" in conditions["RayReachable"]["message"]


async def test_a_driver_log_that_is_not_utf8_still_concludes_the_job(ray_api: tuple[str, dict[str, Any]]) -> None:
    """One byte of Latin-1 (or a C extension's, or a binary dump's) in the driver's log raised a
    UnicodeDecodeError out of the reconciler: kopf retried the pass every minute for ever and the
    job stayed Running on its volunteer, with nothing in its status saying why."""
    url, replies = ray_api
    submission_id = submission_id_for(UID, 1)
    replies[f"/api/jobs/{submission_id}"] = {
        "status": "SUCCEEDED", "driver_node_id": "r1", "start_time": 1, "end_time": 1, "driver_exit_code": 0,
        "error_type": None,
    }  # fmt: skip
    node = {"node_id": "r1", "node_ip": "127.0.20.1", "state": "ALIVE", "is_head_node": False,
            "resources_total": {"GPU": 1, "CPU": 4}, "labels": {"koinon.dev/node": "vn-1"}}  # fmt: skip
    replies["/api/v0/nodes"] = {"data": {"result": {"result": [node]}}}
    replies["/api/v0/logs/file"] = b"loss \xe9t\xe9 0.1\nKOINON_RESULT 42\n"
    client = RayJobsClient(url)
    reconciler = AIJobReconciler(ray=client, placer=FirstFitPlacer(), nodes=RayNodeCache(client, max_age_seconds=0))
    body = make_body({"entrypoint": "python x.py"})
    body["status"] = {
        "phase": "Running", "attempts": 1, "submissionId": submission_id, "assignedNodes": ["vn-1"],
        "rayNodeIds": ["r1"], "startTime": "2026-01-01T00:00:05Z", "traceId": "t",
        "scheduling": {"addresses": ["127.0.20.1"], "owners": ["alice"], "copies": 1, "replicas": 1},
    }  # fmt: skip
    try:
        outcome = await reconciler.reconcile(body, {}, VOLUNTEERS)
    finally:
        await client.close()
    assert outcome.status.get("phase") == "Succeeded", outcome.status


async def test_rays_error_type_is_read(ray_api: tuple[str, dict[str, Any]]) -> None:
    url, replies = ray_api
    replies["/api/jobs/koinon-x-1"] = {"status": "FAILED", "error_type": "RUNTIME_ENV_SETUP_FAILURE"}
    client = RayJobsClient(url)
    try:
        info = await client.get("koinon-x-1")
    finally:
        await client.close()
    assert info is not None and info.error_type == "RUNTIME_ENV_SETUP_FAILURE"


async def test_what_a_job_was_submitted_with_is_read_back_for_the_operator_to_compare(
    ray_api: tuple[str, dict[str, Any]],
) -> None:
    """The fields of Ray 2.60's job status reply that say what the job was submitted with: the
    reconciler takes a job found under one of its ids only if they match (foreign_submission)."""
    url, replies = ray_api
    submission = Submission(
        "koinon-x-1-00ff", "python x.py", {"env_vars": {"KOINON_COPY": "0"}}, {"node:127.0.0.9": 0.001},
        {"koinon.dev/aijob": "ns/j", "koinon.dev/attempt": "1", "koinon.dev/copy": "0"},
    )  # fmt: skip
    replies["/api/jobs/koinon-x-1-00ff"] = {  # Ray 2.60's reply leaves the entrypoint's resources out
        "status": "RUNNING", "entrypoint": submission.entrypoint, "runtime_env": dict(submission.runtime_env),
        "metadata": dict(submission.metadata),
    }  # fmt: skip
    replies["/api/jobs/koinon-x-2"] = {"status": "RUNNING"}  # a reply that does not say
    client = RayJobsClient(url)
    try:
        info = await client.get("koinon-x-1-00ff")
        unsaid = await client.get("koinon-x-2")
    finally:
        await client.close()
    assert info is not None and info.submitted is not None
    assert info.submitted.entrypoint == "python x.py" and info.submitted.metadata == submission.metadata
    assert info.submitted.entrypoint_resources is None
    assert foreign_submission(submission, info) is None
    assert foreign_submission(replace(submission, entrypoint="python forge.py"), info) == "entrypoint"
    assert unsaid is not None and unsaid.submitted is None


async def test_a_driver_log_its_node_does_not_serve_is_not_read_from_the_heads_job_logs(
    ray_api: tuple[str, dict[str, Any]],
) -> None:
    """The head's /api/jobs/<id>/logs reads the log from the agent address the job's record names,
    and that record lives in GCS, where any holder of the cluster's Ray token can write it: a log
    asked of a known driver node is read from that node or not at all (Ray failing, retried)."""
    url, replies = ray_api
    replies["/api/v0/logs/file"] = 500
    replies["/api/jobs/koinon-x-1/logs"] = {"logs": "KOINON_RESULT forged\n"}
    client = RayJobsClient(url)
    try:
        with pytest.raises(RayUnavailableError, match="not served by Ray node r1"):
            await client.logs("koinon-x-1", "r1")
        assert "/api/jobs/koinon-x-1/logs" not in replies["asked"]
        # Without a driver node (a copy placed before Ray node ids were recorded): the head's, as before.
        assert await client.logs("koinon-x-1") == "KOINON_RESULT forged\n"
    finally:
        await client.close()
