"""A join whose reply is lost (the gateway crashed right after recording the node, or the agent's
deadline passed just after) is retried with the same join id and gets that node back: one node,
one use of the token, a credential that works. Against a real gateway over TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import secrets
import stat
import time
import types
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from koinon_agent import state
from koinon_agent.agent import Agent
from koinon_gateway import service as service_module
from koinon_gateway.kube_client import KubeApiError
from koinon_gateway.registry import JOIN_TOKEN_LABEL, JSON, FileNodeRegistry, InMemoryNodeRegistry, write_refused
from koinon_gateway.rpc import tunnel_stub
from koinon_gateway.server import Gateway
from koinon_gateway.service import (
    HALF_MADE_JOIN_S,
    JOIN_KEY_LABEL,
    HalfMadeSightings,
    KeptUse,
    KeptUses,
    TunnelService,
    join_key,
)
from koinon_gateway.status import rfc3339
from koinon_gateway.tokens import COUNTED_JOIN_HONOURED_S, COUNTED_JOIN_RETRY_S, InMemoryTokenStore, JoinGrant
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import Cluster, channel_for, cluster, control_call, gateway_channel, random_port_base


async def join(c: Cluster, token: str, join_id: str, timeout: float = 5) -> pb.JoinResponse | grpc.aio.AioRpcError:
    async with channel_for(c) as channel:
        try:
            response: pb.JoinResponse = await tunnel_stub(channel).Join(
                pb.JoinRequest(token=token, name_hint="vol", join_id=join_id), timeout=timeout
            )
            return response
        except grpc.aio.AioRpcError as exc:
            return exc


def uses(c: Cluster, token: str) -> int:
    return c.tokens.tokens[token.split(".")[0]].usages_count


async def registers(c: Cluster, response: pb.JoinResponse) -> bool:
    register = pb.Register(node_name=response.assignment.node_name, address=response.assignment.address)
    result = await control_call(c, response.credential, register)
    return isinstance(result, pb.GatewayMessage) and result.WhichOneof("msg") == "registered"


async def test_a_join_retried_after_its_reply_was_lost_gets_the_same_node_and_no_second_use(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, pb.JoinResponse)
        # The reply never reached the agent; it asks again with the same join id.
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), again
        assert again.assignment.node_name == first.assignment.node_name
        assert again.assignment.address == first.assignment.address
        assert again.assignment.ports == first.assignment.ports
        assert list(c.registry.objects) == [first.assignment.node_name]
        assert uses(c, token) == 1
        assert c.gateway.metrics.joins["replayed"] == 1
        assert await registers(c, again)  # the new credential is good for that node and address


async def test_a_replayed_join_survives_a_gateway_restart(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, pb.JoinResponse)
        # The gateway dies before the reply leaves; its successor has only what the registry holds.
        listen = c.gateway.agent_target
        await c.gateway.stop(0)
        c.gateway = Gateway(replace(c.gateway.config, listen=listen), c.tokens, c.registry, c.gateway.ca_store)
        await c.gateway.start()
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), again
        assert (again.assignment.node_name, again.assignment.address) == (
            first.assignment.node_name,
            first.assignment.address,
        )
        assert list(c.registry.objects) == [first.assignment.node_name] and uses(c, token) == 1
        assert await registers(c, again)


async def test_a_join_id_whose_node_has_had_a_session_is_a_new_join(tmp_path: Path) -> None:
    """The agent of a node that connected got its reply: the id no longer stands for that node."""
    async with cluster(tmp_path) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, pb.JoinResponse) and await registers(c, first)
        again = await join(c, token, join_id)
        assert isinstance(again, grpc.aio.AioRpcError)
        assert again.code() == grpc.StatusCode.PERMISSION_DENIED and "usage-limit" in (again.details() or "")
        two_uses = c.tokens.add(owner="alice", usage_limit=2)
        first = await join(c, two_uses, join_id)
        assert isinstance(first, pb.JoinResponse) and await registers(c, first)
        second = await join(c, two_uses, join_id)
        assert isinstance(second, pb.JoinResponse)
        assert second.assignment.node_name != first.assignment.node_name and uses(c, two_uses) == 2


def expire(c: Cluster, token: str) -> None:
    token_id = token.split(".")[0]
    expired = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    c.tokens.tokens[token_id] = replace(c.tokens.tokens[token_id], expiration=expired)


async def test_an_expired_token_gets_a_lost_join_reply_again_only_shortly_after_that_join(tmp_path: Path) -> None:
    """The retry of a join whose reply was lost passed over the token's expiry for as long as its
    node never connected: days later the expired token still bought a fresh credential for it."""
    async with cluster(tmp_path) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, pb.JoinResponse)
        # Expired right after the join counted its use: the retry gets what that join made.
        expire(c, token)
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), again
        assert again.assignment.node_name == first.assignment.node_name and await registers(c, again)

        # The same, a day after the join (its node never connected): no node, no credential.
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, pb.JoinResponse)
        day_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        c.registry.objects[first.assignment.node_name]["metadata"]["creationTimestamp"] = day_ago
        expire(c, token)
        late = await join(c, token, join_id)
        assert isinstance(late, grpc.aio.AioRpcError), late
        assert late.code() == grpc.StatusCode.PERMISSION_DENIED and "expired" in (late.details() or "")
        assert len(c.registry.objects) == 2 and uses(c, token) == 1


@pytest.mark.parametrize("case", ["other-token", "wrong-secret", "revoked", "no-join-id"])
async def test_only_the_same_genuine_token_and_join_id_get_the_node_back(tmp_path: Path, case: str) -> None:
    async with cluster(tmp_path) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, pb.JoinResponse)
        token_id = token.split(".")[0]
        if case == "other-token":
            other = c.tokens.add(owner="alice", usage_limit=1)
            result = await join(c, other, join_id)
            assert isinstance(result, pb.JoinResponse)  # a join of its own
            assert result.assignment.node_name != first.assignment.node_name and uses(c, other) == 1
            return
        if case == "wrong-secret":
            result = await join(c, f"{token_id}.{'x' * 16}", join_id)
            reason = "invalid-token"
        elif case == "revoked":
            c.tokens.revoke(token)
            result = await join(c, token, join_id)
            reason = "revoked"
        else:
            result = await join(c, token, "")
            reason = "usage-limit"
        assert isinstance(result, grpc.aio.AioRpcError), result
        assert result.code() == grpc.StatusCode.PERMISSION_DENIED and reason in (result.details() or "")
        assert list(c.registry.objects) == [first.assignment.node_name] and uses(c, token) == 1


async def test_a_malformed_join_id_is_refused_naming_the_field(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        result = await join(c, c.tokens.add(), "not-hex")
        assert isinstance(result, grpc.aio.AioRpcError)
        assert result.code() == grpc.StatusCode.INVALID_ARGUMENT and "join_id" in (result.details() or "")
        assert c.registry.objects == {}


class SlowCreate(InMemoryNodeRegistry):
    async def create(self, name: str, spec: JSON, labels: dict[str, str]) -> str:
        await asyncio.sleep(1.0)
        return await super().create(name, spec, labels)


async def test_a_retry_that_overtakes_its_first_try_is_asked_to_wait(tmp_path: Path) -> None:
    async with cluster(tmp_path, registry=SlowCreate()) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = asyncio.ensure_future(join(c, token, join_id))
        await asyncio.sleep(0.3)
        overtaking = await join(c, token, join_id)
        assert isinstance(overtaking, grpc.aio.AioRpcError) and overtaking.code() == grpc.StatusCode.ABORTED
        assert isinstance(await first, pb.JoinResponse)
        assert len(c.registry.objects) == 1 and uses(c, token) == 1


async def test_the_agent_gets_its_node_back_when_the_join_reply_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway records the node and then fails before replying (as if it crashed): the agent
    retries and joins as that node, with a one-use token. Before join ids the retry was refused
    for the token's usage limit and the agent exited."""
    real = TunnelService._join_response
    calls = 0

    def lost_first_reply(self: TunnelService, node_name: str, address: str, uid: str) -> pb.JoinResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("gateway lost before the reply left")
        return real(self, node_name, address, uid)

    monkeypatch.setattr(TunnelService, "_join_response", lost_first_reply)
    async with cluster(tmp_path) as c:
        token = c.tokens.add(owner="alice", usage_limit=1)
        agent = await c.start_agent("alpha", token=token)
        assert calls == 2 and agent.identity is not None
        assert list(c.registry.objects) == [agent.identity.node_name] and uses(c, token) == 1
        assert JOIN_KEY_LABEL in c.registry.objects[agent.identity.node_name]["metadata"]["labels"]
        assert not (tmp_path / "agent-alpha" / "pending-join.json").exists()  # the next join is a new one


