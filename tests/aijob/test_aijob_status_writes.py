"""Status writes as the API server applies them (JSON merge patches): a pass on a body that lags
behind the operator's own last write does not repeat it, and a map field written whole drops the
keys it no longer has."""

from __future__ import annotations

import copy

from koinon_emulator.patching import merge_patch
from koinon_operator.reconciler import STALE_BODY_GRACE_SECONDS, changed_fields

from tests.aijob.fake_ray import VOLUNTEERS, Clock, FakeRay, make_body, make_reconciler, step, volunteer

READY = {"vn-1": volunteer("a", "127.0.20.1")}
NOT_READY = {"vn-1": volunteer("a", "127.0.20.1", phase="NotReady")}


async def test_a_pass_on_a_body_from_before_its_own_placement_does_not_strand_the_job() -> None:
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    stale = copy.deepcopy(body)  # no resourceVersion: only the ledger fix can help here
    first = await reconciler.reconcile(copy.deepcopy(body), {}, VOLUNTEERS)
    body["status"] = merge_patch({}, first.status)
    assert body["status"]["phase"] == "Scheduled"
    second = await reconciler.reconcile(copy.deepcopy(stale), {}, VOLUNTEERS)
    body["status"] = merge_patch(body["status"], second.status)
    # Its own reservation did not make the only node look full to itself.
    assert body["status"]["phase"] == "Scheduled", body["status"].get("message")
    for _ in range(3):
        clock.advance(2)
        await step(reconciler, body)
    assert len(ray.submissions) == 1


async def test_the_body_a_write_was_computed_from_is_not_acted_on_again_until_the_watch_catches_up() -> None:
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    body["metadata"]["resourceVersion"] = "10"
    first = await reconciler.reconcile(copy.deepcopy(body), {}, VOLUNTEERS)
    assert first.status["phase"] == "Scheduled" and first.events
    again = await reconciler.reconcile(copy.deepcopy(body), {}, VOLUNTEERS)  # the watch lags
    assert (again.status, again.events) == ({}, [])
    caught_up = merge_patch(body, {"status": first.status, "metadata": {"resourceVersion": "11"}})
    following = await reconciler.reconcile(copy.deepcopy(caught_up), {}, VOLUNTEERS)
    assert [e.reason for e in following.events] == ["Submitted"]
    # A write that never landed: after the grace the old body is acted on again.
    lost = make_body({"entrypoint": "python y.py"}, name="k", uid="11111111-2222-3333-4444-555555555555")
    lost["metadata"]["resourceVersion"] = "20"
    assert (await reconciler.reconcile(copy.deepcopy(lost), {}, VOLUNTEERS)).status
    assert not (await reconciler.reconcile(copy.deepcopy(lost), {}, VOLUNTEERS)).status
    clock.advance(STALE_BODY_GRACE_SECONDS)
    assert (await reconciler.reconcile(copy.deepcopy(lost), {}, VOLUNTEERS)).status


async def test_scheduling_reasons_that_no_longer_apply_are_removed_and_then_nothing_is_rewritten() -> None:
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "resources": {"gpus": 2}})
    await step(reconciler, body, READY)
    assert body["status"]["scheduling"]["reasons"] == {"too few free GPUs": 1}
    await step(reconciler, body, NOT_READY)
    assert body["status"]["scheduling"]["reasons"] == {"not Ready": 1}
    writes = [(await step(reconciler, body, NOT_READY)).status for _ in range(3)]
    assert writes == [{}, {}, {}]


def test_changed_fields_is_a_merge_patch_of_whole_values() -> None:
    current = {"phase": "Pending", "scheduling": {"reasons": {"a": 1, "b": 2}, "decision": "X"}, "n": 1}
    wanted = {"phase": "Pending", "scheduling": {"reasons": {"b": 3}, "decision": "X"}, "n": 2}
    patch = changed_fields(current, wanted)
    assert patch == {"scheduling": {"reasons": {"a": None, "b": 3}}, "n": 2}
    assert merge_patch(current, patch) == wanted
    assert changed_fields(wanted, wanted) == {}
