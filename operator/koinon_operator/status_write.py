"""A reconcile pass's status, written only over the status the pass computed it from.

kopf writes a handler's ``patch.status`` as a JSON merge patch with no precondition, and retries a
failed request for about a minute (``settings.networking.error_backoffs``). An operator cut off from
the API server loses its Lease in that minute, and its pass's status could land after the new leader
had moved the job on and set it back: judge an attempt twice (a failure charged twice, Failed while
the next attempt runs), count verification evidence twice, wedge a job Running, resume a suspended
job into a second attempt beside the running one, or fail a job over its running attempt.

So a pass hands kopf a patch function instead (``patch.fns``). kopf applies it to the body its watch
last delivered, turns the difference into a JSON patch led by a ``test`` of that body's
resourceVersion (``kopf._cogs.clients.patching.patch_obj``), and sends that: it lands only over that
very version, retried or not, and is refused (422) otherwise. The function itself changes nothing
unless that body still has the status and generation the pass read: a change of metadata alone (a
label, a delete) that the watch delivered in between does not cost the pass its write. (kopf's
finalizer on a new job did, in most cases, until passes waited for it: handlers._finalizer_shown.)

What is not covered: Events of a pass are posted when its status is handed to the API server, so a
write refused there (the watch behind the server: rare, as the watch delivers a new version within
milliseconds) has posted its Events; its next pass recomputes from the newer body.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from koinon_operator.telemetry import apply_merge_patch


@dataclass(frozen=True)
class StatusRead:
    """What a pass read of its body: taken when the pass begins, since kopf updates the body a timer
    holds in place as its watch delivers newer versions."""

    status: Mapping[str, Any]
    generation: object

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> StatusRead:
        return cls(copy.deepcopy(dict(body.get("status") or {})), (body.get("metadata") or {}).get("generation"))


@dataclass
class ConditionalStatusWrite:
    """A kopf patch function (``PatchFn``): merges ``status`` into the body's status if the body still
    has the status and generation of ``read``, then calls ``on_written``; otherwise changes nothing
    and calls ``on_dropped``. Decides once: kopf carries a function whose JSON patch was refused into
    the timer's next patch, by which time the next pass has computed from the newer body, so a second
    call is a no-op."""

    read: StatusRead
    status: Mapping[str, Any]
    on_written: Callable[[], None] = lambda: None
    on_dropped: Callable[[], None] = lambda: None
    decided: bool = field(default=False, init=False)

    def __call__(self, body: kopf.RawBody) -> None:
        if self.decided:
            return
        self.decided = True
        current = body.get("status") or {}
        meta = body.get("metadata", {})
        # A delete bumps the generation of an object with finalizers, and the deletion handler
        # waits for the pass in flight (reconciler.stop, on the job's lock): its status
        # (Completed, say) is still the job's last word, with its Events (an edit of a job being
        # deleted starts nothing).
        edited = meta.get("generation") != self.read.generation and not meta.get("deletionTimestamp")
        if current != self.read.status or edited:
            self.on_dropped()
            return
        body["status"] = apply_merge_patch(current, self.status)
        self.on_written()
