"""Runs the gateway's and the agent's asyncio programs on uvloop when it is installed.

uvloop's libuv-based loop roughly halves the per-wakeup cost of the tunnel's data path (each
proxied message crosses several event-loop wakeups; see workers/koinon_agent/README.md). grpc.aio
works on it. Without uvloop (e.g. a platform it does not support) the stdlib loop is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Like ``asyncio.run``, on uvloop where available."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
