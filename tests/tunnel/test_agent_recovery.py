"""Faults a running agent must get over by itself, against a real gateway: a credential that
expired during an outage, a renewal it cannot store, a Ray binary it cannot start, a proxy port it
cannot have, a join that outlived its deadline, a stop during CA discovery, and a gateway that
comes back after an outage (long, or while the machine slept) or with another assignment."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from koinon_agent import agent as agent_module
from koinon_agent import state
from koinon_agent.agent import Agent, BackoffIterator, DrainedBeforeJoining
from koinon_agent.ray_node import RayNode, ray_assignment_changes
from koinon_gateway.registry import JSON, InMemoryNodeRegistry
from koinon_gateway.rpc import tunnel_stub
from koinon_gateway.server import Gateway
from koinon_gateway.tokens import InMemoryTokenStore, JoinGrant
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import channel_for, cluster, connect_via_proxy, control_call


async def wait_until(condition: object, within_s: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_a_credential_that_expired_during_an_outage_is_replaced_by_joining_again(tmp_path: Path) -> None:
    async with cluster(tmp_path, credential_lifetime_s=2.0) as c:
        agent = await c.start_agent("alpha")
        task = c.agents[-1][1]
        assert agent.identity is not None
        listen = c.gateway.agent_target
        await c.gateway.stop(0)
        # Read once the gateway is gone: a renewal (due after half the 2 s) that landed between a
        # read before and the stop left the agent a credential 2 s younger than the outage allowed for.
        before = agent.identity
        await asyncio.sleep(max(0.0, before.expires_at - time.time()) + 0.5)  # the outage outlives it
        c.gateway = Gateway(replace(c.gateway.config, listen=listen), c.tokens, c.registry, c.gateway.ca_store)
        await c.gateway.start()
        await wait_until(lambda: agent.connected.is_set() or task.done(), 15, "agent did not come back")
        assert not task.done(), f"agent exited: {task.exception()!r}"
        assert agent.identity is not None and agent.identity.node_name != before.node_name
        # One node, not a new one beside a NotReady ghost: the join retired the old one.
        assert list(c.registry.objects) == [agent.identity.node_name]
        assert c.registry.objects[agent.identity.node_name]["status"]["connected"] is True
        assert state.load(agent.config.state_dir) == agent.identity


async def test_a_renewed_credential_that_cannot_be_stored_is_kept_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with cluster(tmp_path, credential_lifetime_s=1.0) as c:  # renewed every ~0.5 s
        agent = await c.start_agent("alpha")
        task = c.agents[-1][1]
        assert agent.identity is not None
        first = agent.identity.credential

        def disk_full(*_args: object, **_kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(state, "save", disk_full)
        await wait_until(lambda: agent.identity is not None and agent.identity.credential != first, 10, "no renewal")
        await asyncio.sleep(1.5)  # past the first credential's expiry: the renewed one carries on
        assert not task.done(), f"agent exited: {task.exception()!r}"
        assert agent.connected.is_set()
        assert "cannot store the renewed credential" in caplog.text


class FullDisk:
    """state.save, failing with ENOSPC while ``full``; the identities it was asked to store."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = True
        self.tried: list[state.StoredIdentity] = []
        self.real_save = state.save
        monkeypatch.setattr(state, "save", self)

    def __call__(self, state_dir: Path, identity: state.StoredIdentity) -> None:
        self.tried.append(identity)
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real_save(state_dir, identity)


