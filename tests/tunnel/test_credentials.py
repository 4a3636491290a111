"""Node credentials: signed, bound to one node object (its uid) and address, and expiring; renewed
while connected."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import grpc
import pytest
from koinon_agent import state
from koinon_agent.agent import Agent, JoinRefused
from koinon_gateway import credentials, service
from koinon_gateway.registry import FileNodeRegistry, node_uid
from koinon_gateway.rpc import tunnel_stub
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import (
    Cluster,
    channel_for,
    cluster,
    connect_via_proxy,
    control_call,
    echo_roundtrip,
    next_message,
    registered_mute_node,
)

KEY = b"k" * 32
UID = "4f1c2e9a-0b7d-4c3e-9a51-2d8f6b0c7e13"


def signed(key: bytes, claims: dict[str, object]) -> str:
    """A kn1 credential with exactly ``claims``, signed with ``key`` (as an older gateway made them)."""
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    signature = hmac.new(key, b"kn1." + body, hashlib.sha256).digest()
    return f"kn1.{body.decode()}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def test_credential_round_trip_carries_identity_and_expiry() -> None:
    issued = credentials.issue(KEY, "alpha-1", "127.0.20.1", lifetime_s=600, now=1_000_000, uid=UID)
    assert issued.expires_at == 1_000_600
    identity = credentials.verify(KEY, issued.token, now=1_000_599)
    assert (identity.node_name, identity.address, identity.issued_at, identity.expires_at, identity.uid) == (
        "alpha-1",
        "127.0.20.1",
        1_000_000,
        1_000_600,
        UID,
    )
    assert identity.names(UID) and not identity.names("another-object-of-the-same-name")


def test_a_credential_names_an_object_and_one_from_before_uids_only_a_name() -> None:
    with pytest.raises(ValueError, match="uid"):  # one without would name any object of the name
        credentials.issue(KEY, "alpha-1", "127.0.20.1", 600, uid="")
    older = signed(KEY, {"n": "alpha-1", "a": "127.0.20.1", "iat": 1_000_000, "exp": 1_000_600})
    identity = credentials.verify(KEY, older, now=1_000_001)
    assert identity.uid == "" and identity.names(UID)  # taken until it expires, see credentials.py


def test_expired_credential_is_refused_with_when_and_what_to_do() -> None:
    issued = credentials.issue(KEY, "alpha-1", "127.0.20.1", lifetime_s=600, now=1_000_000, uid=UID)
    with pytest.raises(credentials.CredentialError, match=r"expired at 1970-01-12T13:56:40Z; join again"):
        credentials.verify(KEY, issued.token, now=1_000_600)


def test_extending_the_expiry_breaks_the_signature() -> None:
    issued = credentials.issue(KEY, "alpha-1", "127.0.20.1", 600, now=1_000_000, uid=UID)
    prefix, body, signature = issued.token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["exp"] += 10**9
    longer = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(credentials.CredentialError, match="bad signature"):
        credentials.verify(KEY, f"{prefix}.{longer}.{signature}", now=1_000_001)


def test_credential_without_expiry_is_refused() -> None:
    with pytest.raises(credentials.CredentialError, match="missing claims"):
        credentials.verify(KEY, signed(KEY, {"n": "a", "a": "127.0.20.1", "iat": 1, "u": UID}))


def test_an_unsigned_body_is_never_parsed() -> None:
    # 3,000 nested lists: json.loads raised RecursionError, which ended the call with UNKNOWN and a
    # logged traceback for anyone without a credential.
    nested = base64.urlsafe_b64encode(b"[" * 3000).rstrip(b"=").decode()
    with pytest.raises(credentials.CredentialError, match="bad signature"):
        credentials.verify(KEY, f"kn1.{nested}.AAAA")


@pytest.mark.parametrize("suffix", ["!!", "==", "A"])
def test_a_signature_has_one_spelling(suffix: str) -> None:
    issued = credentials.issue(KEY, "alpha-1", "127.0.20.1", 600, now=1_000_000, uid=UID).token
    with pytest.raises(credentials.CredentialError, match="bad signature"):
        credentials.verify(KEY, issued + suffix, now=1_000_001)


async def test_a_hostile_credential_is_refused_as_unauthenticated_and_costs_a_join_nothing(tmp_path: Path) -> None:
    nested = base64.urlsafe_b64encode(b"[" * 3000).rstrip(b"=").decode()
    hostile = f"kn1.{nested}.AAAA"
    async with cluster(tmp_path) as c:
        refused = await control_call(c, hostile, pb.Register(node_name="x", address="127.0.20.1"))
        assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == grpc.StatusCode.UNAUTHENTICATED
        assert c.gateway.metrics.refused_streams["bad-credential"] == 1
        # As previous_credential it is ignored: the join goes through on a one-use token.
        config = c.agent_config("alpha", token=c.tokens.add(owner="alice", usage_limit=1))
        state.save(config.state_dir, state.StoredIdentity(c.gateway.agent_target, "old", "127.0.20.9", hostile, 1))
        agent = await c.start_agent("alpha", token=config.token)
        assert agent.identity is not None and agent.identity.node_name in c.registry.objects


async def test_connected_agent_keeps_working_past_its_first_credentials_lifetime(tmp_path: Path) -> None:
    # 3 s, not 2: expires_at is whole seconds, and a start slower than a second on a busy host left
    # less than the one second this test needs before the first credential ends.
    async with cluster(tmp_path, credential_lifetime_s=3.0) as c:
        agent = await c.start_agent("alpha")
        assert agent.identity is not None
        first = agent.identity
        assert first.expires_at >= time.time() + 1
        await asyncio.sleep(first.expires_at - time.time() + 1.0)

        # The first credential is refused now...
        register = pb.Register(node_name=first.node_name, address=first.address)
        refused = await control_call(c, first.credential, register)
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in (refused.details() or "")
        # ...but the agent was renewed in time: new connections through its tunnel still open,
        # its session never dropped, and the renewed credential is what it keeps on disk.
        assert agent.identity.credential != first.credential and agent.identity.expires_at > first.expires_at
        status, reader, writer = await connect_via_proxy(agent._proxy, "127.0.0.1", c.head_port)
        assert status == 200
        assert await echo_roundtrip(reader, writer, b"still here") == b"still here"
        writer.close()
        assert agent.registrations == 1
        stored = state.load(c.agent_config("alpha").state_dir)
        assert stored is not None and stored.expires_at >= agent.identity.expires_at - 1
        # Every renewal names the VolunteerNode object, as the join's credential did.
        assert c.gateway.service is not None
        renewed = credentials.verify(c.gateway.service.credential_key, agent.identity.credential)
        assert renewed.uid == c.registry.objects[first.node_name]["metadata"]["uid"]


async def test_agent_with_expired_stored_credential_rejoins_with_token_or_says_why(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        config = c.agent_config("alpha", token="")
        expired = state.StoredIdentity(c.gateway.agent_target, "alpha-old", "127.0.20.9", "kn1.x.y", expires_at=1)
        state.save(config.state_dir, expired)
        with pytest.raises(JoinRefused, match="credential of alpha-old expired at 1970-01-01T00:00:01Z"):
            await Agent(config).run()

        agent = await c.start_agent("alpha")  # same state dir, now with a join token
        assert agent.identity is not None and agent.identity.node_name != "alpha-old"
        assert agent.identity.node_name in c.registry.objects


async def a_drained_agents_identity(c: Cluster) -> state.StoredIdentity:
    """The identity of an agent "alpha" that joined, then drained and stopped."""
    first = await c.start_agent("alpha")
    assert first.identity is not None
    first.request_drain()
    await asyncio.wait_for(c.agents.pop()[1], 10)
    return first.identity


async def test_rejoin_after_expiry_retires_the_old_node_and_reuses_its_address(tmp_path: Path) -> None:
    async with cluster(tmp_path, credential_lifetime_s=2.0) as c:
        old = await a_drained_agents_identity(c)
        stored = state.load(c.agent_config("alpha").state_dir)
        assert stored is not None
        await asyncio.sleep(max(0.0, stored.expires_at - time.time()) + 0.5)

        again = await c.start_agent("alpha")  # same state dir, a fresh token of the same owner
        assert again.identity is not None and again.identity.node_name != old.node_name
        # One node for this volunteer, not a new one beside a NotReady ghost; its address is free
        # again, so the pool's lowest free address (the old one) is the new node's.
        assert old.node_name not in c.registry.objects
        assert again.identity.node_name in c.registry.objects
        assert again.identity.address == old.address
        assert c.gateway.metrics.previous_nodes == {"retired": 1}


async def test_rejoin_keeps_a_previous_node_that_is_connected_or_someone_elses(tmp_path: Path) -> None:
    async with cluster(tmp_path, credential_lifetime_s=2.0) as c:
        running = await c.start_agent("alpha")
        assert running.identity is not None
        copied = running.identity  # a copy of its state taken now; the agent renews its own
        await asyncio.sleep(copied.expires_at - time.time() + 0.5)

        # A copy of a connected node's old state cannot retire it.
        clone = c.agent_config("clone")
        state.save(clone.state_dir, copied)
        await c.start_agent("clone")
        assert c.registry.objects[copied.node_name]["status"]["connected"] is True
        assert running.connected.is_set() and c.gateway.metrics.previous_nodes == {"kept": 1}

        # Nor can a join token of another owner retire a node that is gone offline.
        running.request_drain()
        await asyncio.wait_for(c.agents[0][1], 10)
        other = c.agent_config("other", token=c.tokens.add(owner="mallory"))
        state.save(other.state_dir, copied)
        await c.start_agent("other", token=other.token)
        assert copied.node_name in c.registry.objects
        assert c.gateway.metrics.previous_nodes == {"kept": 2}


async def test_rejoin_retires_no_object_created_again_under_the_previous_nodes_name(tmp_path: Path) -> None:
    """An expired credential names the object it was issued for: one made again under its name
    since (same owner, same address) is someone's new node, not the volunteer's old one."""
    async with cluster(tmp_path, credential_lifetime_s=2.0) as c:
        old = await a_drained_agents_identity(c)
        deleted = c.registry.objects.pop(old.node_name)
        await c.registry.create(old.node_name, deleted["spec"], deleted["metadata"]["labels"])
        await c.registry.patch_status(old.node_name, {"address": old.address})
        stored = state.load(c.agent_config("alpha").state_dir)
        assert stored is not None
        await asyncio.sleep(max(0.0, stored.expires_at - time.time()) + 0.5)

        again = await c.start_agent("alpha")  # same state dir: sends the expired credential along
        assert again.identity is not None and again.identity.node_name != old.node_name
        assert old.node_name in c.registry.objects and c.gateway.metrics.previous_nodes == {}


async def a_node_gone_quiet(c: Cluster, channel: grpc.aio.Channel) -> tuple[str, str, bytes]:
    """A node that joined and registered, then hung up: its name, address, and the key the gateway
    signs credentials with."""
    joined, control = await registered_mute_node(c, channel)
    name, address = joined.assignment.node_name, joined.assignment.address
    control.cancel()
    await wait_detached(c, name)
    assert c.gateway.service is not None
    return name, address, c.gateway.service.credential_key


async def wait_detached(c: Cluster, name: str) -> None:
    for _ in range(100):
        if name not in c.gateway.sessions.by_name:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}'s session did not end")


async def test_a_node_created_again_under_a_deleted_nodes_name_takes_none_of_its_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting a VolunteerNode revoked its credentials only while no object had its name: one
    created under it again (here a join that drew the same name; an admin re-applying the object
    is another way) made every credential of the deleted node good again, a leaked one included:
    it took over the new node's session and opened streams through it."""
    monkeypatch.setattr(service, "node_name_from_hint", lambda hint: "vol-again")
    async with cluster(tmp_path) as c, channel_for(c) as channel:
        old, control = await registered_mute_node(c, channel)
        name, address = old.assignment.node_name, old.assignment.address
        control.cancel()
        await wait_detached(c, name)
        # Deleted, as its revocation does: the object goes and its address returns to the pool.
        assert await c.registry.delete(name)
        c.gateway.allocator.release(address, name)
        new, control = await registered_mute_node(c, channel)
        assert (new.assignment.node_name, new.assignment.address) == (name, address)

        refused = await control_call(c, old.credential, pb.Register(node_name=name, address=address))
        assert isinstance(refused, grpc.aio.AioRpcError), refused
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and "no longer exists" in (refused.details() or "")
        assert c.gateway.metrics.refused_streams["node-deleted"] == 1
        # Nor does it open streams through the new node's session, which goes on.
        dial = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {old.credential}"),))
        await dial.write(pb.Frame(dial=pb.Dial(host="127.0.0.1", port=c.head_port)))
        with pytest.raises(grpc.aio.AioRpcError) as no_session:
            await asyncio.wait_for(dial.read(), 5)
        assert no_session.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert c.gateway.sessions.by_name[name].uid == c.registry.objects[name]["metadata"]["uid"]
        control.cancel()


