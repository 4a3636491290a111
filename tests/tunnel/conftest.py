"""The gateway and the agent run on uvloop (koinon_gateway.event_loop); the stdlib loop is the
fallback. The two differ where the data path meets a connection that is gone (uvloop raises on a
write the stdlib loop drops), so the data path's own tests run on both."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
UVLOOP: LoopFactory | None
try:
    import uvloop

    UVLOOP = uvloop.new_event_loop
except ImportError:  # a platform uvloop does not support: the stdlib loop only
    UVLOOP = None

ON_BOTH_LOOPS = {"test_tcp_pipe.py", "test_connection_ends.py"}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, LoopFactory]:
    factories: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
    if UVLOOP is not None and item.path.name in ON_BOTH_LOOPS:
        factories["uvloop"] = UVLOOP
    return factories
