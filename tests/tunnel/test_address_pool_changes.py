"""The gateway's address pool against nodes that rejoin or outlive a pool change: a rejoin never frees
the address of a node whose credential could still register (two live nodes shared one address),
a gateway restarted with a narrower --vip-cidr starts (it crash-looped), and a node left outside the
new pool is refused with PERMISSION_DENIED, which makes its agent join again (it got UNKNOWN and
retried for ever). Also: a file-store restart keeps addresses, token counts and credentials, and of
two nodes recording one address the one that connected keeps it across a restart."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from koinon_gateway.file_tokens import FileTokenStore
from koinon_gateway.pki import FileCAStore
from koinon_gateway.registry import JOIN_TOKEN_LABEL, FileNodeRegistry, InMemoryNodeRegistry
from koinon_gateway.rpc import tunnel_stub
from koinon_gateway.server import Gateway
from koinon_gateway.status import never_connected_status
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import Cluster, channel_for, cluster, control_call


async def _restart_with_cidr(c: Cluster, cidr: str) -> None:
    listen = c.gateway.agent_target
    await c.gateway.stop(0)
    c.gateway = Gateway(
        replace(c.gateway.config, listen=listen, vip_cidr=cidr), c.tokens, c.registry, c.gateway.ca_store
    )
    await c.gateway.start()


async def _join_n(c: Cluster, n: int) -> list[pb.JoinResponse]:
    async with channel_for(c) as channel:
        stub = tunnel_stub(channel)
        return [await stub.Join(pb.JoinRequest(token=c.tokens.add(owner="a"), name_hint=f"n{i}")) for i in range(n)]


async def test_a_gateway_restarted_with_a_narrower_vip_cidr_still_starts(tmp_path: Path) -> None:
    """vip_cidr narrowed from /28 to /30: a recorded node at the new network's broadcast address is
    skipped at start (Gateway.start() raised ValueError)."""
    async with cluster(tmp_path, vip_cidr="127.0.20.0/28") as c:
        joined = await _join_n(c, 3)
        assert joined[-1].assignment.address == "127.0.20.3"  # broadcast address of 127.0.20.0/30
        await _restart_with_cidr(c, "127.0.20.0/30")
        assert c.gateway.allocator.holder("127.0.20.3") is None


async def test_a_node_left_outside_a_changed_vip_cidr_is_refused_not_crashed(tmp_path: Path) -> None:
    """A node whose address lies outside a new vip_cidr still holds a valid credential: its Register
    is refused with UNAUTHENTICATED, on which the agent joins again with its token (it ended in
    UNKNOWN from an uncaught ValueError, which the agent retried for ever)."""
    async with cluster(tmp_path, vip_cidr="127.0.20.0/28") as c:
        joined = await _join_n(c, 5)
        last = joined[-1]
        assert last.assignment.address == "127.0.20.5"
        await _restart_with_cidr(c, "127.0.20.8/29")  # .5 is outside, not an edge of the new pool
        register = pb.Register(node_name=last.assignment.node_name, address=last.assignment.address)
        result = await control_call(c, last.credential, register)
        assert isinstance(result, grpc.aio.AioRpcError), result
        assert result.code() == grpc.StatusCode.UNAUTHENTICATED, (result.code(), result.details())
        assert "address-outside-pool" in (result.details() or "")


async def test_file_store_restart_keeps_addresses_tokens_and_credentials(tmp_path: Path) -> None:
    """--store file: after a restart no address is handed out twice, token counts and the
    credential key survive."""
    state = tmp_path / "state"
    state.mkdir()
    token = "abcdef.0123456789abcdef"

    def stores() -> tuple[FileTokenStore, FileNodeRegistry, FileCAStore]:
        tokens = FileTokenStore(path=state / "join-token-usage.json")
        tokens.add_plain(token, usage_limit=3, owner="bootstrap")
        return tokens, FileNodeRegistry(state / "volunteernodes.json"), FileCAStore(state / "ca")

    async with cluster(tmp_path) as c:
        config = c.gateway.config
        await c.gateway.stop(0)
        tokens, registry, ca = stores()
        c.gateway = Gateway(replace(config, listen="127.0.0.1:0"), tokens, registry, ca)
        await c.gateway.start()
        async with channel_for(c) as channel:
            first = await tunnel_stub(channel).Join(pb.JoinRequest(token=token, name_hint="a"))
            second = await tunnel_stub(channel).Join(pb.JoinRequest(token=token, name_hint="b"))
        await c.gateway.stop(0)
        tokens, registry, ca = stores()
        c.gateway = Gateway(replace(config, listen="127.0.0.1:0"), tokens, registry, ca)
        await c.gateway.start()
        async with channel_for(c) as channel:
            third = await tunnel_stub(channel).Join(pb.JoinRequest(token=token, name_hint="c"))
            try:
                await tunnel_stub(channel).Join(pb.JoinRequest(token=token, name_hint="d"))
                raise AssertionError("a limit-3 token joined a 4th time after a restart")
            except grpc.aio.AioRpcError as exc:
                assert "usage-limit" in (exc.details() or "")
        addresses = {first.assignment.address, second.assignment.address, third.assignment.address}
        assert len(addresses) == 3
        register = pb.Register(node_name=first.assignment.node_name, address=first.assignment.address)
        result = await control_call(c, first.credential, register)
        assert isinstance(result, pb.GatewayMessage) and result.WhichOneof("msg") == "registered", result


class SlowDeleteRegistry(InMemoryNodeRegistry):
    """Deleting takes a while, as an API call does."""

    async def delete(self, name: str, preconditions: Mapping[str, str] | None = None) -> bool:
        await asyncio.sleep(0.5)
        return await super().delete(name, preconditions)


async def test_retiring_a_previous_node_never_gives_a_live_nodes_address_to_another(tmp_path: Path) -> None:
    """A rejoin naming a previous credential that has not expired keeps that node: a Register of it
    landing while it was being deleted was attached, and its freed address went to the joining node
    (two live nodes at one virtual address)."""
    async with cluster(tmp_path, registry=SlowDeleteRegistry()) as c, channel_for(c) as channel:
        stub = tunnel_stub(channel)
        old = await stub.Join(pb.JoinRequest(token=c.tokens.add(owner="alice"), name_hint="old"))
        rejoin = asyncio.ensure_future(
            stub.Join(
                pb.JoinRequest(token=c.tokens.add(owner="alice"), name_hint="new", previous_credential=old.credential)
            )
        )
        await asyncio.sleep(0.2)  # the rejoin has checked "not connected" and is deleting
        control = stub.Control(metadata=(("authorization", f"Bearer {old.credential}"),))
        await control.write(
            pb.AgentMessage(register=pb.Register(node_name=old.assignment.node_name, address=old.assignment.address))
        )
        first = await asyncio.wait_for(control.read(), 5)
        new = await rejoin
        try:
            live = {name: s.address for name, s in c.gateway.sessions.by_name.items()}
            assert not (
                old.assignment.node_name in live and live[old.assignment.node_name] == new.assignment.address
            ), (
                f"registered={first.WhichOneof('msg')}; old node {old.assignment.node_name} is live at "
                f"{live.get(old.assignment.node_name)} and new node {new.assignment.node_name} was given "
                f"{new.assignment.address}; registry holds {sorted(c.registry.objects)}"
            )
        finally:
            control.cancel()


async def test_an_agent_outside_a_narrowed_pool_joins_again_and_its_old_node_goes(tmp_path: Path) -> None:
    async with cluster(tmp_path, vip_cidr="127.0.20.0/28") as c:
        agent = await c.start_agent("alpha")
        task = c.agents[-1][1]
        assert agent.identity is not None
        before = agent.identity
        assert before.address == "127.0.20.1"
        await _restart_with_cidr(c, "127.0.20.8/29")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not task.done():
            if agent.identity is not None and agent.identity.address != before.address and agent.connected.is_set():
                break
            await asyncio.sleep(0.05)
        assert not task.done(), f"agent exited instead of joining again: {task.exception()!r}"
        assert agent.identity is not None and agent.identity.address != before.address
        # Its previous node, which can never register again, was retired by the join.
        assert list(c.registry.objects) == [agent.identity.node_name]


async def test_of_two_nodes_recording_one_address_the_connected_one_keeps_it_after_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Left by a join whose undo failed before that kept the address for its node: a node that never
    connected records the address of a live one. Listed first, it was given the address at the
    next start, and the live volunteer was refused (address-taken, fatal to its agent) until the
    sweep deleted the other a day later, which then freed the address the live node still records."""
    async with cluster(tmp_path) as c:
        [live] = await _join_n(c, 1)
        name, address = live.assignment.node_name, live.assignment.address
        register = pb.Register(node_name=name, address=address)
        assert isinstance(await control_call(c, live.credential, register), pb.GatewayMessage)
        assert "lastHeartbeat" in c.registry.objects[name]["status"]
        await c.registry.create("ghost", {"owner": "a"}, {JOIN_TOKEN_LABEL: "abcdef"})
        ghost = c.registry.objects.pop("ghost")
        ghost["status"] = never_connected_status(address)
        ghost["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"  # older than the unconnected TTL
        c.registry.objects = {"ghost": ghost, **c.registry.objects}  # listed first
        with caplog.at_level(logging.ERROR, logger="koinon_gateway.server"):
            await _restart_with_cidr(c, c.gateway.config.vip_cidr)
        assert c.gateway.allocator.holder(address) == name
        assert any("ghost" in r.getMessage() and "address-taken" in r.getMessage() for r in caplog.records)
        result = await control_call(c, live.credential, register)
        assert isinstance(result, pb.GatewayMessage) and result.WhichOneof("msg") == "registered", result
        assert await c.gateway.delete_unconnected_nodes() == ["ghost"]
        assert c.gateway.allocator.holder(address) == name