async def test_a_joined_identity_the_disk_cannot_take_opens_no_session_until_it_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fills between the check before the join and the save after it: the node joined
    (a token use, a VolunteerNode), and the gateway gives it back to a retry of the same join only
    while it never had a session. So the agent opens none, saying why, and tries the save again
    until the disk takes it; then it connects and the join is finished."""
    disk = FullDisk(monkeypatch)
    async with cluster(tmp_path) as c:
        agent = Agent(c.agent_config("alpha"))
        task = asyncio.ensure_future(agent.run())
        c.agents.append((agent, task))
        await wait_until(lambda: len(disk.tried) >= 3 or task.done(), 10, "the save was not tried again")
        assert not task.done(), f"agent exited: {task.exception()!r}"
        assert not agent.connected.is_set() and c.gateway.sessions.by_name == {}
        assert len(c.registry.objects) == 1
        assert "not connecting until it is stored there" in caplog.text
        joined = disk.tried[0]
        assert joined.credential not in caplog.text
        assert (agent.config.state_dir / "pending-join.json").exists()
        disk.full = False
        await wait_until(lambda: agent.connected.is_set() or task.done(), 10, "did not connect once stored")
        # The node the join made (the gateway may renew its credential at registration already).
        stored = state.load(agent.config.state_dir)
        assert agent.identity is not None and stored is not None
        assert {(i.node_name, i.address) for i in (agent.identity, stored)} == {(joined.node_name, joined.address)}
        assert not (agent.config.state_dir / "pending-join.json").exists()  # the join is finished once stored
        assert not agent._identity_unsaved


@pytest.mark.parametrize("ended", ["killed", "drained"])
async def test_a_restart_while_the_joined_credential_is_unstored_gets_the_same_node_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ended: str
) -> None:
    """The agent is stopped (evicted, OOM-killed, rebooted: killed; or SIGTERM: drained) before the
    disk took its joined credential. Restarted once there is room, it sends the pending join id
    again and gets the same node back, even with a one-use token (what the chart and the dev plane
    create): no refusal (exit 3), no second VolunteerNode beside a NotReady ghost."""
    disk = FullDisk(monkeypatch)
    async with cluster(tmp_path) as c:
        token = c.tokens.add(owner="alice", region="eu", usage_limit=1)
        first = Agent(c.agent_config("alpha", token=token))
        task = asyncio.ensure_future(first.run())
        await wait_until(lambda: len(disk.tried) >= 2 or task.done(), 10, "the save was not tried again")
        joined = disk.tried[0]
        if ended == "killed":
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        else:
            first.request_drain()
            with pytest.raises(DrainedBeforeJoining):
                await asyncio.wait_for(task, 10)
        assert (first.config.state_dir / "pending-join.json").exists()
        disk.full = False
        second = await c.start_agent("alpha", token=token)
        assert second.identity is not None
        assert (second.identity.node_name, second.identity.address) == (joined.node_name, joined.address)
        assert list(c.registry.objects) == [joined.node_name], "a second VolunteerNode was made"
        assert state.load(second.config.state_dir) == second.identity


async def test_an_unexpected_error_starting_ray_is_logged_and_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only an OSError: whatever ray start's preparation raises must not end the supervisor
    silently, leaving the node without Ray until the next reconnect."""
    starts: list[pb.Assignment] = []

    class UnstartableRay(RayNode):
        async def start(self, assignment: pb.Assignment) -> None:
            starts.append(assignment)
            raise ValueError("embedded null byte")

    monkeypatch.setattr(agent_module, "RayNode", UnstartableRay)
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha", start_ray=True)
        await wait_until(lambda: len(starts) >= 2, 10, "not tried again")
        supervisor = agent._ray_supervisor
        assert supervisor is not None and not supervisor.done()
        assert "cannot start the Ray node (ValueError: embedded null byte)" in caplog.text


async def test_a_ray_node_that_cannot_be_started_is_reported_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="koinon_agent")
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha", start_ray=True, ray_bin=str(tmp_path / "no-such-ray"))
        await wait_until(lambda: caplog.text.count("cannot start the Ray node") >= 2, 10, "not tried again")
        supervisor = agent._ray_supervisor
        assert supervisor is not None and not supervisor.done()
        assert agent.connected.is_set()
        assert agent._ray_state() == ("", "stopped")


