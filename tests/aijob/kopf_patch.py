"""What kopf writes with a timer handler's patch: its functions applied to a copy of the body, as
kopf's patch_obj does before it sends the difference (status_write.ConditionalStatusWrite)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import kopf


def written_status(patch: kopf.Patch, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The status ``patch`` leaves over ``body``; None when it writes none. Applies (and so
    decides) the patch's functions once, as kopf does."""
    assert not dict(patch), f"a merge patch beside the functions: {dict(patch)}"
    after: Any = copy.deepcopy(dict(body))
    for fn in patch.fns:
        fn(after)
    status = after.get("status")
    return dict(status) if status is not None and status != body.get("status") else None
