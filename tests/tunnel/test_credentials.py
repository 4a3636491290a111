"""Node credentials: signed, bound to one node and address, and expiring; renewed while connected."""

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
from koinon_gateway import credentials
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import cluster, connect_via_proxy, control_call, echo_roundtrip

KEY = b"k" * 32


def test_credential_round_trip_carries_identity_and_expiry() -> None:
    issued = credentials.issue(KEY, "alpha-1", "127.0.20.1", lifetime_s=600, now=1_000_000)
    assert issued.expires_at == 1_000_600
    identity = credentials.verify(KEY, issued.token, now=1_000_599)
    assert (identity.node_name, identity.address, identity.issued_at, identity.expires_at) == (
        "alpha-1",
        "127.0.20.1",
        1_000_000,
        1_000_600,
    )


def test_expired_credential_is_refused_with_when_and_what_to_do() -> None:
    issued = credentials.issue(KEY, "alpha-1", "127.0.20.1", lifetime_s=600, now=1_000_000)
    with pytest.raises(credentials.CredentialError, match=r"expired at 1970-01-12T13:56:40Z; join again"):
        credentials.verify(KEY, issued.token, now=1_000_600)


def test_extending_the_expiry_breaks_the_signature() -> None:
    prefix, body, signature = credentials.issue(KEY, "alpha-1", "127.0.20.1", 600, now=1_000_000).token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["exp"] += 10**9
    longer = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(credentials.CredentialError, match="bad signature"):
        credentials.verify(KEY, f"{prefix}.{longer}.{signature}", now=1_000_001)


def test_credential_without_expiry_is_refused() -> None:
    body = base64.urlsafe_b64encode(json.dumps({"n": "a", "a": "127.0.20.1", "iat": 1}).encode()).rstrip(b"=")
    signature = hmac.new(KEY, b"kn1." + body, hashlib.sha256).digest()
    token = f"kn1.{body.decode()}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
    with pytest.raises(credentials.CredentialError, match="missing claims"):
        credentials.verify(KEY, token)


def test_an_unsigned_body_is_never_parsed() -> None:
    # 3,000 nested lists: json.loads raised RecursionError, which ended the call with UNKNOWN and a
    # logged traceback for anyone without a credential.
    nested = base64.urlsafe_b64encode(b"[" * 3000).rstrip(b"=").decode()
    with pytest.raises(credentials.CredentialError, match="bad signature"):
        credentials.verify(KEY, f"kn1.{nested}.AAAA")


@pytest.mark.parametrize("suffix", ["!!", "==", "A"])
def test_a_signature_has_one_spelling(suffix: str) -> None:
    issued = credentials.issue(KEY, "alpha-1", "127.0.20.1", 600, now=1_000_000).token
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
    async with cluster(tmp_path, credential_lifetime_s=2.0) as c:
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
        status, reader, writer = await connect_via_proxy(agent._proxy.port, "127.0.0.1", c.head_port)  # type: ignore[union-attr]
        assert status == 200
        assert await echo_roundtrip(reader, writer, b"still here") == b"still here"
        writer.close()
        assert agent.registrations == 1
        stored = state.load(c.agent_config("alpha").state_dir, c.gateway.agent_target)
        assert stored is not None and stored.expires_at >= agent.identity.expires_at - 1


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


async def test_rejoin_after_expiry_retires_the_old_node_and_reuses_its_address(tmp_path: Path) -> None:
    async with cluster(tmp_path, credential_lifetime_s=2.0) as c:
        first = await c.start_agent("alpha")
        assert first.identity is not None
        old = first.identity
        first.request_drain()
        await asyncio.wait_for(c.agents.pop()[1], 10)
        stored = state.load(c.agent_config("alpha").state_dir, c.gateway.agent_target)
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
