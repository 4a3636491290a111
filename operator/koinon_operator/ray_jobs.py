"""The Ray Job Submission REST API (served by the head's dashboard), as the operator needs it.

Errors are split in two: ``RayUnavailableError`` (connection refused, timeouts, 5xx: retry later,
change nothing) and ``RayRequestError`` (the request itself was refused).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp


class RayUnavailableError(RuntimeError):
    """Ray's dashboard could not be reached or failed transiently."""


class RayAuthError(RayUnavailableError):
    """Ray refused our token: nothing works until the operator gets the right one (an operator fault,
    not the job's), so it is handled like an outage: no phase changes, a condition says why."""


class RayRequestError(RuntimeError):
    """Ray refused a request (bad input); retrying the same request will not help."""


class RayJobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (RayJobState.STOPPED, RayJobState.SUCCEEDED, RayJobState.FAILED)


_UNFINISHED = frozenset({RayJobState.PENDING.value, RayJobState.RUNNING.value})
# Timeout of a list of every job Ray recorded (RayJobsClient.list_unfinished_jobs).
LIST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SubmittedAs:
    """What Ray records a job was submitted with, as its Job API reports it back: what the
    operator compares with what it submits under that id before taking the job as its own (any
    holder of the cluster's Ray token can submit under any id). Values as Ray's JSON has them."""

    entrypoint: str
    runtime_env: Any  # a dict when submitted with one; None without
    metadata: Any
    # None where Ray does not report them: Ray 2.60's job status reply leaves these out.
    entrypoint_resources: Any = None
    entrypoint_num_cpus: Any = None
    entrypoint_num_gpus: Any = None
    entrypoint_memory: Any = None


@dataclass(frozen=True)
class RayJobInfo:
    submission_id: str
    state: RayJobState
    message: str
    driver_node_id: str | None
    start_time_ms: int | None
    end_time_ms: int | None
    driver_exit_code: int | None
    # Ray's JobErrorType for a job that failed around its driver (RUNTIME_ENV_SETUP_FAILURE,
    # JOB_SUPERVISOR_ACTOR_START_FAILURE, ...); None when the driver ran, or Ray did not say.
    error_type: str | None = None
    # What the job was submitted with; None when Ray's reply did not say (no entrypoint in it).
    submitted: SubmittedAs | None = None


@dataclass(frozen=True)
class RayNodeInfo:
    node_id: str
    address: str
    alive: bool
    is_head: bool
    resources_total: Mapping[str, float]
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Submission:
    submission_id: str
    entrypoint: str
    runtime_env: Mapping[str, Any]
    entrypoint_resources: Mapping[str, float]
    metadata: Mapping[str, str]


_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\",)]+")
# A URL's userinfo ("user:password@" before the host), found without parsing the URL: after "//",
# or any "/" or the start, so that a configured address that is no URL (user:pw@ray:8265,
# http:/user:pw@ray, refused at start) is shown redacted too. Greedy up to the last "@" before the
# next "/", as urllib.parse.urlsplit splits the netloc.
_USERINFO = re.compile(r"(^|/)([^/?#\s'\"]*)@")


def redact_url(text: str) -> str:
    """``text`` with the password of every URL's userinfo shown as ``***`` (a user name alone, which
    may be the credential itself, too). KOINON_RAY_DASHBOARD may be ``http://user:password@host``
    (aiohttp sends that as Basic auth, for a dashboard behind an authenticating proxy); each
    message that names the dashboard reaches status conditions, Events, logs and spans."""

    def redacted(match: re.Match[str]) -> str:
        user, colon, _ = match.group(2).partition(":")
        return f"{match.group(1)}{user}:***@" if colon else f"{match.group(1)}***@"

    return _USERINFO.sub(redacted, text)


def describe_error(error: BaseException) -> str:
    """An HTTP client error for status conditions and logs, which every reader of the namespace's
    AIJobs sees: its plain text, never its repr (aiohttp's holds the request's headers, the Ray
    token among them), and any bearer token that still appears blanked."""
    return _BEARER.sub(r"\1<redacted>", f"{type(error).__name__}: {error}")


