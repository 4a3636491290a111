"""The orphan sweep: stops the Ray jobs of AIJobs that are gone without the operator stopping them.

A deleted AIJob's Ray job is stopped by its finalizer (handlers.stop_ray_job). An AIJob can go
without it: anyone who may patch it (the built-in ``edit`` role) can remove the finalizer, and
admins do so to unstick a namespace deletion while the operator is down. Its Ray job then ran on
for good, across restarts, on GPUs the scheduler booked again (it counts what AIJobs hold). So the
leader looks, every KOINON_ORPHAN_SWEEP_INTERVAL, at Ray's jobs under this pool's submission ids
and stops those whose AIJob no longer exists, as Kubernetes garbage-collects a Job's pods.

What makes a Ray job this pool's: its id is ``koinon-<uid>-<attempt>-<nonce>[-copy<k>]`` with the
nonce that the pool's submission key gives that uid and attempt (reconciler.keyed_submission_nonce):
no other pool sharing the Ray cluster, and no holder of the Ray token without the key, makes those.
Ids without such a nonce (placed by operators before keyed nonces, or under a key since replaced)
are left alone: nothing proves whose they are. An operator that serves one namespace (--namespace)
sweeps only the jobs whose Ray metadata names that namespace: it lists AIJobs there only, and the
jobs of the other namespaces of the pool belong to the operators that serve them.

Never stopped on incomplete information: Ray's job list is read first, the AIJob LIST after it (a
fresh LIST, not kopf's cache). Every Ray job in Ray's list was submitted after its AIJob was
created (the operator submits from the status it wrote), so an AIJob that still exists is in the
later LIST. A failed LIST skips the sweep; Ray unreachable skips it too (both tried next period).
A Ray job younger than KOINON_ORPHAN_GRACE is not stopped either, whatever the lists say.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from koinon_operator.api.constants import AIJOB_METADATA_KEY, SUBMISSION_PREFIX
from koinon_operator.ray_jobs import RayJobInfo, RayUnavailableError, describe_error

logger = logging.getLogger(__name__)

# submission_id_for and copy_submission_id: the uid (a UUID, hyphens included) is what is left
# once the attempt, the 16 hex digits of the keyed nonce and a copy suffix are taken off the end.
_KEYED_ID = re.compile(
    rf"^{re.escape(SUBMISSION_PREFIX)}-(?P<uid>.+)-(?P<attempt>[0-9]+)-(?P<nonce>[0-9a-f]{{16}})(?:-copy[0-9]+)?$"
)


class SweptRay(Protocol):
    async def list_unfinished_jobs(self) -> list[RayJobInfo]: ...

    async def stop(self, submission_id: str) -> None: ...


def owner_uid(submission_id: str, nonce: Callable[[str, int], str]) -> str | None:
    """The uid of the AIJob whose attempt this pool's key named ``submission_id`` for; None for
    an id the key did not make."""
    found = _KEYED_ID.match(submission_id)
    if found is None:
        return None
    uid, attempt = found["uid"], int(found["attempt"])
    return uid if hmac.compare_digest(nonce(uid, attempt), found["nonce"]) else None


def aijob_of(job: RayJobInfo) -> str | None:
    """The "<namespace>/<name>" the job's Ray metadata names (reconciler.submission_of); None
    when it names none."""
    metadata = job.submitted.metadata if job.submitted is not None else None
    value = metadata.get(AIJOB_METADATA_KEY) if isinstance(metadata, dict) else None
    return value if isinstance(value, str) and "/" in value else None


def aijob_namespace(job: RayJobInfo) -> str | None:
    """The namespace the job's Ray metadata names; None when it names none."""
    owner = aijob_of(job)
    return owner.split("/", 1)[0] if owner is not None else None


@dataclass
class OrphanSweeper:
    ray: SweptRay
    # The uids of every AIJob in the operator's scope, from a fresh LIST (kube.list_aijob_uids).
    list_aijob_uids: Callable[[], Awaitable[set[str]]]
    nonce: Callable[[str, int], str]  # the pool's keyed nonce (reconciler.keyed_submission_nonce)
    namespace: str | None  # the one namespace the operator serves; None: all
    grace_s: float
    clock: Callable[[], float] = time.time

    def candidates(self, jobs: list[RayJobInfo]) -> list[tuple[RayJobInfo, str]]:
        """The jobs that would be stopped if their AIJob were gone, with its uid: running or pending,
        under this pool's ids, in the operator's namespace, and submitted over the grace ago (by
        Ray's start time: a head clock behind the operator's makes jobs look older, and the order
        of the two lists, not the grace, is what keeps a live AIJob's job running)."""
        now_ms = self.clock() * 1000
        found: list[tuple[RayJobInfo, str]] = []
        for job in jobs:
            if job.state.terminal:
                continue
            uid = owner_uid(job.submission_id, self.nonce)
            if uid is None:
                continue
            if self.namespace is not None and aijob_namespace(job) != self.namespace:
                continue
            if job.start_time_ms is None or now_ms - job.start_time_ms < self.grace_s * 1000:
                continue
            found.append((job, uid))
        return found

    async def sweep(self, leading: Callable[[], bool] = lambda: True) -> list[str]:
        """One sweep; returns the submission ids it stopped. Raises RayUnavailableError when Ray
        cannot be asked, and whatever the AIJob LIST raised: nothing is stopped then."""
        candidates = self.candidates(await self.ray.list_unfinished_jobs())
        if not candidates:
            return []  # no LIST while nothing could be an orphan (most sweeps of an idle pool)
        existing = await self.list_aijob_uids()  # after Ray's list: see the module's docstring
        stopped: list[str] = []
        for job, uid in candidates:
            if uid in existing:
                continue
            if not leading():
                break  # the Lease ran out: the new leader sweeps from its own lists
            await self.ray.stop(job.submission_id)
            stopped.append(job.submission_id)
            owner = aijob_of(job)
            logger.warning(
                "stopped Ray job %s: its AIJob %s (uid %s) no longer exists (deleted without its finalizer)",
                job.submission_id,
                owner or "?",
                uid,
            )
        return stopped


async def sweep_orphans_forever(
    sweeper: OrphanSweeper, interval_s: float, is_leader: Callable[[], bool], term: Callable[[], int]
) -> None:
    """The operator's loop: one sweep per interval while it leads, each stop in the term the sweep
    began in (a lapsed leader's lists are no older than the new one's, but only one sweeps)."""
    while True:
        await asyncio.sleep(interval_s)
        if not is_leader():
            continue
        try:
            await sweeper.sweep(_in_term(is_leader, term, term()))
        except RayUnavailableError as error:
            logger.warning("orphan sweep skipped, Ray not reachable (next in %g s): %s", interval_s, error)
        except Exception as error:  # the API server away, a LIST cut short: nothing stopped, try later
            reason = describe_error(error)
            logger.warning("orphan sweep skipped, AIJobs not listed (next in %g s): %s", interval_s, reason)


def _in_term(is_leader: Callable[[], bool], term: Callable[[], int], began: int) -> Callable[[], bool]:
    return lambda: is_leader() and term() == began
