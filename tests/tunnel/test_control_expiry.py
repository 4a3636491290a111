"""A session the gateway ends for silence must end the agent's call too (as Replaced/Unresponsive do)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from koinon_gateway.rpc import EOF, tunnel_stub
from koinon_gateway.sessions import NodeSession, SessionTable
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

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


def revoke(sessions: SessionTable, session: NodeSession) -> None:
    sessions.revoke(session.node_name)  # its VolunteerNode is deleted


def expire(sessions: SessionTable, session: NodeSession) -> None:
    session.last_seen = time.monotonic() - 3600  # silent past the heartbeat timeout
    assert sessions.expire_stale() == [session.node_name]


@pytest.mark.parametrize(
    ("end_session", "code"),
    [(revoke, grpc.StatusCode.PERMISSION_DENIED), (expire, grpc.StatusCode.ABORTED)],
)
async def test_a_session_ended_while_its_first_message_is_in_flight_ends_the_agents_call(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    end_session: Callable[[SessionTable, NodeSession], None],
    code: grpc.StatusCode,
) -> None:
    """The gateway ends a session just as the session's writer writes Registered, its first
    message: the handler's cleanup cancels that write while grpc still sends it. The agent's call
    must still end. It used to stay open for ever: grpc.aio took the call's initial metadata for
    unsent (it notes it once a write completes), the status the handler ended with asked to send it
    again, and grpc refused that batch (the same trap as the Accept stream's, test_connection_ends)."""
    original = NodeSession.write_outbox

    async def end_it_as_the_first_write_goes_out(session: NodeSession) -> None:
        first = await session.outbox.get()
        # The handler's cancel lands while the write below waits in grpc (the same loop turn,
        # before grpc can have completed it); the cleanup then cancels this write.
        end_session(c.gateway.sessions, session)
        await session.stream.write(first)
        await original(session)

    monkeypatch.setattr(NodeSession, "write_outbox", end_it_as_the_first_write_goes_out)
    async with cluster(tmp_path, heartbeat_timeout_s=30.0) as c, channel_for(c) as channel:
        response = await tunnel_stub(channel).Join(pb.JoinRequest(token=c.tokens.add(), name_hint="mute"))
        control = tunnel_stub(channel).Control(metadata=(("authorization", f"Bearer {response.credential}"),))
        register = pb.Register(node_name=response.assignment.node_name, address=response.assignment.address)
        try:
            await control.write(pb.AgentMessage(register=register))
            received = []
            try:
                while (message := await asyncio.wait_for(control.read(), 5)) is not EOF:
                    received.append(message.WhichOneof("msg"))  # type: ignore[union-attr]
            except grpc.aio.AioRpcError:
                pass
            except TimeoutError:
                raise AssertionError(f"the agent's Control call never ended (it received {received})") from None
            assert await asyncio.wait_for(control.code(), 5) == code
        finally:
            control.cancel()
