"""Leader election over a coordination.k8s.io Lease, as controller-runtime's managers do.

The operator books GPUs from what its own AIJobs hold: a second operator on the same pool (a
second replica, a node partition that leaves the old pod running, one operator per namespace) would
place jobs on GPUs the first one holds. Only the holder of the Lease reconciles; the others watch
and wait to take over when it stops renewing.

``decide`` is the rule, a pure function of the Lease as read; ``LeaderElector`` does the I/O.
As client-go's elector, a follower times the holder's lease from when it saw the Lease last change,
on its own monotonic clock, never from the renewTime the holder stamped with its wall clock: the
operators' clocks may disagree by more than a lease.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from koinon_operator.kube import load_config

logger = logging.getLogger(__name__)

LEASE_NAME = "koinon-operator"


class Action(enum.Enum):
    CREATE = "create"  # no Lease yet
    RENEW = "renew"  # ours
    TAKE_OVER = "take-over"  # released, or its holder stopped renewing
    WAIT = "wait"  # another operator holds it


@dataclass(frozen=True)
class LeaseView:
    holder: str
    record: str  # what changes at each renewal (holder and renewTime as written)
    duration_s: float


def decide(lease: LeaseView | None, me: str, unchanged_for_s: float, last_seen: LeaseView | None = None) -> Action:
    """``unchanged_for_s``: how long this operator has seen the Lease's record stay the same (its
    absence too); ``last_seen``: the last Lease it read, if any.

    A Lease that disappears (`kubectl delete lease`, a namespace clean-up) is not free: its holder
    may still be leading until its next renewal finds it gone. So a follower that saw another
    operator hold it creates it only once it has been gone for that holder's lease duration; its
    last holder re-creates it at once, and so does an operator that never saw one: a replica started
    after the deletion then leads beside the old holder until that one's next renewal (as with
    client-go; README, Limits, says what bounds it), which is kept rather than making every start
    that finds no Lease (every fresh install) wait a lease duration.
    """
    if lease is None:
        if last_seen is None or last_seen.holder in ("", me) or unchanged_for_s > last_seen.duration_s:
            return Action.CREATE
        return Action.WAIT
    if lease.holder == me:
        return Action.RENEW
    if not lease.holder or unchanged_for_s > lease.duration_s:
        return Action.TAKE_OVER
    return Action.WAIT


@dataclass(frozen=True)
class LeaseSettings:
    namespace: str = "default"
    name: str = LEASE_NAME
    duration_s: float = 15.0
    renew_s: float = 5.0

    @classmethod
    def from_env(cls) -> LeaseSettings:
        # The operator's own namespace (the Deployment passes it by the downward API): every
        # operator of one pool competes for the same Lease, whatever AIJob namespace it serves.
        namespace = os.environ.get("KOINON_LEASE_NAMESPACE") or os.environ.get("POD_NAMESPACE") or _own_namespace()
        raw = os.environ.get("KOINON_LEASE_DURATION") or str(cls.duration_s)
        try:
            duration = float(raw)
        except ValueError:
            raise ValueError(f"KOINON_LEASE_DURATION: must be a number of seconds, got {raw[:64]!r}") from None
        if not (math.isfinite(duration) and duration > 0):
            raise ValueError(f"KOINON_LEASE_DURATION: must be > 0 seconds, got {duration}")
        return cls(namespace=namespace, duration_s=duration, renew_s=max(0.2, duration / 3))


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _own_namespace() -> str:
    """In a pod without POD_NAMESPACE: its service account's namespace; elsewhere "default"."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as handle:
            return handle.read().strip() or "default"
    except OSError:
        return "default"


