"""A pass whose outcome the handler drops (the Lease lapsed or the term changed during it) left a
record of a write that never happened, and the job was skipped for 30 s once this operator led
again."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import kopf
from koinon_operator import handlers

from tests.aijob.fake_ray import VOLUNTEERS, Clock, FakeRay, make_body, make_reconciler
from tests.aijob.kopf_patch import written_status


class _Quiet:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


async def test_a_pass_whose_write_was_discarded_does_not_stall_the_next_term(monkeypatch: Any) -> None:
    monkeypatch.setattr("kopf.event", lambda *a, **k: None)
    ray, clock = FakeRay(), Clock()
    real = make_reconciler(ray, clock)
    leader = SimpleNamespace(is_leader=True, term=1)

    class LapsingReconciler:
        lapse = True

        async def reconcile(self, *args: Any) -> Any:
            outcome = await real.reconcile(*args)
            if self.lapse:  # the Lease ran out while the pass waited on Ray; regained at once
                leader.term += 1
                real.forget_memory()
            return outcome

        def discard_write(self, key: str) -> None:
            real.discard_write(key)

    reconciler = LapsingReconciler()
    memo = SimpleNamespace(leader=leader, reconciler=reconciler, tracer=_Quiet(), reputation=_Quiet())
    body = make_body({"entrypoint": "python x.py"})
    body["metadata"]["resourceVersion"] = "10"
    volunteers = {name: [value] for name, value in VOLUNTEERS.items()}

    async def run() -> dict[str, Any]:
        patch = kopf.Patch()
        handler: Any = handlers.reconcile_aijob
        raw: Any = copy.deepcopy(body)
        await handler(body=kopf.Body(raw), patch=patch, memo=memo, namespace="ns", name="j",
                      aijob_allocations={}, volunteer_nodes=volunteers)  # fmt: skip
        return written_status(patch, body) or {}

    assert not await run()  # discarded: begun in the earlier term
    reconciler.lapse = False
    clock.advance(6)  # the next timer tick, on the same (unchanged: nothing was written) body
    second = await run()
    assert second.get("phase"), "the job is skipped: its last (discarded) pass counts as written"