async def test_a_restarted_agent_sends_the_join_id_its_predecessor_sent(tmp_path: Path) -> None:
    """The agent was killed after its join reached the gateway and before it stored the reply."""
    async with cluster(tmp_path) as c:
        token = c.tokens.add(owner="alice", usage_limit=1)
        config = c.agent_config("alpha", token=token)
        join_id = state.pending_join_id(config.state_dir, config.gateway)  # what the first process kept
        lost = await join(c, token, join_id)
        assert isinstance(lost, pb.JoinResponse)
        agent = Agent(config)
        task = asyncio.ensure_future(agent.run())
        try:
            await asyncio.wait_for(agent.connected.wait(), 15)
            assert agent.identity is not None and agent.identity.node_name == lost.assignment.node_name
            assert list(c.registry.objects) == [lost.assignment.node_name] and uses(c, token) == 1
        finally:
            agent.request_drain()
            await asyncio.wait_for(task, 10)


def test_the_pending_join_id_is_kept_privately_per_gateway_until_the_join_is_stored(tmp_path: Path) -> None:
    first = state.pending_join_id(tmp_path, "gw:443")
    assert len(first) == 32 and int(first, 16) >= 0
    assert state.pending_join_id(tmp_path, "gw:443") == first
    assert stat.S_IMODE((tmp_path / "pending-join.json").stat().st_mode) == 0o600
    other = state.pending_join_id(tmp_path, "other:443")  # another gateway: another join
    assert other != first
    state.finish_join(tmp_path)
    assert state.pending_join_id(tmp_path, "other:443") != other
    (tmp_path / "pending-join.json").write_text('{"gateway": "other:443", "join_id": "../../etc"}')
    fresh = state.pending_join_id(tmp_path, "other:443")
    assert len(fresh) == 32 and fresh != "../../etc"


async def test_a_gateway_that_stops_gives_back_the_use_of_a_join_cancelled_mid_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store counted the use and answers late; the gateway stops meanwhile. Its process ends
    right after stop(), so the use must be back by then: the agent's retry goes to the next gateway."""
    real_consume = InMemoryTokenStore.consume

    async def late_answer(self: InMemoryTokenStore, token: str, join_key: str = "") -> JoinGrant:
        grant = await real_consume(self, token, join_key)
        await asyncio.sleep(1.5)
        return grant

    monkeypatch.setattr(InMemoryTokenStore, "consume", late_answer)
    async with cluster(tmp_path) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = asyncio.ensure_future(join(c, token, join_id, timeout=10))
        await asyncio.sleep(0.5)
        assert uses(c, token) == 1
        listen = c.gateway.agent_target
        await c.gateway.stop(0.1)
        assert uses(c, token) == 0
        assert isinstance(await first, grpc.aio.AioRpcError)
        monkeypatch.setattr(InMemoryTokenStore, "consume", real_consume)
        c.gateway = Gateway(replace(c.gateway.config, listen=listen), c.tokens, c.registry, c.gateway.ca_store)
        await c.gateway.start()
        assert isinstance(await join(c, token, join_id), pb.JoinResponse)


