"""A VolunteerNode held by a finalizer (deleted, not yet gone) across a gateway restart: its address,
which may be another node's by then, is not reserved again, and its credential stays refused.
Before 2026-12-06:

1. Node A (name sorting last) is deleted while a finalizer holds it: the gateway revokes it and
   frees its address X; node B joins and gets X.
2. The gateway restarts. Gateway.start() reserves every listed node's status.address, the
   terminating A included; the API lists by name, so A (listed after B) ends up as X's holder.
3. The revoker's first list reports A as deleted and releases X, because A "holds" it: X is now
   free while B still owns it. The next join gets X: two nodes, one address; B is refused from
   then on ("address-taken") and the newcomer receives the traffic meant for B.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from koinon_gateway.config import GatewayConfig
from koinon_gateway.kube_ca import KubeCAStore
from koinon_gateway.kube_client import custom_path
from koinon_gateway.kube_registry import KubeNodeRegistry
from koinon_gateway.kube_tokens import KubeTokenStore
from koinon_gateway.registry import GROUP, PLURAL, VERSION, DeletedNode
from koinon_gateway.rpc import tunnel_stub
from koinon_gateway.server import Gateway
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import echo_server
from .test_kube_registry_deletion import HOLD, VN, kube  # noqa: F401  (fixture)
from .test_kube_stores import NAMESPACE, Kube, gateway_config


class SlowFirstListRegistry(KubeNodeRegistry):
    """The deletion watch's first list takes a while, as listing thousands of VolunteerNodes does
    (a single GET, what Control checks, stays fast)."""

    async def deleted_nodes(self) -> AsyncIterator[DeletedNode]:
        await asyncio.sleep(2.0)
        async for node in super().deleted_nodes():
            yield node


def gateway_parts(cluster: Kube, head_port: int) -> tuple[GatewayConfig, KubeTokenStore, KubeCAStore]:
    """What a gateway keeps across its restarts: its settings and the kube stores of its tokens and CA."""
    client = cluster.client
    return gateway_config(head_port), KubeTokenStore(client, NAMESPACE), KubeCAStore(client, NAMESPACE)


def _channel(gw: Gateway) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        gw.agent_target,
        grpc.ssl_channel_credentials(gw.ca_pem),
        options=[("grpc.ssl_target_name_override", "koinon-gateway")],
    )


async def _started_gateway(
    cluster: Kube, head_port: int
) -> tuple[Gateway, tuple[GatewayConfig, KubeTokenStore, KubeCAStore]]:
    parts = gateway_parts(cluster, head_port)
    config, tokens, ca_store = parts
    gw = Gateway(config, tokens, KubeNodeRegistry(cluster.client, 0.5), ca_store)
    await gw.start()
    return gw, parts


async def _registered(gw: Gateway, tokens: KubeTokenStore, hint: str) -> pb.JoinResponse:
    """A node that joined and registered."""
    joined = await _join(gw, tokens, hint)
    assert await _register(gw, joined) == "registered"
    return joined


async def _join(gw: Gateway, tokens: KubeTokenStore, hint: str) -> pb.JoinResponse:
    async with _channel(gw) as channel:
        token = await tokens.create(owner=hint)
        response: pb.JoinResponse = await tunnel_stub(channel).Join(
            pb.JoinRequest(token=token, name_hint=hint), timeout=10
        )
        return response


async def _register(gw: Gateway, joined: pb.JoinResponse) -> str:
    """'registered', or the refusal's details."""
    async with _channel(gw) as channel:
        call = tunnel_stub(channel).Control(metadata=(("authorization", f"Bearer {joined.credential}"),))
        try:
            await call.write(
                pb.AgentMessage(
                    register=pb.Register(node_name=joined.assignment.node_name, address=joined.assignment.address)
                )
            )
            message = await asyncio.wait_for(call.read(), 5)
            if isinstance(message, pb.GatewayMessage):
                return str(message.WhichOneof("msg"))
            await call.code()
            return "ended"
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        finally:
            call.cancel()