async def test_a_proxy_port_that_is_taken_fails_before_the_join_uses_the_token(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        async with cluster(tmp_path) as c:
            token = c.tokens.add(owner="alice", usage_limit=1)
            agent = Agent(c.agent_config("alpha", token=token, proxy_port=taken.getsockname()[1]))
            with pytest.raises(ValueError, match="proxy_port: cannot listen"):
                await asyncio.wait_for(agent.run(), 10)
            assert c.registry.objects == {}
            assert c.tokens.tokens[token.split(".")[0]].usages_count == 0


class SlowFirstCreate(InMemoryNodeRegistry):
    """The first VolunteerNode create takes longer than the joining agent waits."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def create(self, name: str, spec: JSON, labels: dict[str, str]) -> str:
        if self.delay_s:
            delay, self.delay_s = self.delay_s, 0.0
            await asyncio.sleep(delay)
        return await super().create(name, spec, labels)


async def test_a_join_the_agent_gave_up_on_gives_the_tokens_use_back(tmp_path: Path) -> None:
    async with cluster(tmp_path, registry=SlowFirstCreate(2.0)) as c:
        token = c.tokens.add(owner="alice", usage_limit=1)
        async with channel_for(c) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                await tunnel_stub(channel).Join(pb.JoinRequest(token=token, name_hint="slow"), timeout=0.5)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            token_id = token.split(".")[0]
            await wait_until(lambda: c.tokens.tokens[token_id].usages_count == 0, 5, "the use was not given back")
            assert c.registry.objects == {}
            response = await tunnel_stub(channel).Join(pb.JoinRequest(token=token, name_hint="slow"), timeout=5)
            assert list(c.registry.objects) == [response.assignment.node_name]


@pytest.mark.parametrize("join_id", ["", "0123456789abcdef" * 2])
async def test_a_join_given_up_while_the_token_store_counts_the_use_gives_it_back(tmp_path: Path, join_id: str) -> None:
    """The store has counted the use (an API write applied) but answers late; the agent's deadline
    passes meanwhile. A retry of the same join id waits (ABORTED) until the use is back."""
    async with cluster(tmp_path) as c:
        answer_late = asyncio.Event()
        answer_late.set()

        async def consume(token: str, join_key: str = "") -> JoinGrant:
            grant = await InMemoryTokenStore.consume(c.tokens, token, join_key)
            if answer_late.is_set():
                await asyncio.sleep(1.5)
            return grant

        c.tokens.consume = consume  # type: ignore[method-assign]
        token = c.tokens.add(owner="alice", usage_limit=1)
        request = pb.JoinRequest(token=token, name_hint="slow", join_id=join_id)
        async with channel_for(c) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                await tunnel_stub(channel).Join(request, timeout=0.5)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            answer_late.clear()
            if join_id:
                with pytest.raises(grpc.aio.AioRpcError) as waiting:
                    await tunnel_stub(channel).Join(request, timeout=5)
                assert waiting.value.code() == grpc.StatusCode.ABORTED
            token_id = token.split(".")[0]
            await wait_until(lambda: c.tokens.tokens[token_id].usages_count == 0, 5, "the use was not given back")
            response = await tunnel_stub(channel).Join(request, timeout=5)
            assert list(c.registry.objects) == [response.assignment.node_name]
            assert c.tokens.tokens[token_id].usages_count == 1


def test_sigterm_while_discovering_the_ca_of_a_silent_gateway_is_prompt(tmp_path: Path) -> None:
    with socket.socket() as silent:  # takes the TCP connection, never answers the TLS handshake
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        agent = subprocess.Popen(
            [sys.executable, "-m", "koinon_agent.cli", "join", "--gateway", f"127.0.0.1:{silent.getsockname()[1]}",
             "--no-ray", "--ca-cert-hash", "sha256:" + "0" * 64],
            env={**os.environ, "KOINON_TOKEN": "abcdef.0123456789abcdef", "KOINON_STATE_DIR": str(tmp_path)},
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            silent.settimeout(30)
            connection, _ = silent.accept()  # the agent is inside the handshake from here on
            with connection:
                time.sleep(0.3)
                sent = time.monotonic()
                agent.send_signal(signal.SIGTERM)
                _, err = agent.communicate(timeout=20)
                took = time.monotonic() - sent
        finally:
            if agent.poll() is None:
                agent.kill()
        assert agent.returncode == 0, err
        assert took < 3, f"SIGTERM took {took:.1f} s (the handshake's timeout is 10 s)"


class SlowGets(InMemoryNodeRegistry):
    """Reads of a VolunteerNode take ``delay_s`` once ``slow`` is set (an API server under load)."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = False

    async def get(self, name: str) -> JSON | None:
        if self.slow:
            await asyncio.sleep(2.0)
        return await super().get(name)


async def test_a_join_given_up_while_the_previous_node_is_retired_gives_the_use_back(tmp_path: Path) -> None:
    registry = SlowGets()
    async with cluster(tmp_path, registry=registry, credential_lifetime_s=2.0) as c:
        first = await c.start_agent("alpha")
        assert first.identity is not None
        previous = first.identity.credential
        first.request_drain()
        await asyncio.wait_for(c.agents.pop()[1], 10)
        # Only an expired previous credential has its node retired (a valid one could register).
        await asyncio.sleep(max(0.0, first.identity.expires_at - time.time()) + 0.5)
        token = c.tokens.add(owner="alice", usage_limit=1)
        registry.slow = True  # the join's look at the previous node outlasts the caller's deadline
        request = pb.JoinRequest(token=token, name_hint="again", previous_credential=previous)
        async with channel_for(c) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                await tunnel_stub(channel).Join(request, timeout=0.5)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            token_id = token.split(".")[0]
            await wait_until(lambda: c.tokens.tokens[token_id].usages_count == 0, 5, "the use was not given back")
            registry.slow = False
            response = await tunnel_stub(channel).Join(request, timeout=10)
            assert response.assignment.node_name in c.registry.objects


async def test_a_heartbeat_sender_that_fails_ends_the_session_and_the_agent_reconnects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures: list[bool] = []

    async def failing_sender(self: Agent, send: object, interval: float) -> None:
        if not failures:  # the first session's sender fails; later ones work
            failures.append(True)
            raise ConnectionError("control stream already finished")
        await original(self, send, interval)

    original = Agent._heartbeat_sender
    monkeypatch.setattr(Agent, "_heartbeat_sender", failing_sender)
    async with cluster(tmp_path, heartbeat_timeout_s=30.0) as c:  # the gateway alone would not notice
        agent = await c.start_agent("alpha")
        await wait_until(lambda: agent.registrations >= 2, 10, "the session went on without heartbeats")
        assert failures == [True]


async def test_backoff_restarts_only_after_a_session_that_stayed_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway that takes each session and drops it at once gets ever longer pauses; one session
    that stays up past backoff_reset_after_s brings the pause back to the first one's."""
    delays: list[float] = []
    original_next = BackoffIterator.next

    def recording_next(self: BackoffIterator) -> float:
        delay = original_next(self)
        delays.append(delay)
        return delay

    monkeypatch.setattr(BackoffIterator, "next", recording_next)
    # Each dropped session costs three status writes; within the default budget the later
    # Registers would wait for their writes, and the agent's reconnect would overtake them.
    async with cluster(tmp_path, heartbeat_timeout_s=30.0, status_write_burst=100) as c:
        agent = await c.start_agent("alpha", backoff_initial_s=0.2, backoff_max_s=3.2, backoff_reset_after_s=0.6)
        assert agent.identity is not None
        name = agent.identity.node_name

        async def drop_session(after_s: float) -> None:
            registered = agent.registrations
            await asyncio.sleep(after_s)
            # A second Register with the node's credential ends the agent's session (the newer wins).
            assert agent.identity is not None
            register = pb.Register(node_name=name, address=agent.identity.address)
            assert isinstance(await control_call(c, agent.identity.credential, register), pb.GatewayMessage)
            await wait_until(lambda: agent.registrations > registered, 10, "the agent did not come back")

        for _ in range(4):
            await drop_session(0.0)
        assert len(delays) == 4
        assert 0.8 <= delays[3] <= 1.6  # doubled each time: 0.2, 0.4, 0.8, 1.6 ceilings
        await drop_session(1.0)
        assert len(delays) == 5 and 0.1 <= delays[4] <= 0.2


async def test_a_rejoin_at_the_same_address_restarts_ray_under_the_new_node_name(tmp_path: Path) -> None:
    """The gateway retires the old node and usually hands its address out again: Ray must still be
    restarted, since its koinon.dev/node label names the retired node (the operator would map it
    to a VolunteerNode that no longer exists)."""
    # Made before Ray starts: confined Ray can create no entry in tmp_path, above the state dir.
    (tmp_path / "records").mkdir()
    starts = tmp_path / "records" / "starts"
    fake_ray = tmp_path / "ray"  # records each `ray start`'s arguments
    fake_ray.write_text(f'#!/bin/sh\necho "$@" >> {starts}\nexec sleep 600\n')
    fake_ray.chmod(0o755)
    async with cluster(tmp_path, credential_lifetime_s=2.0) as c:
        agent = await c.start_agent("alpha", start_ray=True, ray_bin=str(fake_ray), ray_restart_after_s=60.0)
        task = c.agents[-1][1]
        await wait_until(starts.exists, 10, "ray never started")
        assert agent.identity is not None
        before = agent.identity
        listen = c.gateway.agent_target
        await c.gateway.stop(0)
        await asyncio.sleep(max(0.0, before.expires_at - time.time()) + 0.5)  # shorter than ray_restart_after
        c.gateway = Gateway(replace(c.gateway.config, listen=listen), c.tokens, c.registry, c.gateway.ca_store)
        await c.gateway.start()

        def restarted_as_new_node() -> bool:
            if task.done():
                return True
            identity = agent.identity
            return (
                identity is not None
                and identity.node_name != before.node_name
                and f"--labels=koinon.dev/node={identity.node_name}" in starts.read_text()
            )

        await wait_until(restarted_as_new_node, 20, "Ray was not restarted under the new node name")
        assert not task.done(), f"agent exited: {task.exception()!r}"
        assert agent.identity is not None and agent.identity.address == before.address
        assert starts.read_text().splitlines()[-1].count(f"koinon.dev/node={agent.identity.node_name}") == 1


class _FinishedAfterAccept:
    """A Connect call the gateway ends right after reading the Accept frame (it restarted, revoked
    the node, or no longer knew the connection): later writes fail as grpc.aio's do on a finished
    call. A stand-in: with a real gateway the window is microseconds wide."""

    def __init__(self) -> None:
        self._done = False

    async def write(self, message: object) -> None:
        if self._done:
            raise asyncio.InvalidStateError("RPC is already finished.")
        self._done = True

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        return False

    async def done_writing(self) -> None:
        pass

    async def read(self) -> object:
        from koinon_gateway.rpc import EOF

        return EOF

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK


async def test_an_accept_whose_call_the_gateway_finished_ends_quietly_and_closes_the_local_connection() -> None:
    from koinon_agent.local_proxy import accept_connection

    closed = asyncio.Event()

    async def ray_port(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # EOF once the agent closes its side
        closed.set()
        writer.close()

    class Stub:
        def Connect(self, metadata: object) -> _FinishedAfterAccept:
            return _FinishedAfterAccept()

    server = await asyncio.start_server(ray_port, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        request = pb.OpenConnection(connection_id=7, port=port)
        await asyncio.wait_for(accept_connection(Stub(), (), request, "127.0.0.1"), 5)
        await asyncio.wait_for(closed.wait(), 2)
    finally:
        server.close()


async def test_stopping_a_ray_node_whose_ray_start_exited_leaves_a_process_with_its_pid_alone(
    tmp_path: Path,
) -> None:
    from koinon_agent.ray_node import RayNode, RaySettings

    class ExitedRayStart:
        """`ray start` exited and was reaped; its PID now names an unrelated process (simulated)."""

        def __init__(self, pid: int) -> None:
            self.pid = pid
            self.returncode = 1

        async def wait(self) -> int:
            return self.returncode

        def send_signal(self, signum: int) -> None:
            raise AssertionError("an exited process is not signalled")

    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        node = RayNode(RaySettings("ray", tmp_path, "http://127.0.0.1:1", None, 0, 0, None))
        node.process = ExitedRayStart(unrelated.pid)  # type: ignore[assignment]
        await node.stop(timeout=0.1)
        await asyncio.sleep(0.2)
        assert unrelated.poll() is None, "stop() killed a process that merely has the exited ray start's PID"
    finally:
        unrelated.kill()
        unrelated.wait()


def recording_ray(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for `ray` that records each `ray start`'s arguments (a line in the returned
    file) and then blocks as `ray start --block` does."""
    # Made before Ray starts: confined Ray can create no entry in tmp_path, above the state dir.
    (tmp_path / "records").mkdir()
    starts = tmp_path / "records" / "starts"
    fake_ray = tmp_path / "ray"
    fake_ray.write_text(f'#!/bin/sh\necho "$@" >> {starts}\nexec sleep 600\n')
    fake_ray.chmod(0o755)
    return fake_ray, starts


def ray_starts(starts: Path) -> list[str]:
    return starts.read_text().splitlines() if starts.exists() else []


class FreezableForwarder:
    """A TCP hop between agent and gateway that can go silent (a partition: packets dropped, no
    RST, sockets stay open) and come back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = asyncio.Event()
        self.open.set()
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                await self.open.wait()  # silent: hold what was sent
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.open.wait()  # a new connection during the partition gets nowhere
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    def partition(self) -> None:
        self.open.clear()

    def heal(self) -> None:
        # The partition ends: connections that lived through it are dead (as NAT state would be).
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()
        self.open.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FreezableForwarder]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()


async def test_an_outage_counts_from_the_gateways_last_message_not_from_when_its_loss_was_noticed(
    tmp_path: Path,
) -> None:
    """--ray-restart-after promises a Ray restart after a gateway outage longer than N seconds.
    Counted from when the agent noticed the loss (heartbeat timeout + probe interval after the
    gateway's last word), a 6 s partition read as ~3 s, and Ray was kept though the outage was
    longer than the threshold (4.5 s)."""
    fake_ray, starts = recording_ray(tmp_path)
    # The agent takes the stream for lost after heartbeat_timeout (3 s) + probe interval (0.6 s).
    async with cluster(tmp_path, tls=False, heartbeat_timeout_s=3.0) as c:
        gateway_port = int(c.gateway.agent_target.rpartition(":")[2])
        async with FreezableForwarder(gateway_port).running() as hop:
            agent = await c.start_agent(
                "alpha", gateway=f"127.0.0.1:{hop.port}", start_ray=True, ray_bin=str(fake_ray),
                ray_restart_after_s=4.5,
            )  # fmt: skip
            task = c.agents[-1][1]
            await wait_until(lambda: len(ray_starts(starts)) == 1, 15, "ray never started")
            registrations = agent.registrations
            hop.partition()
            await asyncio.sleep(6.0)
            hop.heal()
            await wait_until(lambda: agent.registrations > registrations or task.done(), 30, "agent did not come back")
            assert not task.done(), f"agent exited: {task.exception()!r}"
            await wait_until(
                lambda: len(ray_starts(starts)) >= 2, 10, "Ray was not restarted after a 6 s outage (threshold 4.5 s)"
            )


async def test_a_machine_that_slept_through_an_outage_restarts_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A laptop asleep for an hour: time.monotonic() stops while the machine is suspended, so the
    outage read as the seconds it was awake and Ray was kept, though the head had long dropped
    it. The outage clock (CLOCK_BOOTTIME) counts the sleep; here it jumps an hour meanwhile."""
    fake_ray, starts = recording_ray(tmp_path)
    slept = 0.0
    real_clock = agent_module.outage_clock
    monkeypatch.setattr(agent_module, "outage_clock", lambda: real_clock() + slept)
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("alpha", start_ray=True, ray_bin=str(fake_ray), ray_restart_after_s=60.0)
        task = c.agents[-1][1]
        await wait_until(lambda: len(ray_starts(starts)) == 1, 15, "ray never started")
        registrations = agent.registrations
        listen = c.gateway.agent_target
        await c.gateway.stop(0)
        slept = 3600.0
        c.gateway = Gateway(replace(c.gateway.config, listen=listen), c.tokens, c.registry, c.gateway.ca_store)
        await c.gateway.start()
        await wait_until(lambda: agent.registrations > registrations or task.done(), 15, "agent did not come back")
        assert not task.done(), f"agent exited: {task.exception()!r}"
        await wait_until(lambda: len(ray_starts(starts)) >= 2, 10, "Ray was kept after an hour asleep")


def test_the_outage_clock_counts_suspended_time_where_the_platform_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    if hasattr(time, "CLOCK_BOOTTIME"):
        assert abs(agent_module.outage_clock() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 1.0
        monkeypatch.delattr(time, "CLOCK_BOOTTIME")
    assert abs(agent_module.outage_clock() - time.monotonic()) < 1.0  # elsewhere: the monotonic clock


async def test_a_reconnect_to_another_port_block_restarts_ray_however_short_the_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway restarted with another --port-base (a port clash on its host, say) and the
    agent was back within seconds: the gateway routes and allows only the new Ray port block, yet
    the Ray node kept the ports it was started with while the agent reported it "running"."""
    caplog.set_level(logging.INFO, logger="koinon_agent")
    fake_ray, starts = recording_ray(tmp_path)
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("alpha", start_ray=True, ray_bin=str(fake_ray), ray_restart_after_s=60.0)
        task = c.agents[-1][1]
        await wait_until(lambda: len(ray_starts(starts)) == 1, 15, "ray never started")
        assert agent.assignment is not None
        old_port = agent.assignment.ports.node_manager_port
        registrations = agent.registrations
        listen = c.gateway.agent_target
        await c.gateway.stop(0)
        config = replace(c.gateway.config, listen=listen, port_base=c.gateway.config.port_base + 3000)
        c.gateway = Gateway(config, c.tokens, c.registry, c.gateway.ca_store)
        await c.gateway.start()
        await wait_until(lambda: agent.registrations > registrations or task.done(), 15, "agent did not come back")
        assert not task.done(), f"agent exited: {task.exception()!r}"
        new_port = agent.assignment.ports.node_manager_port
        assert new_port != old_port
        await wait_until(
            lambda: f"--node-manager-port={new_port}" in starts.read_text(),
            10,
            f"Ray still runs on the old block (node manager {old_port}); the gateway now serves {new_port}",
        )
        assert "the gateway's assignment changed (ports): restarting the Ray node" in caplog.text


def test_what_ray_was_started_with_is_compared_by_name_never_by_value() -> None:
    started = pb.Assignment(
        node_name="vn-a", address="127.0.20.1", ray_address="10.0.0.1:6379", ray_auth_token="secret-1",
        heartbeat_interval_ms=2000, ports=pb.PortBlock(node_manager_port=30000),
    )  # fmt: skip
    now = pb.Assignment()
    now.CopyFrom(started)
    now.heartbeat_interval_ms = 500  # not what Ray runs with
    assert ray_assignment_changes(started, now) == []
    now.ray_auth_token = "secret-2"
    now.ray_address = "10.0.0.2:6379"
    assert ray_assignment_changes(started, now) == ["ray_address", "ray_auth_token"]


# Long enough for gRPC's default channel backoff (1 s, x1.6, +-20 %, up to 120 s) to have grown to
# ~10 s: its sixth connection attempt falls 13-19 s after the loss and its seventh 21-32 s, so
# without the agent's own schedule on its channels the first one to reach the gateway comes at least
# 2 s (median ~7 s) after it is back. The helpers' agent backs off 0.05-0.5 s.
LONG_OUTAGE_S = 19.0


async def test_after_a_long_outage_the_agent_is_back_within_its_own_backoff(tmp_path: Path) -> None:
    """The agent kept its channels through the outage, and a channel in gRPC's reconnect backoff
    fails every call at once without dialling: the agent's retries did nothing, and it came back
    only when gRPC's own backoff (up to 120 s) let the channel dial again, the Ray node NotReady
    meanwhile and the outage clock of --ray-restart-after running on. Both channels, Control and
    the data path Ray's connections take, now redial on the agent's schedule. With TLS, as the
    volunteers run."""
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha")
        task = c.agents[-1][1]
        registrations = agent.registrations
        listen = c.gateway.agent_target
        await c.gateway.stop(0)
        await asyncio.sleep(LONG_OUTAGE_S)
        c.gateway = Gateway(replace(c.gateway.config, listen=listen), c.tokens, c.registry, c.gateway.ca_store)
        await c.gateway.start()
        back_at = time.monotonic()
        await wait_until(lambda: agent.registrations > registrations or task.done(), 30, "agent did not come back")
        assert not task.done(), f"agent exited: {task.exception()!r}"
        took = time.monotonic() - back_at
        assert took < 3, f"the agent registered again {took:.1f}s after the gateway was back (its backoff: <= 0.5 s)"

        async def head_reachable() -> bool:
            status, _, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
            writer.close()
            return status == 200

        while not await head_reachable():
            took = time.monotonic() - back_at
            assert took < 3, f"Ray's connections failed {took:.1f}s after the gateway was back"
            await asyncio.sleep(0.1)