class LateCreate(InMemoryNodeRegistry):
    """The API applies the first create and answers it late."""

    def __init__(self) -> None:
        super().__init__()
        self.late = True

    async def create(self, name: str, spec: JSON, labels: dict[str, str]) -> str:
        uid = await super().create(name, spec, labels)
        if self.late:
            self.late = False
            await asyncio.sleep(2.0)
        return uid


async def test_a_join_given_up_while_its_node_is_being_created_leaves_no_node(tmp_path: Path) -> None:
    async with cluster(tmp_path, registry=LateCreate()) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        gave_up = await join(c, token, join_id, timeout=0.5)
        assert isinstance(gave_up, grpc.aio.AioRpcError) and gave_up.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):
            if not c.registry.objects and uses(c, token) == 0:
                break
            await asyncio.sleep(0.05)
        assert c.registry.objects == {} and uses(c, token) == 0
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse) and list(c.registry.objects) == [again.assignment.node_name]


async def leave_half_made(c: Cluster, token: str, join_id: str, age_s: float) -> str:
    """What a gateway that died between creating a join's node and writing its address leaves: the
    use counted for that join, and a node with the join's labels and no address, ``age_s`` old."""
    grant = await c.tokens.consume(token, join_key(join_id))
    labels = {JOIN_TOKEN_LABEL: grant.token_id, JOIN_KEY_LABEL: join_key(join_id)}
    await c.registry.create("vol-dead01", {"owner": grant.owner}, labels)
    made = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
    c.registry.objects["vol-dead01"]["metadata"]["creationTimestamp"] = rfc3339(made)
    return "vol-dead01"


def later(c: Cluster, seconds: float) -> None:
    """As if ``seconds`` had passed on the gateway's own monotonic clock."""
    assert c.gateway.service is not None
    c.gateway.service.half_made.clock = lambda: time.monotonic() + seconds


async def test_a_join_whose_gateway_died_before_writing_its_address_is_retried_on_its_counted_use(
    tmp_path: Path,
) -> None:
    """The retry found the join's node without an address, could not hand it out, and counted a
    new use: a one-use token refused its own join's retry ("usage-limit", fatal to the agent)."""
    async with cluster(tmp_path) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        half_made = await leave_half_made(c, token, join_id, age_s=HALF_MADE_JOIN_S + 60)
        # The token alone, without the agent's secret join id, reaches no node of that join.
        other = await join(c, token, secrets.token_hex(16))
        assert isinstance(other, grpc.aio.AioRpcError) and "usage-limit" in (other.details() or "")
        assert list(c.registry.objects) == [half_made]
        # Old by its creationTimestamp, but this gateway sees it without an address for the first
        # time: it may be a live replica's try whose API server's clock runs behind; come back.
        first_sight = await join(c, token, join_id)
        assert isinstance(first_sight, grpc.aio.AioRpcError) and first_sight.code() == grpc.StatusCode.ABORTED
        later(c, HALF_MADE_JOIN_S)  # the agent's retries went on for 2 minutes
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), again
        assert list(c.registry.objects) == [again.assignment.node_name] != [half_made]
        assert uses(c, token) == 1 and await registers(c, again)


@pytest.mark.parametrize("age", ["young", "past-the-counted-use"])
async def test_a_node_without_an_address_is_left_while_young_or_once_its_use_is_no_longer_honoured(
    tmp_path: Path, age: str
) -> None:
    async with cluster(tmp_path) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        age_s = 5 if age == "young" else COUNTED_JOIN_RETRY_S + 60
        half_made = await leave_half_made(c, token, join_id, age_s)
        result = await join(c, token, join_id)
        assert isinstance(result, grpc.aio.AioRpcError), result
        if age == "young":
            # Maybe another gateway replica's try, still writing the address or undoing the node.
            assert result.code() == grpc.StatusCode.ABORTED  # the agent retries
        else:  # a new join, as before: the node is the unconnected-node cleanup's
            assert result.code() == grpc.StatusCode.PERMISSION_DENIED and "usage-limit" in (result.details() or "")
        assert list(c.registry.objects) == [half_made] and uses(c, token) == 1


class DeleteRefused(InMemoryNodeRegistry):
    """The node changed between the list and the delete (preconditions not met)."""

    async def delete(self, name: str, preconditions: object = None) -> bool:
        return False


async def test_a_node_without_an_address_that_changed_since_it_was_read_is_left(tmp_path: Path) -> None:
    async with cluster(tmp_path, registry=DeleteRefused()) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        half_made = await leave_half_made(c, token, join_id, age_s=HALF_MADE_JOIN_S + 60)
        later(c, HALF_MADE_JOIN_S)
        for _ in range(2):  # first seen, then seen for 2 minutes: the delete is refused both times
            result = await join(c, token, join_id)
            assert isinstance(result, grpc.aio.AioRpcError) and result.code() == grpc.StatusCode.ABORTED
        assert list(c.registry.objects) == [half_made] and uses(c, token) == 1


