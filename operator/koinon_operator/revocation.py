"""Retroactive invalidation (BOINC): once an owner is caught returning wrong results, verified jobs
whose accepted result only that owner vouched for (a trusted node's skipped verification, or a
quorum of caught owners) are marked ``ResultRevoked``. Every node of a copy computed its answer (a
copy of several replicas runs on several owners' nodes): a copy with a caught owner among them
vouches for nothing.

A finished job is not run again by itself: its result may already have been consumed, and phases
do not go backwards. The condition, a Warning Event on the AIJob (what `kubectl describe` and
event-based alerting show) and a log line tell the job's owners to re-create it. Owners
are caught as the placer sees them: their nodes' decayed disagreements add up past the tolerance
that also takes away their right to skip verification.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from koinon_operator.api.aijob import AIJobStatus, format_time
from koinon_operator.api.conditions import set_condition
from koinon_operator.api.constants import AIJOB_PLURAL, GROUP, VERSION, VOLUNTEER_PLURAL, ConditionType, Phase
from koinon_operator.kube import load_config
from koinon_operator.reputation_book import disagreements_by_node, disagreements_by_owner
from koinon_operator.scheduler import DEFAULT_CONFIG, ReputationConfig, recheck_accepted
from koinon_operator.scheduler.config import VerificationConfig
from koinon_operator.scheduler.verification import NodeResult
from koinon_operator.telemetry import JobTracer

logger = logging.getLogger(__name__)


def caught_owners(
    volunteers: Iterable[Mapping[str, Any]],
    now: float,
    reputation: ReputationConfig = DEFAULT_CONFIG.reputation,
    verification: VerificationConfig = DEFAULT_CONFIG.verification,
) -> set[str]:
    """Pure: owners whose nodes' disagreements (aged to ``now``) add up past the tolerance."""
    totals = disagreements_by_owner(disagreements_by_node(volunteers, now, reputation))
    return {owner for owner, total in totals.items() if total > verification.owner_disagreement_tolerance}


def accepted_copies(aijob: Mapping[str, Any]) -> list[dict[str, NodeResult]] | None:
    """Pure: the copies that returned a verified job's accepted result, each as node -> (owner,
    digest) of every node that computed it (a copy of several replicas ran on several nodes); None
    for a job that is not a verified, succeeded one."""
    spec, status = aijob.get("spec") or {}, aijob.get("status") or {}
    if status.get("phase") != Phase.SUCCEEDED.value:
        return None
    if (spec.get("verification") or {}).get("mode") != "replicated":
        return None
    digest = str((status.get("result") or {}).get("digest") or "")
    state = AIJobStatus.from_status(status)
    members = state.copies_by_voter()
    verification = status.get("verification") or {}
    if verification.get("agreeing"):
        earlier = {str(r.get("node")): str(r.get("owner")) for r in verification.get("earlierResults") or ()}
        voters = [str(node) for node in verification["agreeing"]]
        copies = [members.get(voter) or ((voter, earlier.get(voter) or voter),) for voter in voters]
    else:  # one copy, a trusted node's verification skipped: its nodes computed the result
        driver = next(iter(state.assigned_nodes), None)
        copies = [] if driver is None else [members.get(driver) or ((driver, state.owner_of(driver)),)]
    return [{node: NodeResult(owner, digest) for node, owner in copy} for copy in copies] or None


def accepted_vouchers(aijob: Mapping[str, Any]) -> dict[str, NodeResult] | None:
    """Pure: node -> (owner, digest) of every node that computed a verified job's accepted result
    (each node of each agreeing copy); None for a job that is not a verified, succeeded one."""
    copies = accepted_copies(aijob)
    return None if copies is None else {node: result for copy in copies for node, result in copy.items()}


def revocation_message(aijob: Mapping[str, Any], caught: set[str]) -> str | None:
    """Pure: why the job's accepted result no longer stands, or None while it does."""
    copies = accepted_copies(aijob)
    if copies is None or _already_revoked(aijob):
        return None
    vouchers = {node: result for copy in copies for node, result in copy.items()}
    # Any node of a copy may have spoilt its answer (each is charged for a dissenting one): a copy
    # with a caught owner among its nodes vouches for nothing, its other owners included. A job's
    # nodes are of distinct owners, so striking them strikes no other copy's vote.
    spoilt = [copy for copy in copies if any(result.owner in caught for result in copy.values())]
    struck = caught | {result.owner for copy in spoilt for result in copy.values()}
    quorum = int(((aijob.get("spec") or {}).get("verification") or {}).get("quorum") or 3)
    if recheck_accepted(vouchers, struck, quorum) is None:
        return None
    named = sorted({result.owner for result in vouchers.values()} & caught)
    return (
        f"the accepted result was vouched for only by owner(s) since caught returning wrong results "
        f"({', '.join(named)}); re-create the job to run it again"
    )