async def _until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_restart_does_not_give_a_finalizer_held_nodes_address_back_to_it(
    kube: Kube,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with echo_server() as head_port:
        gw, (config, tokens, ca_store) = await _started_gateway(kube, head_port)
        try:
            a = await _join(gw, tokens, "zzz")  # sorts after every other name
            a_name, x = a.assignment.node_name, a.assignment.address
            # An admin deletes A while a finalizer (an operator that is down) holds the object.
            kube.emulator.patch(*VN, a_name, HOLD)
            await kube.client.delete(custom_path(GROUP, VERSION, PLURAL, a_name))
            await _until(lambda: gw.sessions.was_revoked(a_name) and gw.allocator.holder(x) is None, "A revoked")
            b = await _join(gw, tokens, "aaa")
            assert b.assignment.address == x  # the freed address, correctly reused
            assert await _register(gw, b) == "registered"
        finally:
            await gw.stop(0)

        # The gateway restarts (rollout, crash) while A's object is still held.
        gw = Gateway(dataclasses.replace(config), tokens, KubeNodeRegistry(kube.client, 0.5), ca_store)
        await gw.start()
        try:
            holder_at_start = gw.allocator.holder(x)
            await _until(lambda: gw.sessions.was_revoked(a_name), "the revoker's first list")
            c = await _join(gw, tokens, "ccc")
            b_register = await _register(gw, b)
            report = (
                f"after restart X={x} was held by {holder_at_start} (the deleted node), then released; "
                f"new node {c.assignment.node_name} got {c.assignment.address} (B {b.assignment.node_name} "
                f"owns {x}); B's own register now answers {b_register!r}"
            )
            assert holder_at_start == b.assignment.node_name, report
            assert c.assignment.address != x, report
            assert b_register == "registered", report
        finally:
            await gw.stop(0)


async def test_a_node_held_by_a_finalizer_stays_refused_after_a_gateway_restart(
    kube: Kube,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The memory of revoked names is lost on restart: until the deletion watch's first list comes
    back (slow with thousands of nodes), only the object's deletionTimestamp says the node is gone.
    Before 2026-12-06 Control checked only that the object existed, and the node registered again."""
    async with echo_server() as head_port:
        gw, (config, tokens, ca_store) = await _started_gateway(kube, head_port)
        try:
            a = await _registered(gw, tokens, "alpha")
            kube.emulator.patch(*VN, a.assignment.node_name, HOLD)
            await kube.client.delete(custom_path(GROUP, VERSION, PLURAL, a.assignment.node_name))
            await _until(lambda: gw.sessions.was_revoked(a.assignment.node_name), "A revoked")
            assert "no longer exists" in await _register(gw, a)  # refused, as documented
        finally:
            await gw.stop(0)

        gw = Gateway(config, tokens, SlowFirstListRegistry(kube.client, 0.5), ca_store)
        await gw.start()
        try:
            answer = await _register(gw, a)
            assert answer != "registered", (
                f"deleted node {a.assignment.node_name} (deletionTimestamp set) registered again at "
                f"{a.assignment.address}; gateway routes that address to it: "
                f"{gw.sessions.get_by_address(a.assignment.address) is not None}"
            )
        finally:
            await gw.stop(0)


async def test_a_volunteernode_applied_again_after_its_deletion_takes_none_of_its_credentials(
    kube: Kube,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Only the gateway's memory of revoked names (lost on restart) stood between a deleted node's
    credential and an object an admin applied again under its name: the credential, a leaked copy
    as well, registered again. The API server gives the new object a uid of its own."""
    path = custom_path(GROUP, VERSION, PLURAL)
    async with echo_server() as head_port:
        gw, (config, tokens, ca_store) = await _started_gateway(kube, head_port)
        try:
            a = await _registered(gw, tokens, "alpha")
            name = a.assignment.node_name
            saved = await kube.client.get(custom_path(GROUP, VERSION, PLURAL, name))
            await kube.client.delete(custom_path(GROUP, VERSION, PLURAL, name))
            await _until(lambda: gw.sessions.was_revoked(name), "A revoked")
        finally:
            await gw.stop(0)

        # Applied again from what was saved (name, labels, spec), then the gateway restarts.
        metadata = {k: saved["metadata"][k] for k in ("name", "labels", "annotations") if k in saved["metadata"]}
        await kube.client.create(path, {**{k: saved[k] for k in ("apiVersion", "kind", "spec")}, "metadata": metadata})
        gw = Gateway(config, tokens, KubeNodeRegistry(kube.client, 0.5), ca_store)
        await gw.start()
        try:
            assert "no longer exists" in await _register(gw, a)
        finally:
            await gw.stop(0)


def test_an_address_another_node_holds_is_never_taken_over() -> None:
    from koinon_gateway.addresses import AddressAllocator, AddressTaken

    allocator = AddressAllocator("127.0.20.0/29", 20000, 16)
    allocator.reserve("127.0.20.1", "b")
    allocator.reserve("127.0.20.1", "b")  # the holder itself again: fine
    try:
        allocator.reserve("127.0.20.1", "a")
    except AddressTaken:
        pass
    else:
        raise AssertionError("reserve took over an address another node holds")
    assert allocator.holder("127.0.20.1") == "b"
    assert not allocator.release("127.0.20.1", "a")  # a release in another's name frees nothing