class SlowUndo(InMemoryNodeRegistry):
    """One gateway replica's view of the API: its status write never answers within the agent's
    deadline, and the delete that undoes its node answers only once ``go`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def patch_status(self, name: str, status: JSON, uid: str = "") -> None:
        await asyncio.Event().wait()

    async def delete(self, name: str, preconditions: Mapping[str, str] | None = None) -> bool:
        await self.go.wait()
        return await super().delete(name, preconditions)


async def test_a_replica_whose_clock_runs_minutes_ahead_leaves_a_live_replicas_node_and_the_one_use_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's repro: the half-made node's age was this gateway's clock minus creationTimestamp
    (the API server's). A replica whose host clock ran 3 minutes ahead took another replica's live,
    1 s old node for a dead gateway's, deleted it and joined on its counted use; that replica's undo
    then gave the use back, and a one-use token made a second node."""
    slow = SlowUndo()
    async with cluster(tmp_path, registry=slow) as c:  # replica A
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        gave_up = await join(c, token, join_id, timeout=1.0)
        assert isinstance(gave_up, grpc.aio.AioRpcError) and gave_up.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        [(name, node)] = list(slow.objects.items())  # A is undoing its try; its delete is slow
        assert "address" not in node["status"] and uses(c, token) == 1

        class Ahead(dt.datetime):  # replica B's host clock: 3 minutes ahead of the API server's
            @classmethod
            def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
                return dt.datetime.now(tz) + dt.timedelta(minutes=3)

        skewed = types.SimpleNamespace(datetime=Ahead, UTC=dt.UTC, timedelta=dt.timedelta)
        monkeypatch.setattr(service_module, "dt", skewed)  # the gateway's module only, not the registry's
        b = Gateway(
            replace(c.gateway.config, listen="127.0.0.1:0", port_base=random_port_base()),
            tokens=c.tokens,
            registry=InMemoryNodeRegistry(objects=slow.objects),
        )
        await b.start()
        try:
            async with gateway_channel(b) as channel:
                stub = tunnel_stub(channel)
                request = pb.JoinRequest(token=token, name_hint="vol", join_id=join_id)
                with pytest.raises(grpc.aio.AioRpcError) as aborted:  # the agent's retry lands on B
                    await stub.Join(request, timeout=5)
                assert aborted.value.code() == grpc.StatusCode.ABORTED
                assert list(slow.objects) == [name] and uses(c, token) == 1
                slow.go.set()  # A's undo goes on: it deletes its node and gives its use back
                for _ in range(100):
                    if not slow.objects and uses(c, token) == 0:
                        break
                    await asyncio.sleep(0.02)
                assert not slow.objects and uses(c, token) == 0
                retry = await stub.Join(request, timeout=5)  # the agent's next retry: a join anew
                assert [n["metadata"]["name"] for n in slow.objects.values()] == [retry.assignment.node_name]
                assert uses(c, token) == 1
                with pytest.raises(grpc.aio.AioRpcError) as refused:  # the one use is spent
                    await stub.Join(pb.JoinRequest(token=token, name_hint="vol", join_id=secrets.token_hex(16)))
                assert "usage-limit" in (refused.value.details() or "")
        finally:
            await b.stop(0)


def test_half_made_sightings_are_bounded_and_forgotten_once_the_counted_use_expires() -> None:
    """Anyone with a token can leave half-made nodes: the gateway's memory of them stays bounded."""
    now = 1000.0
    sightings = HalfMadeSightings(limit=3, clock=lambda: now)
    assert [sightings.seen_for(uid) for uid in ("a", "b", "c")] == [0.0, 0.0, 0.0]
    now += 60
    assert sightings.seen_for("a") == 60.0
    assert sightings.seen_for("d") == 0.0 and len(sightings) == 3  # full: the oldest ("a") goes
    assert sightings.seen_for("a") == 0.0  # seen anew: it waits longer, never less
    now += COUNTED_JOIN_RETRY_S  # its use no longer honoured: every sighting is dropped
    assert sightings.seen_for("e") == 0.0 and len(sightings) == 1


class CountingRegistry(InMemoryNodeRegistry):
    """Counts lists: with the Kubernetes registry each is a request to the API server."""

    def __init__(self) -> None:
        super().__init__()
        self.lists = 0

    async def list(self, labels: dict[str, str] | None = None) -> list[JSON]:
        self.lists += 1
        return await super().list(labels)