class RayJobsClient:
    def __init__(self, dashboard_url: str, timeout_seconds: float = 10.0, auth_token: str | None = None) -> None:
        self._base = dashboard_url.rstrip("/")  # its userinfo, if any, is sent as Basic auth
        # What messages name: the URL without its password (they reach status, Events and spans).
        self._shown = redact_url(self._base)
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        # Ray token authentication: the dashboard wants "Authorization: Bearer <token>".
        self._headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _request(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> tuple[int, Any]:
        session = await self._client()
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else self._timeout
        try:
            async with session.request(method, f"{self._base}{path}", json=payload, timeout=timeout) as reply:
                text = await reply.text(errors="replace")
                body: Any
                if reply.status in (401, 403):
                    raise RayAuthError(
                        f"Ray at {self._shown} refused the operator's credentials ({reply.status}); "
                        "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token"
                    )
                try:
                    body = await reply.json(content_type=None) if text else None
                except ValueError:
                    body = text
                return reply.status, body
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            # aiohttp's errors may quote the URL (an InvalidUrlClientError quotes it whole).
            reason = redact_url(describe_error(error))
            raise RayUnavailableError(f"Ray dashboard at {self._shown} unreachable: {reason}") from error

    async def submit(self, submission: Submission) -> bool:
        """Submit; True if this call created the job, False if that id already existed."""
        status, body = await self._request(
            "POST",
            "/api/jobs/",
            {
                "entrypoint": submission.entrypoint,
                "submission_id": submission.submission_id,
                "runtime_env": dict(submission.runtime_env),
                "entrypoint_resources": dict(submission.entrypoint_resources),
                "metadata": dict(submission.metadata),
            },
        )
        if status == 200:
            return True
        text = str(body)
        if "already exists" in text:
            # Someone submitted under this id first: this operator (a restarted one, or a reply
            # lost), or anyone else with the cluster's Ray token. The reconciler takes it as the
            # attempt's only if Ray's record of it matches what it submits (reconciler.foreign_submission).
            return False
        # Ray's reply on a line of its own: it may quote the runtime_env (the job's env vars), which
        # Events and status may show the job's owners but spans (the first line) must not carry.
        if status >= 500:
            raise RayUnavailableError(f"Ray refused submission ({status}):\n{text[-500:]}")
        raise RayRequestError(f"Ray rejected submission ({status}):\n{text[-500:]}")

    async def get(self, submission_id: str) -> RayJobInfo | None:
        status, body = await self._request("GET", f"/api/jobs/{submission_id}")
        if status == 404:
            return None
        if status != 200 or not isinstance(body, dict):
            raise RayUnavailableError(f"unexpected reply to job status ({status}): {str(body)[-300:]}")
        # A reply of another shape (a proxy's, another Ray version's) is Ray failing, not a crash.
        with _malformed_reply("job status", body):
            return _job_info(submission_id, body)

    async def list_unfinished_jobs(self) -> list[RayJobInfo]:
        """Every job Ray has not finished (PENDING or RUNNING) that has a submission id (drivers
        started by hand have none). A reply that is no list is Ray failing (RayUnavailableError); a
        row that cannot be read is left out, so one odd job (another Ray version's status) does not
        hide the others.

        Ray's Job API has no filter: the reply holds every job Ray has recorded since its head
        started (about 1 KB each, runtime_env included), so it gets a longer timeout than one
        job's calls, and finished rows are dropped before anything is built from them."""
        status, body = await self._request("GET", "/api/jobs/", timeout_s=LIST_TIMEOUT_S)
        if status != 200 or not isinstance(body, list):
            raise RayUnavailableError(f"unexpected reply to job list ({status}): {str(body)[-300:]}")
        jobs: list[RayJobInfo] = []
        for row in body:
            submission_id = row.get("submission_id") if isinstance(row, dict) else None
            if not isinstance(submission_id, str) or row.get("status") not in _UNFINISHED:
                continue
            try:
                jobs.append(_job_info(submission_id, row))
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
        return jobs

    async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        """The job driver's output.

        The driver runs on a volunteer, and its log file lives there; the job API on the head only
        has the head's part, so with a known driver node the file is read through Ray's state API,
        which fetches it from that node, and only so: a reply other than 200 is RayUnavailableError.
        The head's /api/jobs/<id>/logs, asked only without a driver node, reads it from the agent
        address the job's record names, and that record lives in GCS, where any holder of the
        cluster's Ray token can rewrite it (the reconciler never asks it for a copy it placed).
        """
        if driver_node_id:
            path = f"/api/v0/logs/file?node_id={driver_node_id}&filename=job-driver-{submission_id}.log&lines={lines}"
            session = await self._client()
            try:
                async with session.get(f"{self._base}{path}") as reply:
                    if reply.status == 200:
                        return await reply.text(errors="replace")
                    status = reply.status
            except (TimeoutError, aiohttp.ClientError, OSError) as error:
                reason = describe_error(error)
                raise RayUnavailableError(f"cannot read driver log of {submission_id}: {reason}") from error
            raise RayUnavailableError(
                f"driver log of {submission_id} not served by Ray node {driver_node_id} ({status})"
            )
        status, body = await self._request("GET", f"/api/jobs/{submission_id}/logs")
        if status == 404:
            return ""
        if status != 200 or not isinstance(body, dict):
            raise RayUnavailableError(f"unexpected reply to job logs ({status})")
        return str(body.get("logs") or "")

    async def stop(self, submission_id: str) -> None:
        status, body = await self._request("POST", f"/api/jobs/{submission_id}/stop")
        if status in (200, 404):
            return
        raise RayUnavailableError(f"stopping {submission_id} failed ({status}): {str(body)[-300:]}")

    async def nodes(self) -> list[RayNodeInfo]:
        status, body = await self._request("GET", "/api/v0/nodes?limit=10000&detail=false")
        if status != 200 or not isinstance(body, dict):
            raise RayUnavailableError(f"unexpected reply to node list ({status})")
        with _malformed_reply("node list", body):
            rows = body.get("data", {}).get("result", {}).get("result", [])
            return [
                RayNodeInfo(
                    node_id=str(row["node_id"]),
                    address=str(row["node_ip"]),
                    alive=row.get("state") == "ALIVE",
                    is_head=bool(row.get("is_head_node")),
                    resources_total=dict(row.get("resources_total") or {}),
                    labels=dict(row.get("labels") or {}),
                )
                for row in rows
            ]


def _job_info(submission_id: str, body: Mapping[str, Any]) -> RayJobInfo:
    """A job's record as Ray's Job API gives it (its status reply, or a row of its list)."""
    return RayJobInfo(
        submission_id=submission_id,
        state=RayJobState(body["status"]),
        message=str(body.get("message") or ""),
        driver_node_id=_optional_str(body.get("driver_node_id")),
        start_time_ms=_optional_int(body.get("start_time")),
        end_time_ms=_optional_int(body.get("end_time")),
        driver_exit_code=_optional_int(body.get("driver_exit_code")),
        error_type=_optional_str(body.get("error_type")),
        submitted=_submitted_as(body),
    )


@contextlib.contextmanager
def _malformed_reply(what: str, body: object) -> Iterator[None]:
    """Parsing errors of a reply become RayUnavailableError: retried with backoff, and reported
    on the AIJob (RayReachable), instead of escaping the handler."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise RayUnavailableError(f"malformed reply to {what}: {error!r}: {str(body)[-300:]}") from error


def _submitted_as(body: Mapping[str, Any]) -> SubmittedAs | None:
    """The submission fields of a job status reply, as Ray gives them (compared, never trusted)."""
    entrypoint = body.get("entrypoint")
    if not isinstance(entrypoint, str):
        return None
    return SubmittedAs(
        entrypoint=entrypoint,
        runtime_env=body.get("runtime_env"),
        metadata=body.get("metadata"),
        entrypoint_resources=body.get("entrypoint_resources"),
        entrypoint_num_cpus=body.get("entrypoint_num_cpus"),
        entrypoint_num_gpus=body.get("entrypoint_num_gpus"),
        entrypoint_memory=body.get("entrypoint_memory"),
    )


def _optional_int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return int(value)


def _optional_str(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value
