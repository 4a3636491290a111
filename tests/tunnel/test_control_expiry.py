"""A session the gateway ends for silence must end the agent's call too (as Replaced/Unresponsive do)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from koinon_gateway.rpc import EOF

from .helpers import channel_for, cluster, registered_mute_node


async def test_a_session_expired_for_silence_ends_the_agents_call(tmp_path: Path) -> None:
    async with cluster(tmp_path, heartbeat_timeout_s=1.0) as c, channel_for(c) as channel:
        response, control = await registered_mute_node(c, channel)
        name = response.assignment.node_name
        # The mute node sends nothing after Register: the gateway expires it (NotReady)...
        for _ in range(50):
            await asyncio.sleep(0.1)
            if name not in c.gateway.sessions.by_name:
                break
        assert name not in c.gateway.sessions.by_name
        await c.gateway.sessions.flush()
        assert c.registry.objects[name]["status"]["connected"] is False
        # ...and the agent must hear that its session is over, not a stream that goes quiet.
        ended = None
        try:
            async with asyncio.timeout(3.0):
                while True:
                    message = await control.read()
                    if message is EOF:
                        ended = "eof"
                        break
        except grpc.aio.AioRpcError as exc:
            ended = exc.code().name
        except TimeoutError:
            ended = None
        finally:
            control.cancel()
        assert ended is not None, "the expired session's Control call stays open and silent"