async def test_a_join_without_a_genuine_token_costs_no_volunteernode_list(tmp_path: Path) -> None:
    # The agent port is open to anyone: a Join with a made-up token (a known id, which logs show,
    # or none at all) and a join id made the gateway list VolunteerNodes before the token was
    # checked, so unauthenticated callers could load the API server at will.
    registry = CountingRegistry()
    async with cluster(tmp_path, registry=registry) as c, channel_for(c) as channel:
        stub = tunnel_stub(channel)
        at_start = registry.lists  # the gateway's own start (its address book)
        known_id = c.tokens.add(owner="alice").split(".")[0]
        for token in (f"{known_id}.aaaaaaaaaaaaaaaa", "zzzzzz.aaaaaaaaaaaaaaaa"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Join(pb.JoinRequest(token=token, name_hint="x", join_id=secrets.token_hex(16)))
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert registry.lists == at_start
        # A genuine token with a join id still looks for an earlier try of the same join.
        joined = await stub.Join(pb.JoinRequest(token=c.tokens.add(), name_hint="y", join_id=secrets.token_hex(16)))
        assert joined.assignment.node_name and registry.lists == at_start + 1


async def test_joins_are_worked_on_a_few_at_a_time_and_a_full_queue_is_refused_as_busy(tmp_path: Path) -> None:
    # Anyone can call Join and each costs token-store and registry requests (the Kubernetes API):
    # a flood must not turn into as many concurrent API requests.
    async with cluster(tmp_path) as c, channel_for(c) as channel:
        service = c.gateway.service
        assert service is not None
        service.joins_at_once, service.max_joins_waiting = asyncio.Semaphore(2), 1
        inside, most_inside, release = 0, 0, asyncio.Event()
        consume = c.tokens.consume

        async def slow_consume(token: str, join_key: str = "") -> JoinGrant:
            nonlocal inside, most_inside
            inside += 1
            most_inside = max(most_inside, inside)
            try:
                await release.wait()
                return await consume(token, join_key)
            finally:
                inside -= 1

        c.tokens.consume = slow_consume  # type: ignore[method-assign]
        stub = tunnel_stub(channel)
        joins = [
            asyncio.ensure_future(stub.Join(pb.JoinRequest(token=c.tokens.add(), name_hint=f"n{i}"))) for i in range(3)
        ]
        for _ in range(500):
            if inside >= 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the third waits its turn
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await stub.Join(pb.JoinRequest(token=c.tokens.add(), name_hint="n4"), timeout=5)
        release.set()  # before any assertion: a failed one must not leave the three joins waiting
        assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.gateway.metrics.joins["busy"] == 1
        joined = await asyncio.gather(*joins)
        assert len({j.assignment.node_name for j in joined}) == 3 and most_inside == 2


async def test_a_retry_first_seen_near_the_end_of_the_counted_window_still_joins(tmp_path: Path) -> None:
    """The agent's retries first reach a gateway 14 minutes after its dead gateway made the node:
    told to come back for 2 minutes, by then the node was older than COUNTED_JOIN_RETRY_S, and the
    retry was taken for a new join that a one-use token refused (fatal to the agent)."""
    async with cluster(tmp_path) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        age = COUNTED_JOIN_RETRY_S - 60
        half_made = await leave_half_made(c, token, join_id, age_s=age)

        def age_everything(seconds: float) -> None:
            made = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
            c.registry.objects[half_made]["metadata"]["creationTimestamp"] = rfc3339(made)
            c.tokens.counted_joins[token.split(".")[0]][join_key(join_id)] = made.timestamp()

        age_everything(age)
        first = await join(c, token, join_id)
        assert isinstance(first, grpc.aio.AioRpcError) and first.code() == grpc.StatusCode.ABORTED
        later(c, HALF_MADE_JOIN_S)  # the agent's retries went on for 2 minutes
        age_everything(age + HALF_MADE_JOIN_S)
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), f"{again.code()}: {again.details()}"
        assert c.tokens.tokens[token.split(".")[0]].usages_count == 1


async def test_a_spent_one_use_token_makes_no_second_node_by_resending_the_join_id_of_a_deleted_node(
    tmp_path: Path,
) -> None:
    """An admin cuts a volunteer off by deleting its node (`kubectl delete vn -l
    koinon.dev/join-token=<id>`); the volunteer resends its first join's id with the spent one-use
    token. The gateway found no node of that join and the store still honoured the use it had
    counted for the id (17 minutes): a second node without a use. Now that use is forgotten once
    the node is made, and the resent id is a new join, refused "usage-limit"."""
    async with cluster(tmp_path) as c:
        token, join_id = c.tokens.add(owner="mallory", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, pb.JoinResponse)
        assert await registers(c, first)
        assert uses(c, token) == 1 and c.tokens.counted_joins[token.split(".")[0]] == {}
        assert await c.registry.delete(first.assignment.node_name)
        again = await join(c, token, join_id)
        assert isinstance(again, grpc.aio.AioRpcError), f"a second node: {again.assignment.node_name}"
        assert again.code() == grpc.StatusCode.PERMISSION_DENIED and "usage-limit" in (again.details() or "")
        assert c.registry.objects == {} and uses(c, token) == 1


async def test_a_join_whose_made_node_the_store_could_not_record_is_answered_retry_and_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if the gateway died between recording the node and forgetting the join's counted use:
    no reply goes out, the node stays, and the retry gets it back (replayed), forgetting the use
    then, before its reply; so the node deleted afterwards leaves the one-use token spent."""
    async with cluster(tmp_path) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        token_id = token.split(".")[0]
        real_node_made, failures = InMemoryTokenStore.node_made, [OSError("the store is unreachable")]

        async def node_made_failing_once(grant: JoinGrant) -> None:
            if failures:
                raise failures.pop()
            await real_node_made(c.tokens, grant)

        monkeypatch.setattr(c.tokens, "node_made", node_made_failing_once)
        lost = await join(c, token, join_id)
        assert isinstance(lost, grpc.aio.AioRpcError) and lost.code() == grpc.StatusCode.UNAVAILABLE
        [made] = c.registry.objects
        assert list(c.tokens.counted_joins[token_id]) == [join_key(join_id)]  # still honoured
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), again
        assert again.assignment.node_name == made and c.gateway.metrics.joins["replayed"] == 1
        assert c.tokens.counted_joins[token_id] == {} and uses(c, token) == 1
        assert await c.registry.delete(made)
        spent = await join(c, token, join_id)
        assert isinstance(spent, grpc.aio.AioRpcError) and "usage-limit" in (spent.details() or "")
        assert c.registry.objects == {}


class UndoFails(InMemoryNodeRegistry):
    """An API server that restarts during a join: the join's first status write fails (applied
    unanswered, a connection reset, when ``lands``; else not applied, ``error`` if given: an answer
    that says so), and so does the undo's delete."""

    def __init__(self, lands: bool, error: Exception | None = None) -> None:
        super().__init__()
        self.lands, self.error = lands, error
        self.fail_status, self.fail_delete = True, True

    async def patch_status(self, name: str, status: JSON, uid: str = "") -> None:
        if self.fail_status:
            self.fail_status = False
            if self.lands:
                await super().patch_status(name, status, uid)
            raise self.error or ConnectionResetError("connection reset by peer")
        await super().patch_status(name, status, uid)

    async def delete(self, name: str, preconditions: Mapping[str, str] | None = None) -> bool:
        if self.fail_delete:
            self.fail_delete = False
            raise ConnectionRefusedError("connection refused")
        return await super().delete(name, preconditions)


