"""kopf handlers: thin adapters from kopf's callbacks to the reconciler."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from koinon_operator.api.aijob import AIJobStatus, format_time
from koinon_operator.api.constants import AIJOB_PLURAL, FINALIZER, GROUP, VERSION, VOLUNTEER_PLURAL
from koinon_operator.config import OperatorConfig
from koinon_operator.inventory import Allocation, RayNodeCache
from koinon_operator.kube import (
    SUBMISSION_KEY_SECRET,
    delete_aijob,
    get_or_create_submission_key,
    list_aijob_uids,
    login,
)
from koinon_operator.leadership import LeaderElector, LeaseSettings
from koinon_operator.orphans import OrphanSweeper, sweep_orphans_forever
from koinon_operator.ray_jobs import RayJobsClient, RayUnavailableError
from koinon_operator.reconciler import AIJobReconciler, allocation_of, keyed_submission_nonce, ray_submissions_of
from koinon_operator.reputation_book import ReputationBook, outcome_key, sample_uptime_forever
from koinon_operator.revocation import ResultRechecker, recheck_results_forever
from koinon_operator.scheduling import WAITING_FOR_S, ReputationPlacer, spot_check_key
from koinon_operator.status_write import ConditionalStatusWrite, StatusRead
from koinon_operator.telemetry import JobTracer, setup_tracing, shutdown_tracing
from koinon_operator.volunteers import managed_by_gateway, status_from_ray

CONFIG = OperatorConfig.from_env()
logger = logging.getLogger(__name__)
# How long the cleanup waits for the last spans to reach the collector: a healthy one takes well
# under a second, and the pod's 30 s grace period also covers the Lease release and kopf's exit.
TRACING_SHUTDOWN_S = 5.0
# kopf's own login through the kubernetes client, as errors-ignored as kopf's default one, but
# serialised with the operator's other loads of the configuration (kube.py says why).
kopf.on.login(errors=kopf.ErrorsMode.IGNORED)(login)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="koinon.dev")
    # No create/update handlers: kopf's diff-base (a second full copy of the spec in an annotation)
    # serves nothing here, and counts against the API server's 256 KiB annotation cap.
    settings.persistence.diffbase_storage = _NoDiffBase()
    # Only warnings from kopf itself become Kubernetes Events; our own transitions are posted
    # explicitly, so `kubectl describe` shows a clean history.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # First: a start that must be tried again (the API server not answering) has started nothing.
    lease = LeaseSettings.from_env()
    submission_key = await _submission_key(lease.namespace)
    memo.tracing = setup_tracing()
    memo.tracer = JobTracer(memo.tracing)
    memo.ray = RayJobsClient(CONFIG.ray_dashboard_url, auth_token=CONFIG.ray_auth_token)
    nonce = keyed_submission_nonce(submission_key)
    memo.reconciler = AIJobReconciler(
        ray=memo.ray,
        placer=operator_placer(submission_key),
        nodes=RayNodeCache(memo.ray),
        allow_bare_ray_workers=CONFIG.allow_bare_ray_workers,
        submission_nonce=nonce,
    )
    # Stops the Ray jobs of AIJobs gone without their finalizer (orphans.py): kopf has no handler
    # for an object already gone, and the scheduler no longer counts what such a job holds.
    memo.orphans = OrphanSweeper(
        ray=memo.ray,
        list_aijob_uids=lambda: list_aijob_uids(CONFIG.namespace),
        nonce=nonce,
        namespace=CONFIG.namespace,
        grace_s=CONFIG.orphan_grace_seconds,
    )
    memo.reputation = ReputationBook()
    # A plain task, not a kopf timer: a timer puts kopf's finalizer on every VolunteerNode it
    # matches, and deleting a gateway-owned node must not wait for the operator.
    # Only the holder of the pool's Lease reconciles (leadership.py says why); the others wait.
    memo.leader = LeaderElector(lease)
    memo.leader.on_change = lambda leading: memo.reconciler.forget_memory()
    memo.leader_election = asyncio.create_task(memo.leader.run_forever())
    leading = lambda: memo.leader.is_leader  # noqa: E731
    memo.uptime_sampler = asyncio.create_task(
        sample_uptime_forever(memo.reputation, CONFIG.uptime_sample_seconds, leading)
    )
    memo.result_rechecker = asyncio.create_task(
        recheck_results_forever(ResultRechecker(CONFIG.namespace, memo.tracer), CONFIG.uptime_sample_seconds, leading)
    )
    memo.orphan_sweep = asyncio.create_task(
        sweep_orphans_forever(memo.orphans, CONFIG.orphan_sweep_seconds, leading, lambda: memo.leader.term)
    )


def operator_placer(submission_key: bytes) -> ReputationPlacer:
    """The operator's placer: its spot-check coin keyed from the submission key (spot_check_key),
    so every replica and restart of the operator draws the same copies for an attempt."""
    return ReputationPlacer(
        waiting_for_s=max(WAITING_FOR_S, 3 * CONFIG.poll_interval_seconds),
        seed_key=spot_check_key(submission_key),
    )


async def _submission_key(namespace: str) -> bytes:
    """The key of the attempts' submission ids: KOINON_SUBMISSION_KEY where given, else the
    Secret in the operator's namespace (the Lease's: every replica that may lead uses it), made
    at the first start. Kept across restarts: an attempt is placed under the same ids whichever
    operator places it (reconciler.keyed_submission_nonce says why that matters)."""
    if CONFIG.submission_key is not None:
        return CONFIG.submission_key.encode()
    key = await asyncio.to_thread(get_or_create_submission_key, namespace)
    logger.info("submission ids keyed by Secret %s/%s", namespace, SUBMISSION_KEY_SECRET)
    return key


class _NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """Every object looks unchanged since last handled: nothing is written, nothing diffed."""

    def __init__(self) -> None:
        super().__init__(prefix="koinon.dev", key="last-handled-configuration")

    def fetch(self, *, body: kopf.Body) -> Any:
        return self.build(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        pass


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    memo.uptime_sampler.cancel()
    memo.result_rechecker.cancel()
    memo.orphan_sweep.cancel()
    memo.leader_election.cancel()
    await memo.leader.release()
    await memo.ray.close()
    if memo.tracing is not None and not await shutdown_tracing(memo.tracing, TRACING_SHUTDOWN_S):
        logger.warning("tracing: the collector took over %g s; spans not yet exported are dropped", TRACING_SHUTDOWN_S)


@kopf.index(GROUP, VERSION, AIJOB_PLURAL)
def aijob_allocations(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[str, Allocation]:
    allocation = allocation_of(body)
    # {} and not None for a job that holds nothing (finished, pending): kopf keeps an object's
    # previous entry when its index function returns None, so a finished job's GPUs stayed booked.
    return {f"{namespace}/{name}": allocation} if allocation is not None else {}


@kopf.index(GROUP, VERSION, VOLUNTEER_PLURAL)
def volunteer_nodes(body: kopf.Body, name: str, **_: Any) -> dict[str, dict[str, Any]]:
    deleting = bool(body.metadata.get("deletionTimestamp"))
    return {name: {"spec": dict(body.spec), "status": dict(body.status), "deleting": deleting}}


def _first_values(index: kopf.Index[str, Any]) -> dict[str, Any]:
    return {key: next(iter(values)) for key, values in index.items() if values}


# Pass bodies waiting for kopf's finalizer, by uid (_finalizer_shown).
_finalizer_waits: dict[str, asyncio.Event] = {}
# Uids of AIJobs whose deletion the watch delivered, with the (monotonic) second it did (_not_gone).
_gone: dict[str, float] = {}
GONE_KEPT_S = 600.0  # the filter needs one only in the cycle of its DELETED event: far more


@kopf.on.event(GROUP, VERSION, AIJOB_PLURAL)
async def _wake_passes_waiting_for_the_finalizer(body: kopf.Body, type: str | None, **_: Any) -> None:
    # kopf has put this event's body in the timer's place before it calls this, and matches the
    # timer's filter after.
    uid = str(body.metadata.get("uid", ""))
    if type == "DELETED":
        now = time.monotonic()
        for old in [gone for gone, at in _gone.items() if now - at > GONE_KEPT_S]:
            del _gone[old]
        _gone[uid] = now
    if FINALIZER in (body.metadata.get("finalizers") or ()) or type == "DELETED":
        waiting = _finalizer_waits.pop(uid, None)
        if waiting is not None:
            waiting.set()


def _not_gone(body: kopf.Body, **_: Any) -> bool:
    """The timer's filter. kopf stops a job's timer when it sees the job's deletionTimestamp; a job
    deleted before kopf's finalizer was on it goes at once, with none (kube-apiserver removes an
    object without finalizers), and kopf forgets it without stopping its timer, which would tick
    (waiting for a finalizer that never comes) until the operator exits (review)."""
    return str(body.metadata.get("uid", "")) not in _gone


async def _finalizer_shown(body: kopf.Body, timeout: float) -> bool:
    """Whether kopf's finalizer (for stop_ray_job) is on the job, waiting up to ``timeout`` for the
    watch to show it. kopf starts a new job's timer while it puts the finalizer on: a first pass
    that did not wait had its status (written only over the resourceVersion kopf's watch last
    delivered: status_write) refused in most cases under load, 413 of 500 jobs in bench-admission,
    each job's first status a timer interval late. Waited for here rather than by a filter on the
    timer: kopf does not start a filtered timer again when its finalizer, removed (`kubectl
    replace`) during a pass, is back before that pass ends."""
    if FINALIZER in (body.metadata.get("finalizers") or ()):
        return True
    uid = str(body.metadata.get("uid", ""))
    waiting = _finalizer_waits.setdefault(uid, asyncio.Event())
    try:
        await asyncio.wait_for(waiting.wait(), timeout)
    except TimeoutError:
        return False
    finally:
        if _finalizer_waits.get(uid) is waiting:
            del _finalizer_waits[uid]
    return FINALIZER in (body.metadata.get("finalizers") or ())


@kopf.timer(GROUP, VERSION, AIJOB_PLURAL, interval=CONFIG.poll_interval_seconds, when=_not_gone)
async def reconcile_aijob(
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    namespace: str | None,
    name: str,
    **kwargs: Any,
) -> None:
    # kopf passes each index by its function's name.
    aijob_allocations: kopf.Index[str, Allocation] = kwargs["aijob_allocations"]
    volunteer_nodes: kopf.Index[str, dict[str, Any]] = kwargs["volunteer_nodes"]
    if body.metadata.get("deletionTimestamp") or not memo.leader.is_leader:
        return
    if not await _finalizer_shown(body, CONFIG.poll_interval_seconds):
        return  # the next tick looks again
    if body.metadata.get("deletionTimestamp") or not memo.leader.is_leader:
        return
    # Keyed by the status this pass acted on, before the pass's own patch is applied.
    evidence_key = outcome_key(str(body.metadata.get("uid", "")), body.status)
    read = StatusRead.of(body)  # now: kopf updates the body in place as its watch delivers versions
    term = memo.leader.term

    def leading_this_term() -> bool:
        return bool(memo.leader.is_leader and memo.leader.term == term)

    outcome = await memo.reconciler.reconcile(
        body, _first_values(aijob_allocations), _first_values(volunteer_nodes), leading_this_term
    )
    if not leading_this_term():
        # The Lease ran out during the pass (even if regained): another operator may have placed
        # since. Nothing is written, so nothing is awaited either.
        memo.reconciler.discard_write(f"{namespace}/{name}")
        return
    uid = str(body.metadata.get("uid", ""))
    if outcome.delete and uid in _ttl_announced:
        # The TTL's "Deleted" is said once per job, not at every pass until the delete lands.
        outcome.events = [e for e in outcome.events if e.reason != "Deleted"]
    # Nothing awaited since the pass: a deletion handler waiting for it in reconciler.stop resumes
    # only once the tracer knows whether this pass emitted the job's root span (it must not again).
    # Recorded before the evidence below is awaited, so also for a pass whose status that wait
    # then discards: as for a status write the API server loses (telemetry.JobTracer says so).
    memo.tracer.record(body, outcome.status, [(e.type, e.reason, e.message) for e in outcome.events])
    if outcome.reputation or outcome.work:
        try:
            # Before the status is handed to kopf (which writes it after this returns, if still
            # over the status read: status_write), and
            # idempotent (by evidence_key): a pass whose status is then discarded is replayed from
            # the same status, by the new leader or by this one, and counts nothing twice.
            await memo.reputation.record(outcome.reputation, evidence_key, outcome.work)
        except Exception as error:  # bookkeeping must not stall the job itself
            # An exception here would make kopf back off this job's timer for a minute.
            logger.warning(
                "could not record reputation evidence %s (work of %s): %r",
                outcome.reputation,
                sorted(outcome.work),
                error,
            )
        if not leading_this_term():
            # The Lease ran out while the VolunteerNodes were written (the API server slow or away
            # from this pod: when renewals fail too). The new leader may have placed and submitted
            # the next attempt meanwhile: this status (say Pending, no nodes) would make it place
            # and submit yet another while that one runs.
            memo.reconciler.discard_write(f"{namespace}/{name}")
            return
    # From here to the return nothing is awaited: the status kopf writes is this term's. kopf
    # writes it after the return, and retries for about a minute: only over the status this pass
    # read (status_write says why), with the pass's Events, which are posted only if it is written.
    key = f"{namespace}/{name}"
    events = [(e.type, e.reason, e.message) for e in outcome.events]

    def post_events() -> None:
        for event_type, reason, message in events:
            kopf.event(body, type=event_type, reason=reason, message=message)
        if outcome.delete:  # its "Deleted" said: not again (a dropped pass's is said by the next)
            _ttl_announced.add(uid)

    def dropped() -> None:
        logger.debug("AIJob %s changed since its pass read it: the pass's status is dropped", key)
        memo.reconciler.discard_write(key)

    if outcome.status:
        patch.fns.append(ConditionalStatusWrite(read, outcome.status, on_written=post_events, on_dropped=dropped))
    else:
        post_events()
    if outcome.delete and f"{namespace}/{name}" not in _deleting:
        # Not awaited here: kopf removes the finalizer only once this timer has stopped, so a timer
        # waiting for its own object's deletion would wait for ever. (The deletion handler may run
        # while a pass of this timer is still in flight: the reconciler serializes the two.)
        _deleting.add(f"{namespace}/{name}")
        task = asyncio.create_task(_delete_after_ttl(namespace or "default", name, uid))
        _background.add(task)
        task.add_done_callback(_background.discard)


_deleting: set[str] = set()
_ttl_announced: set[str] = set()  # uids whose TTL deletion was announced (dropped once deleted)
_background: set[asyncio.Task[None]] = set()


async def _delete_after_ttl(namespace: str, name: str, uid: str) -> None:
    try:
        await asyncio.wait_for(delete_aijob(namespace, name, uid), timeout=30)
        _ttl_announced.discard(uid)
        logger.info("deleted AIJob %s/%s: ttlSecondsAfterFinished passed", namespace, name)
    except Exception as error:  # retried by the next timer pass
        logger.warning("could not delete AIJob %s/%s after its TTL: %r", namespace, name, error)
    finally:
        _deleting.discard(f"{namespace}/{name}")


def _connected_through_ray(body: kopf.Body, **_: Any) -> bool:
    return not managed_by_gateway(body)


# kopf puts its finalizer on every object a timer matches. The filter keeps it off the nodes the
# gateway owns (and takes an old one off): deleting those revokes the volunteer, and that must not
# wait for the operator to be up.
@kopf.timer(GROUP, VERSION, VOLUNTEER_PLURAL, interval=5.0, when=_connected_through_ray)
async def sync_volunteer_from_ray(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    if not memo.leader.is_leader:
        return
    if managed_by_gateway(body):
        return  # annotated since the timer's last filter check; the gateway writes its status
    try:
        ray_nodes = await memo.reconciler.nodes.get()
    except RayUnavailableError:
        return  # keep the last known state; the AIJob reconciler reports Ray outages
    for field_name, value in status_from_ray(body, ray_nodes, format_time(datetime.now(UTC))).items():
        patch.status[field_name] = value


@kopf.on.delete(GROUP, VERSION, AIJOB_PLURAL)
async def stop_ray_job(body: kopf.Body, memo: kopf.Memo, runtime: timedelta = timedelta(0), **_: Any) -> None:
    # ``runtime``: kopf's time since this handler first ran for this deletion, kept in the
    # object's annotations, so an operator restart does not start the grace period again.
    # The job goes: whether its TTL deletion was announced need not be remembered (only this
    # process's own TTL delete forgot it, and the set grew by every job deleted otherwise).
    _ttl_announced.discard(str((body.get("metadata") or {}).get("uid") or ""))
    if not memo.leader.is_leader:
        # Whatever this process booked for the job in an earlier term goes: the leader stops it.
        meta = body.get("metadata") or {}
        memo.reconciler.ledger.forget(f"{meta.get('namespace')}/{meta.get('name')}")
        raise kopf.TemporaryError("another operator holds the lease; it stops the Ray job", delay=5)
    term = memo.leader.term
    posted: list[tuple[str, str, str]] = []  # for the trace too
    try:
        if await memo.reconciler.stop(body):
            posted.append(("Normal", "Stopped", "Ray job stopped before deletion"))
    except RayUnavailableError as error:
        if runtime.total_seconds() < CONFIG.stop_grace_seconds:
            # Keep the finalizer until Ray confirms: a deleted AIJob must not leave its job running.
            raise kopf.TemporaryError(f"cannot stop the Ray job yet: {error}", delay=5) from error
        message = abandoned_stop_message(body, CONFIG.stop_grace_seconds, error)
        posted.append(("Warning", "StopUnconfirmed", message))
        meta = body.get("metadata") or {}
        logger.warning("AIJob %s/%s: %s", meta.get("namespace"), meta.get("name"), message)
    for event_type, reason, message in posted:
        kopf.event(body, type=event_type, reason=reason, message=message)
    if not memo.leader.is_leader or memo.leader.term != term:
        # The root span once, from the leader: returning would count this handler as done and
        # remove the finalizer, and the new leader's handler (which emits it) would never run.
        raise kopf.TemporaryError("the lease ran out during the stop; the leader finishes the deletion", delay=5)
    # Judged from the deletion's body, which may predate the pass that finished the job (stop()
    # waited for it): the tracer then knows that pass emitted the root, and emits nothing more.
    memo.tracer.deleted(body, posted)


def abandoned_stop_message(body: kopf.Body, grace_seconds: float, error: Exception) -> str:
    """Names what may still run, so a cluster admin can stop it by hand (`ray job stop ID`)."""
    submissions = ray_submissions_of(AIJobStatus.from_status(body.get("status")))
    return (
        f"deleted without stopping its Ray job: Ray did not confirm the stop for {grace_seconds:g} s "
        f"(KOINON_STOP_GRACE; last error: {error}); may still run: {', '.join(submissions) or 'none recorded'}"
    )