def default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class LeaderElector:
    def __init__(
        self,
        settings: LeaseSettings,
        identity: str | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.identity = identity or default_identity()
        self._clock = clock
        self._monotonic = monotonic
        self._leader_until = 0.0  # monotonic: leader while before this (last renewal + duration)
        self._seen: tuple[str, float] | None = None  # the Lease's record, and when it was first seen
        self._last_lease: LeaseView | None = None  # the last Lease read (kept while it is gone)
        # Bumped each time this operator starts leading: a pass that began in another term (even
        # one this operator also led) must not write what it decided then.
        self.term = 0
        # Called with True when this operator starts leading, False when it stops.
        self.on_change: Callable[[bool], None] = lambda leading: None

    @property
    def is_leader(self) -> bool:
        return self._monotonic() < self._leader_until

    async def run_forever(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(self.settings.renew_s)

    async def step(self) -> bool:
        """One look at the Lease: take or keep it when the rule says so. Returns is_leader."""
        was_leader = self.is_leader
        started = self._monotonic()
        try:
            # Bounded: a request that never answers must not stop the election (and the
            # leader must stop acting once its lease may have run out meanwhile).
            held = await asyncio.wait_for(asyncio.to_thread(self._acquire_or_renew), timeout=self.settings.renew_s)
        except TimeoutError:
            logger.warning("leader election: the Lease request did not answer within %.1fs", self.settings.renew_s)
            held = None
        except ApiException as error:
            if error.status == 403:
                # Without the Role for its Lease the operator would never lead and look healthy.
                logger.critical("leader election: not allowed to read or write the Lease (apply the RBAC); exiting")
                os.kill(os.getpid(), signal.SIGTERM)
            logger.warning("leader election: cannot read or write the Lease: %r", error)
            held = None
        except Exception as error:  # the API server away: keep leading only until the lease runs out
            logger.warning("leader election: cannot read or write the Lease: %r", error)
            held = None
        if held:
            # Counted from before the write: a follower takes over duration_s after it saw this
            # renewal, and it cannot have seen it before `started`.
            self._leader_until = started + self.settings.duration_s
        elif held is False:
            self._leader_until = 0.0  # the Lease says another operator holds it: stop at once
        elif self._leader_until and not self.is_leader:
            self._leader_until = 0.0
        if self.is_leader != was_leader:
            if self.is_leader:
                self.term += 1
            self.on_change(self.is_leader)
            logger.warning(
                "leader election: %s %s the Lease %s/%s",
                self.identity,
                "now holds" if self.is_leader else "no longer holds",
                self.settings.namespace,
                self.settings.name,
            )
        return self.is_leader

    async def release(self) -> None:
        """On a clean stop: hand the Lease over at once instead of after duration_s."""
        if not self.is_leader:
            return
        self._leader_until = 0.0
        try:
            await asyncio.to_thread(self._release)
        except Exception as error:
            logger.warning("leader election: could not release the Lease: %r", error)

    # ---- I/O ----

    @property
    def _timeout(self) -> float:
        return self.settings.renew_s

    def _api(self) -> client.CoordinationV1Api:
        load_config()
        return client.CoordinationV1Api()

    def _acquire_or_renew(self) -> bool:
        api = self._api()
        namespace, name = self.settings.namespace, self.settings.name
        try:
            current = cast(Any, api.read_namespaced_lease(name, namespace, _request_timeout=self._timeout))
        except ApiException as error:
            if error.status != 404:
                raise
            current = None
        view = _view(current)
        action = decide(view, self.identity, self._unchanged_for(view), self._last_lease)
        if view is not None:
            self._last_lease = view
        if action is Action.WAIT:
            return False
        now = _micro_time(self._clock())
        if action is Action.CREATE:
            body: dict[str, Any] = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": self._spec(now, acquired=now, transitions=0),
            }
            try:
                api.create_namespaced_lease(namespace, cast(Any, body), _request_timeout=self._timeout)  # dicts do
            except ApiException as error:
                if error.status == 409:  # another operator created it first
                    return False
                raise
            return True
        spec = current.spec
        transitions = int(spec.lease_transitions or 0) + (1 if action is Action.TAKE_OVER else 0)
        acquired = now if action is Action.TAKE_OVER else _micro_time_of(spec.acquire_time) or now
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": current.metadata.resource_version},
            "spec": self._spec(now, acquired=acquired, transitions=transitions),
        }
        try:
            api.replace_namespaced_lease(name, namespace, cast(Any, body), _request_timeout=self._timeout)
        except ApiException as error:
            if error.status != 409:
                raise
            # Written since we read it: by another operator, or by our own earlier renewal that
            # timed out here but still landed. Ours: we hold it (a follower saw that write no
            # earlier than this step began, so our deadline from `started` stays safe).
            again = cast(Any, api.read_namespaced_lease(name, namespace, _request_timeout=self._timeout))
            return bool(again.spec.holder_identity == self.identity)
        return True

    def _release(self) -> None:
        api = self._api()
        current = cast(
            Any, api.read_namespaced_lease(self.settings.name, self.settings.namespace, _request_timeout=self._timeout)
        )
        if current.spec.holder_identity != self.identity:
            return
        spec = self._spec(_micro_time(self._clock()), _micro_time_of(current.spec.acquire_time), 0)
        spec.update(holderIdentity="", leaseTransitions=int(current.spec.lease_transitions or 0))
        body = {"metadata": {"resourceVersion": current.metadata.resource_version}, "spec": spec}
        api.patch_namespaced_lease(self.settings.name, self.settings.namespace, body, _request_timeout=self._timeout)

    def _unchanged_for(self, view: LeaseView | None) -> float:
        now = self._monotonic()
        record = view.record if view is not None else ""
        if self._seen is None or self._seen[0] != record:
            self._seen = (record, now)
        return now - self._seen[1]

    def _spec(self, renewed: str, acquired: str | None, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, math.ceil(self.settings.duration_s)),
            "acquireTime": acquired,
            "renewTime": renewed,
            "leaseTransitions": transitions,
        }


def _view(lease: Any) -> LeaseView | None:
    if lease is None:
        return None
    spec = lease.spec
    holder = spec.holder_identity or ""
    return LeaseView(
        holder=holder,
        record=f"{holder}|{spec.renew_time}|{lease.metadata.resource_version}",
        duration_s=float(spec.lease_duration_seconds or 0),
    )


def _micro_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _micro_time_of(value: Any) -> str | None:
    return _micro_time(value.timestamp()) if isinstance(value, datetime) else None