def holders(c: Cluster, address: str) -> list[str]:
    """The VolunteerNodes that record ``address``."""
    return sorted(name for name, node in c.registry.objects.items() if node["status"].get("address") == address)


async def test_a_join_whose_undo_fails_keeps_the_address_for_its_node_and_the_retry_gets_that_node(
    tmp_path: Path,
) -> None:
    """The undo released the address of a node it could not delete, which still recorded it: the
    retry skipped that node (no longer the address's holder) and got the address again for a new
    one. Two VolunteerNodes recorded it, and after a restart the live one was refused
    (address-taken, fatal to the agent) for the 24 h until the other was swept."""
    async with cluster(tmp_path, registry=UndoFails(lands=True)) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, grpc.aio.AioRpcError) and first.code() == grpc.StatusCode.UNAVAILABLE
        [left] = c.registry.objects
        address = c.registry.objects[left]["status"]["address"]
        assert c.gateway.allocator.holder(address) == left and uses(c, token) == 1  # kept for that node
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), again
        assert (again.assignment.node_name, again.assignment.address) == (left, address)
        assert c.gateway.metrics.joins["replayed"] == 1 and uses(c, token) == 1
        assert holders(c, address) == [left] and await registers(c, again)
        listen = c.gateway.agent_target
        await c.gateway.stop(0)
        c.gateway = Gateway(replace(c.gateway.config, listen=listen), c.tokens, c.registry, c.gateway.ca_store)
        await c.gateway.start()
        assert await registers(c, again)


async def test_a_join_without_an_id_whose_undo_fails_gives_its_use_back_and_the_retry_another_address(
    tmp_path: Path,
) -> None:
    """Nothing can adopt the node left behind (no join id finds it): the use goes back, and the
    address stays that node's until it is swept, not handed out a second time."""
    async with cluster(tmp_path, registry=UndoFails(lands=True)) as c:
        token = c.tokens.add(owner="alice", usage_limit=1)
        first = await join(c, token, "")
        assert isinstance(first, grpc.aio.AioRpcError) and first.code() == grpc.StatusCode.UNAVAILABLE
        [left] = c.registry.objects
        address = c.registry.objects[left]["status"]["address"]
        assert uses(c, token) == 0
        again = await join(c, token, "")
        assert isinstance(again, pb.JoinResponse), again
        assert again.assignment.address != address and holders(c, address) == [left]
        assert uses(c, token) == 1 and await registers(c, again)


def age(c: Cluster, node: str, token: str, join_id: str, seconds: float) -> None:
    """As if the join that made ``node`` (and counted its use) had been ``seconds`` ago: the
    volunteer's laptop slept, or its agent was started again much later."""
    made = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    c.registry.objects[node]["metadata"]["creationTimestamp"] = rfc3339(made)
    counted = c.tokens.counted_joins.get(token.split(".")[0], {})
    if join_key(join_id) in counted:
        counted[join_key(join_id)] -= seconds


async def test_a_node_the_undo_left_without_its_address_is_deleted_at_once_by_the_retry_on_its_kept_use(
    tmp_path: Path,
) -> None:
    """The status write did not land after all: the node left behind records no address. Its try
    is known to be over (this gateway kept an address for it), so the retry deletes it at once (no
    wait for a live try) and makes its node on the use kept; the address kept goes back too."""
    async with cluster(tmp_path, registry=UndoFails(lands=False)) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, grpc.aio.AioRpcError) and first.code() == grpc.StatusCode.UNAVAILABLE
        [left] = c.registry.objects
        kept = "127.0.20.1"
        assert c.gateway.allocator.holder(kept) == left and holders(c, kept) == [] and uses(c, token) == 1
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), again
        assert list(c.registry.objects) == [again.assignment.node_name] != [left]
        assert again.assignment.address == kept  # the pool's first address, free again
        assert c.gateway.allocator.held_by(left) is None
        assert uses(c, token) == 1 and await registers(c, again)


async def test_a_late_retry_of_a_join_whose_kept_node_never_got_its_address_joins_on_the_kept_use(
    tmp_path: Path,
) -> None:
    """The use was kept counted "for the retry to adopt the node", but a node without an address is
    never adopted: a retry that came once the node was older than COUNTED_JOIN_RETRY_S (and the
    store no longer honoured the counted join) counted a new use, and the one-use token refused its
    own honest retry (usage-limit, fatal to the agent)."""
    async with cluster(tmp_path, registry=UndoFails(lands=False)) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, grpc.aio.AioRpcError) and first.code() == grpc.StatusCode.UNAVAILABLE
        [left] = c.registry.objects
        assert "address" not in c.registry.objects[left]["status"] and uses(c, token) == 1
        age(c, left, token, join_id, COUNTED_JOIN_HONOURED_S + 60)
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), again
        assert list(c.registry.objects) == [again.assignment.node_name] != [left]
        assert uses(c, token) == 1 and await registers(c, again)
        assert c.tokens.counted_joins[token.split(".")[0]] == {}  # the node is made: the id is spent


async def test_an_expired_token_makes_no_node_on_the_use_a_failed_undo_kept(tmp_path: Path) -> None:
    """The kept use stands for the retry's node as a counted use does in the store: not past expiry."""
    async with cluster(tmp_path, registry=UndoFails(lands=False)) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, grpc.aio.AioRpcError) and first.code() == grpc.StatusCode.UNAVAILABLE
        expire(c, token)
        again = await join(c, token, join_id)
        assert isinstance(again, grpc.aio.AioRpcError) and again.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "expired" in (again.details() or "") and c.registry.objects == {}


