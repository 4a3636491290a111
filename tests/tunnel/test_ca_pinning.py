"""Trusting the gateway from a pinned CA hash (kubeadm-style discovery) instead of a CA file."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest
from koinon_agent.agent import Agent, JoinRefused
from koinon_agent.ca_discovery import presented_chain
from koinon_gateway.pki import ca_cert_hash, create_ca

from .helpers import cluster


@pytest.mark.parametrize("listen", ["tcp", "unix"])
async def test_agent_with_only_the_hash_takes_the_ca_from_the_gateway_and_joins(tmp_path: Path, listen: str) -> None:
    address = "127.0.0.1:0" if listen == "tcp" else f"unix:{tmp_path}/gw.sock"
    async with cluster(tmp_path, listen=address) as c:
        pin = ca_cert_hash(c.gateway.ca_pem)
        agent = await c.start_agent("alpha", ca_pem=b"", ca_cert_hash=pin)
        assert agent.identity is not None and agent.identity.node_name in c.registry.objects
        assert agent.config.ca_pem == c.gateway.ca_pem


async def test_a_gateway_without_the_pinned_ca_is_refused_before_any_token_is_sent(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        other = ca_cert_hash(create_ca().cert_pem)
        config = c.agent_config("alpha", ca_pem=b"", ca_cert_hash=other)
        with pytest.raises(JoinRefused, match=f"no CA certificate with hash {other}"):
            await Agent(config).run()
        assert c.gateway.metrics.joins == {} and c.registry.objects == {}
        # What the gateway does present: its server certificate, then its CA.
        chain = await presented_chain(c.gateway.agent_target, "koinon-gateway")
        assert len(chain) == 2 and chain[1].subject == chain[0].issuer


async def test_a_configured_ca_must_match_the_pin(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        pin = ca_cert_hash(c.gateway.ca_pem)
        agent = await c.start_agent("alpha", ca_cert_hash=pin)  # the CA PEM and its own hash
        assert agent.identity is not None
        other = ca_cert_hash(create_ca().cert_pem)
        with pytest.raises(JoinRefused, match="the configured CA has hash"):
            await Agent(c.agent_config("beta", ca_cert_hash=other)).run()


def test_malformed_pin_is_refused_naming_the_field(tmp_path: Path) -> None:
    from koinon_agent.config import AgentConfig

    for bad in ("sha256:abc", "md5:" + "0" * 32, "SHA256:" + "A" * 64):
        with pytest.raises(ValueError, match="ca_cert_hash"):
            AgentConfig(gateway="h:1", ca_cert_hash=bad).validate()
    with pytest.raises(ValueError, match="insecure"):
        AgentConfig(gateway="h:1", insecure=True, ca_cert_hash="sha256:" + "0" * 64).validate()


async def test_an_unreachable_gateway_is_retried_not_taken_as_a_wrong_ca(tmp_path: Path) -> None:
    from koinon_agent.config import AgentConfig

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # a port that is bound but never accepts: nothing answers there
    port = listener.getsockname()[1]
    listener.close()
    config = AgentConfig(
        gateway=f"127.0.0.1:{port}",
        token="abcdef.0123456789abcdef",
        state_dir=tmp_path / "agent",
        ca_cert_hash="sha256:" + "0" * 64,
        start_ray=False,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    agent = Agent(config)
    task = asyncio.ensure_future(agent.run())
    await asyncio.sleep(1.0)
    assert not task.done()  # still trying, with backoff
    agent.request_drain()
    with pytest.raises(JoinRefused, match="drained before joining"):
        await asyncio.wait_for(task, 5)


async def test_a_ca_bundle_holding_the_pinned_ca_and_another_is_refused(tmp_path: Path) -> None:
    # The channel would trust every certificate of the bundle: an attacker's CA beside the pinned
    # one would let an impostor gateway (DNS or route hijack) receive the join token.
    async with cluster(tmp_path) as c:
        pin = ca_cert_hash(c.gateway.ca_pem)
        other = create_ca(common_name="attacker-ca").cert_pem
        agent = Agent(c.agent_config("alpha", ca_pem=c.gateway.ca_pem + other, ca_cert_hash=pin))
        with pytest.raises(JoinRefused, match="holds 2 certificates; with a pin it must hold the pinned CA alone"):
            await asyncio.wait_for(agent.run(), 10)
        assert dict(c.gateway.metrics.joins) == {}
        # The pinned CA alone is accepted.
        alone = await c.start_agent("beta", ca_pem=c.gateway.ca_pem, ca_cert_hash=pin)
        assert alone.identity is not None


async def test_join_retries_with_the_wrong_ca_say_the_certificate_is_the_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A wrong CA (or an IP address without tlsServerName) fails every handshake as UNAVAILABLE, the
    # code a gateway that is down gives too: the retry line must carry gRPC's reason.
    async with cluster(tmp_path) as c:
        caplog.set_level(logging.WARNING, logger="koinon_agent")
        task = asyncio.ensure_future(Agent(c.agent_config("alpha", ca_pem=create_ca().cert_pem)).run())
        try:
            for _ in range(100):
                if any("join failed" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        retries = [r.getMessage() for r in caplog.records if "join failed" in r.getMessage()]
        assert retries, caplog.text
        line = retries[0].lower()
        assert "unavailable" in line and "handshake failed" in line and "certificate" in line, retries[0]
        assert c.registry.objects == {}