async def test_a_credential_from_before_uids_is_taken_and_replaced_by_one_naming_the_object(tmp_path: Path) -> None:
    """Refused, every agent would join again on the gateway's upgrade (credentials.py says why
    not); taken, the registration it opens hands the agent one that names the object."""
    async with cluster(tmp_path) as c, channel_for(c) as channel:
        name, address, key = await a_node_gone_quiet(c, channel)
        older = signed(key, {"n": name, "a": address, "iat": int(time.time()), "exp": int(time.time()) + 600})
        control = tunnel_stub(channel).Control(metadata=(("authorization", f"Bearer {older}"),))
        await control.write(pb.AgentMessage(register=pb.Register(node_name=name, address=address)))
        assert (await next_message(control)).WhichOneof("msg") == "registered"
        renewal = await next_message(control)
        assert renewal.WhichOneof("msg") == "credential"
        uid = c.registry.objects[name]["metadata"]["uid"]
        assert credentials.verify(key, renewal.credential.credential).uid == uid
        control.cancel()


async def test_a_credential_from_before_uids_opens_no_object_created_after_it(tmp_path: Path) -> None:
    """An object deleted and applied again later under the same name, with its address: a leaked
    uid-less credential opened it and was renewed into one naming the new object, for ever."""
    async with cluster(tmp_path) as c, channel_for(c) as channel:
        name, address, key = await a_node_gone_quiet(c, channel)
        issued = int(time.time()) - 3600  # by the gateway before its upgrade, an hour ago
        older = signed(key, {"n": name, "a": address, "iat": issued, "exp": issued + 7 * 86400})
        saved = c.registry.objects.pop(name)
        c.gateway.allocator.release(address, name)
        await c.registry.create(name, saved["spec"], saved["metadata"]["labels"])
        await c.registry.patch_status(name, {"address": address})
        refused = await control_call(c, older, pb.Register(node_name=name, address=address))
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_file_registry_objects_from_before_uids_get_one_that_outlives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "volunteernodes.json"
    path.write_text(json.dumps({"vn-a": {"metadata": {"name": "vn-a"}, "spec": {}, "status": {}}}))
    uid = node_uid(await FileNodeRegistry(path).get("vn-a") or {})
    assert uid and node_uid(await FileNodeRegistry(path).get("vn-a") or {}) == uid  # what its credentials name
    created = await FileNodeRegistry(path).create("vn-b", {}, {})
    assert node_uid(await FileNodeRegistry(path).get("vn-b") or {}) == created != uid