@pytest.mark.parametrize(
    "error",
    [KubeApiError(403, "Forbidden", "no"), KubeApiError(429, "TooManyRequests", "later"), KeyError("gone")],
    ids=["forbidden", "throttled", "gone"],
)
async def test_a_join_whose_address_write_was_refused_gives_back_address_and_use_though_its_undo_failed(
    tmp_path: Path, error: Exception
) -> None:
    """A refused write (a 4xx: not applied) left the node without its address, so no retry could
    adopt it; yet the use was kept counted for it, and a retry once the node was too old to be
    taken for this join's (a restart, a long sleep) counted a new one: a one-use token refused its
    own join (usage-limit, fatal to the agent)."""
    async with cluster(tmp_path, registry=UndoFails(lands=False, error=error)) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, grpc.aio.AioRpcError) and first.code() == grpc.StatusCode.UNAVAILABLE
        [left] = c.registry.objects
        assert c.gateway.allocator.held_by(left) is None and uses(c, token) == 0
        age(c, left, token, join_id, COUNTED_JOIN_RETRY_S + 60)
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), again
        assert again.assignment.address == "127.0.20.1"  # the pool's first address: never kept
        assert uses(c, token) == 1 and await registers(c, again)


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        (KubeApiError(403, "Forbidden", ""), True),
        (KubeApiError(422, "Invalid", ""), True),
        (KeyError("gone"), True),
        (KubeApiError(500, "InternalError", ""), False),  # may have been applied first
        (KubeApiError(504, "Timeout", ""), False),
        (KubeApiError(400, "BadResponse", "garbled reply"), False),  # could not be read
        (ConnectionResetError(), False),
        (TimeoutError(), False),
        (asyncio.CancelledError(), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),  # the file store: applied in memory
    ],
)
def test_only_a_write_the_store_refused_is_known_not_to_have_landed(error: BaseException, refused: bool) -> None:
    assert write_refused(error) is refused


class DiskFullDuringJoin(FileNodeRegistry):
    """The file store's disk fills up just after a join created its node: the status write and the
    undo's delete each apply in memory and then fail to save (ENOSPC). Space comes back after."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.full_for, self.fills = 0, True

    async def create(self, name: str, spec: JSON, labels: dict[str, str]) -> str:
        uid = await super().create(name, spec, labels)
        if self.fills:
            self.fills, self.full_for = False, 2  # the next two saves (status write, delete) fail
        return uid

    def _save(self) -> None:
        if self.full_for:
            self.full_for -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._save()


async def test_a_node_the_file_store_dropped_though_its_delete_failed_keeps_no_address(tmp_path: Path) -> None:
    """The undo's delete removed the node (in memory; only the save failed), but as it raised, the
    join kept the address "for that node": no such node exists to sweep, the file store reports no
    deletions, and the retry finds no node of its join. The address was held by nobody until the
    gateway restarted."""
    registry = DiskFullDuringJoin(tmp_path / "nodes.json")
    async with cluster(tmp_path, registry=registry) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, grpc.aio.AioRpcError) and first.code() == grpc.StatusCode.UNAVAILABLE
        assert registry.objects == {} and uses(c, token) == 0  # gone: nothing kept for it
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), again
        assert again.assignment.address == "127.0.20.1"  # the pool's first address, not held for a ghost
        held = {a: c.gateway.allocator.holder(a) for a in (f"127.0.20.{i}" for i in range(1, 15))}
        assert {a: h for a, h in held.items() if h is not None} == {"127.0.20.1": again.assignment.node_name}
        assert uses(c, token) == 1 and await registers(c, again)


class UndoDeleteLandsUnanswered(InMemoryNodeRegistry):
    """An API server restarting during a join: the status write fails unanswered (not applied),
    the undo's delete is applied but its answer is lost (a connection reset), and the get that
    checks whether the node is gone fails too (the server is still down)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_status = self.fail_delete = self.fail_get = True

    async def patch_status(self, name: str, status: JSON, uid: str = "") -> None:
        if self.fail_status:
            self.fail_status = False
            raise ConnectionResetError("connection reset by peer")
        await super().patch_status(name, status, uid)

    async def delete(self, name: str, preconditions: Mapping[str, str] | None = None) -> bool:
        deleted = await super().delete(name, preconditions)
        if self.fail_delete:
            self.fail_delete = False
            raise ConnectionResetError("connection reset by peer")  # applied, answer lost
        return deleted

    async def get(self, name: str) -> JSON | None:
        if self.fail_get:
            self.fail_get = False
            raise ConnectionRefusedError("connection refused")
        return await super().get(name)


def kept_uses(c: Cluster) -> int:
    assert c.gateway.service is not None
    return len(c.gateway.service.kept_uses)


async def test_a_late_retry_of_a_join_whose_undo_deleted_its_node_unanswered_joins_on_the_kept_use(
    tmp_path: Path,
) -> None:
    """Nothing could tell the undo's delete had landed: the use was kept "for the node left
    behind", but there was none, so no retry could ever find it to join on that use. A retry once
    the store no longer honoured the counted join (a laptop that slept) counted a second use: the
    one-use token refused its own honest join (usage-limit, fatal to the agent)."""
    async with cluster(tmp_path, registry=UndoDeleteLandsUnanswered()) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, grpc.aio.AioRpcError) and first.code() == grpc.StatusCode.UNAVAILABLE
        assert c.registry.objects == {} and uses(c, token) == 1 and kept_uses(c) == 1
        counted = c.tokens.counted_joins[token.split(".")[0]]
        for key in counted:  # the store's honour of the counted join has run out
            counted[key] -= COUNTED_JOIN_HONOURED_S + 60
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), again
        assert uses(c, token) == 1 and await registers(c, again) and kept_uses(c) == 0
        # The address kept for the node that was gone already goes back: the first of the pool.
        assert again.assignment.address == "127.0.20.1"
        assert c.tokens.counted_joins[token.split(".")[0]] == {}  # the node is made: the id is spent