def _already_revoked(aijob: Mapping[str, Any]) -> bool:
    conditions = (aijob.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == ConditionType.RESULT_REVOKED and c.get("status") == "True" for c in conditions)


class ResultRechecker:
    """Looks at the verified jobs once per call and marks those whose result no longer stands."""

    def __init__(self, namespace: str | None = None, tracer: JobTracer | None = None) -> None:
        self._namespace = namespace
        self._tracer = tracer  # the revocation goes into the job's trace too

    async def recheck(self, now: float) -> int:
        """Returns how many jobs were marked."""
        return await asyncio.to_thread(self._recheck, now)

    def _recheck(self, now: float) -> int:
        load_config()
        api = client.CustomObjectsApi()
        volunteers = cast(dict[str, Any], api.list_cluster_custom_object(GROUP, VERSION, VOLUNTEER_PLURAL))
        caught = caught_owners(volunteers.get("items") or (), now)
        if not caught:
            return 0
        if self._namespace:
            listed = api.list_namespaced_custom_object(GROUP, VERSION, self._namespace, AIJOB_PLURAL)
        else:
            listed = api.list_cluster_custom_object(GROUP, VERSION, AIJOB_PLURAL)
        events = client.CoreV1Api()
        marked = 0
        for aijob in cast(dict[str, Any], listed).get("items") or ():
            meta = aijob.get("metadata") or {}
            try:  # one job that cannot be marked (a malformed status, a 422) does not stop the rest
                message = revocation_message(aijob, caught)
                if message is not None and self._mark(api, events, aijob, message):
                    marked += 1
                    if self._tracer is not None:
                        self._tracer.record(aijob, {}, [("Warning", "ResultRevoked", message)])
            except (ApiException, ValueError, TypeError, KeyError, AttributeError) as error:
                logger.warning("AIJob %s/%s: result not rechecked: %r", meta.get("namespace"), meta.get("name"), error)
        return marked

    @staticmethod
    def _mark(api: client.CustomObjectsApi, events: client.CoreV1Api, aijob: Mapping[str, Any], message: str) -> bool:
        meta = aijob["metadata"]
        conditions = set_condition(
            (aijob.get("status") or {}).get("conditions") or (),
            type_=ConditionType.RESULT_REVOKED,
            status=True,
            reason="VoucherCaught",
            message=message,
            now=format_time(datetime.now(UTC)),
        )
        body = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": {"conditions": conditions}}
        try:
            api.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], AIJOB_PLURAL, meta["name"], body
            )
        except ApiException as error:
            if error.status in (404, 409):  # gone, or changed meanwhile: the next look sees it again
                return False
            raise
        logger.warning("AIJob %s/%s: ResultRevoked: %s", meta["namespace"], meta["name"], message)
        _post_event(events, aijob, message)
        return True


def _post_event(events: client.CoreV1Api, aijob: Mapping[str, Any], message: str) -> None:
    """A Warning Event on the AIJob, as kopf posts the reconciler's (core v1, by the operator's
    name). Best effort: the condition is written and stays the record."""
    meta = aijob["metadata"]
    now = datetime.now(UTC)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
        involved_object=client.V1ObjectReference(
            api_version=f"{GROUP}/{VERSION}",
            kind="AIJob",
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid"),
        ),
        type="Warning",
        reason="ResultRevoked",
        message=message[:1024],
        source=client.V1EventSource(component="koinon-operator"),
        first_timestamp=now,
        last_timestamp=now,
        count=1,
        reporting_component="koinon-operator",
    )
    try:
        events.create_namespaced_event(meta["namespace"], event)
    except Exception as error:  # best effort (an API error, the API away): logged, not raised
        logger.warning("AIJob %s/%s: ResultRevoked event not posted: %s", meta["namespace"], meta["name"], error)


async def recheck_results_forever(
    rechecker: ResultRechecker, interval_s: float, active: Callable[[], bool] = lambda: True
) -> None:
    """The operator's loop (while ``active``: it leads): caught owners are found from VolunteerNode
    status, which any pass or the gateway may change, and the jobs to mark may have finished long
    before."""
    while True:
        await asyncio.sleep(interval_s)
        if not active():
            continue
        try:
            await rechecker.recheck(datetime.now(UTC).timestamp())
        except Exception:  # the API may be away for a while; the next look catches up
            logger.exception("rechecking accepted results failed")