class UndoHeldByFinalizer(InMemoryNodeRegistry):
    """The status write lands unanswered; the undo's delete is accepted (the object gets its
    deletionTimestamp, another controller's finalizer holds it) but its answer is lost; the get
    that checks whether the node is gone fails too when ``get_fails``."""

    def __init__(self, get_fails: bool = False) -> None:
        super().__init__()
        self.fail_status = self.fail_delete = True
        self.fail_get = get_fails

    async def patch_status(self, name: str, status: JSON, uid: str = "") -> None:
        await super().patch_status(name, status, uid)
        if self.fail_status:
            self.fail_status = False
            raise ConnectionResetError("connection reset by peer")  # applied, answer lost

    async def delete(self, name: str, preconditions: Mapping[str, str] | None = None) -> bool:
        obj = self.objects.get(name)
        if obj is None:
            return False
        obj["metadata"]["deletionTimestamp"] = rfc3339(dt.datetime.now(dt.UTC))
        obj["metadata"]["finalizers"] = ["example.com/audit"]
        if self.fail_delete:
            self.fail_delete = False
            raise ConnectionResetError("connection reset by peer")  # applied, answer lost
        return True

    async def get(self, name: str) -> JSON | None:
        if self.fail_get:
            self.fail_get = False
            raise ConnectionRefusedError("connection refused")
        return await super().get(name)


async def test_a_join_whose_undo_a_finalizer_holds_gives_its_use_back_and_the_retry_joins_at_once(
    tmp_path: Path,
) -> None:
    """A node being deleted was taken for one that remains: the use was kept "for the retry to adopt
    the node", but a node being deleted is never adopted, so the retry counted a new use and a
    one-use token refused its own join at once (usage-limit)."""
    async with cluster(tmp_path, registry=UndoHeldByFinalizer()) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, grpc.aio.AioRpcError) and first.code() == grpc.StatusCode.UNAVAILABLE
        [left] = c.registry.objects
        assert c.registry.objects[left]["metadata"].get("deletionTimestamp")
        # Undone as far as this gateway goes: its address and use go back, as a deletion would.
        assert c.gateway.allocator.held_by(left) is None and uses(c, token) == 0 and kept_uses(c) == 0
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), again
        assert again.assignment.node_name != left and uses(c, token) == 1 and await registers(c, again)


async def test_a_retry_joins_on_the_kept_use_when_the_node_it_was_kept_for_is_being_deleted(tmp_path: Path) -> None:
    """The undo could not tell its delete had landed (the get failed too): the use is kept, and the
    retry, finding the node only being deleted (never to be adopted), makes its node on it."""
    async with cluster(tmp_path, registry=UndoHeldByFinalizer(get_fails=True)) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, grpc.aio.AioRpcError) and first.code() == grpc.StatusCode.UNAVAILABLE
        [left] = c.registry.objects
        assert c.gateway.allocator.held_by(left) is not None and uses(c, token) == 1 and kept_uses(c) == 1
        age(c, left, token, join_id, COUNTED_JOIN_HONOURED_S + 60)
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse), again
        assert again.assignment.node_name != left and uses(c, token) == 1 and await registers(c, again)
        # Being deleted, it gave its address back (as the deletion watch frees a terminating node's).
        assert c.gateway.allocator.held_by(left) is None and kept_uses(c) == 0


async def test_a_kept_use_is_dropped_once_its_node_is_adopted_or_the_join_has_connected(tmp_path: Path) -> None:
    """A kept use stands only for a join no node of which can be adopted and none connected: the
    node adopted, or one that connected (another replica adopted it, say), spends the join's id."""
    async with cluster(tmp_path, registry=UndoFails(lands=True)) as c:
        token, join_id = c.tokens.add(owner="alice", usage_limit=1), secrets.token_hex(16)
        first = await join(c, token, join_id)
        assert isinstance(first, grpc.aio.AioRpcError) and kept_uses(c) == 1
        again = await join(c, token, join_id)
        assert isinstance(again, pb.JoinResponse) and c.gateway.metrics.joins["replayed"] == 1
        assert kept_uses(c) == 0 and await registers(c, again)
        assert c.gateway.service is not None
        grant = JoinGrant(token.split(".")[0], "alice", "", join_key(join_id))
        c.gateway.service.kept_uses.keep(grant.token_id, join_key(join_id), KeptUse(grant, "vol-ghost", "no-such-uid"))
        spent = await join(c, token, join_id)
        assert isinstance(spent, grpc.aio.AioRpcError) and "usage-limit" in (spent.details() or "")
        assert kept_uses(c) == 0 and list(c.registry.objects) == [again.assignment.node_name]


def test_kept_uses_are_bounded_and_forgotten_after_the_unconnected_node_ttl() -> None:
    """Each kept use is a failed join's: the gateway's memory of them stays bounded, and one goes
    when the node it was kept for would be swept as never connected."""
    now = 1000.0
    kept = KeptUses(ttl_s=3600.0, limit=2, clock=lambda: now)
    use = KeptUse(JoinGrant("tok", "alice", ""), "vol-1", "uid-1")
    kept.keep("tok", "a", use)
    kept.keep("tok", "b", use)
    now += 60
    kept.keep("tok", "c", use)  # full: the oldest ("a") goes
    assert kept.get("tok", "a") is None and kept.get("tok", "b") == use and len(kept) == 2
    kept.drop("tok", "b")
    assert kept.get("tok", "b") is None and len(kept) == 1
    now += 3600
    assert kept.get("tok", "c") is None and len(kept) == 0
