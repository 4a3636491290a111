"""An identity stored under another gateway address than the configured one (a DNS rename, an IP
instead of a name, localhost for 127.0.0.1): neither dropped, leaving a NotReady ghost that holds
an address, nor trusted blindly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from koinon_agent import state
from koinon_agent.agent import LEGACY_TRUST, SYSTEM_TRUST, Agent, JoinRefused, trust_fingerprint
from koinon_agent.config import AgentConfig
from koinon_gateway import credentials
from koinon_gateway.pki import create_ca

from .helpers import cluster


def under_another_name(target: str) -> str:
    """The same gateway, reached under another name."""
    host, _, port = target.rpartition(":")
    assert host == "127.0.0.1", target
    return f"localhost:{port}"


@contextlib.contextmanager
def credentials_shown() -> Iterator[list[str]]:
    """The credentials every gateway in this process is shown (credentials.verify), in order."""
    shown: list[str] = []
    real_verify = credentials.verify

    def spy(key: bytes, credential: str, *args: Any, **kwargs: Any) -> credentials.NodeIdentity:
        shown.append(credential)
        return real_verify(key, credential, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(credentials, "verify", spy)
        yield shown


async def test_the_same_gateway_under_another_name_takes_the_stored_identity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with cluster(tmp_path, tls=False) as c:
        first = await c.start_agent("alpha")
        assert first.identity is not None
        old = first.identity
        first.request_drain(now=True)
        await asyncio.wait_for(c.agents[-1][1], 15)
        renamed = under_another_name(c.gateway.agent_target)
        token = c.tokens.add(owner="alice", region="eu")
        second = await c.start_agent("alpha", gateway=renamed, token=token)
        assert second.identity is not None
        # The same node goes on: no second VolunteerNode beside a ghost, no token use.
        assert (second.identity.node_name, second.identity.address) == (old.node_name, old.address)
        assert sorted(c.registry.objects) == [old.node_name]
        assert c.registry.objects[old.node_name]["status"]["connected"] is True
        assert c.tokens.tokens[token.partition(".")[0]].usages_count == 0
        # Kept from now on under the address it is used at, once the gateway took it there.
        stored = state.load(second.config.state_dir)
        assert stored == second.identity and stored.gateway == renamed
    assert f"the stored identity {old.node_name} was kept for gateway '{c.gateway.agent_target}'" in caplog.text


async def test_an_expired_identity_under_another_name_retires_the_old_node(tmp_path: Path) -> None:
    async with cluster(tmp_path, tls=False, credential_lifetime_s=2.0) as c:
        first = await c.start_agent("alpha")
        assert first.identity is not None
        old = first.identity
        first.request_drain(now=True)
        await asyncio.wait_for(c.agents[-1][1], 15)
        await asyncio.sleep(max(0.0, old.expires_at - time.time()) + 0.5)
        second = await c.start_agent("alpha", gateway=under_another_name(c.gateway.agent_target))
        assert second.identity is not None and second.identity.node_name != old.node_name
        # Joined with the token naming the old node, which the gateway retired: no ghost.
        assert sorted(c.registry.objects) == [second.identity.node_name]
        assert c.gateway.metrics.previous_nodes == {"retired": 1}
        assert second.identity.address == old.address


async def test_another_gateway_refuses_the_credential_and_the_agent_joins_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A credential of another gateway opens nothing there and retires nothing: that gateway did
    not sign it. The node of the first gateway stays there (it is that gateway's to remove)."""
    caplog.set_level(logging.INFO)
    async with cluster(tmp_path / "one", tls=False) as one, cluster(tmp_path / "two", tls=False) as two:
        first = await one.start_agent("alpha")
        assert first.identity is not None
        old = first.identity
        first.request_drain(now=True)
        await asyncio.wait_for(one.agents[-1][1], 15)
        token = two.tokens.add(owner="alice")
        moved = await two.start_agent("alpha", state_dir=first.config.state_dir, token=token)
        assert moved.identity is not None and moved.identity.gateway == two.gateway.agent_target
        assert sorted(two.registry.objects) == [moved.identity.node_name]
        assert two.gateway.metrics.previous_nodes == {}
        assert "previous credential ignored" in caplog.text  # it was sent along, and not taken
        assert old.node_name in one.registry.objects
        assert state.load(first.config.state_dir) == moved.identity


async def test_a_gateway_trusted_through_another_ca_never_sees_the_stored_credential(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The credential is a bearer secret of the gateway that issued it: a volunteer that reuses its
    state dir to join another platform (another CA) must not hand that platform its old node."""
    caplog.set_level(logging.INFO)
    async with cluster(tmp_path / "one") as one, cluster(tmp_path / "two") as two:
        first = await one.start_agent("alpha")
        assert first.identity is not None and first.identity.trusted_ca.startswith("sha256:")
        old = first.identity
        first.request_drain(now=True)
        await asyncio.wait_for(one.agents[-1][1], 15)
        with credentials_shown() as shown:
            token = two.tokens.add(owner="alice")
            moved = await two.start_agent("alpha", state_dir=first.config.state_dir, token=token)
        assert moved.identity is not None and moved.identity.node_name != old.node_name
        assert old.credential not in shown, "the other platform's gateway was shown the old credential"
        assert "trusted otherwise than the configured" in caplog.text
        assert old.node_name in one.registry.objects  # that gateway's to remove


async def test_another_platform_at_the_same_address_never_sees_the_stored_credential(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As above, but the other platform is reached at the same host:port (a `kubectl port-forward`
    to localhost:7443 for each, a DNS name moved to another operator): the address says nothing,
    the configured CA does. Neither as the session's credential nor as the Join's previous one."""
    caplog.set_level(logging.INFO)
    async with cluster(tmp_path / "one") as one:
        first = await one.start_agent("alpha")
        assert first.identity is not None and first.identity.trusted_ca.startswith("sha256:")
        old = first.identity
        first.request_drain(now=True)
        await asyncio.wait_for(one.agents[-1][1], 15)
        address = one.gateway.agent_target
        await one.gateway.stop(0)
        async with cluster(tmp_path / "two", listen=address) as two:
            assert two.gateway.agent_target == address and two.gateway.ca_pem != one.gateway.ca_pem
            with credentials_shown() as shown:
                token = two.tokens.add(owner="alice")
                moved = await two.start_agent("alpha", state_dir=first.config.state_dir, token=token)
            assert moved.identity is not None and moved.identity.credential != old.credential
            assert old.credential not in shown, "the other platform's gateway was shown the old credential"
            assert f"the stored identity {old.node_name} was issued under another CA" in caplog.text
            assert old.credential not in caplog.text
            assert state.load(first.config.state_dir) == moved.identity


async def test_without_a_token_an_identity_of_another_ca_stops_the_agent_saying_why(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        config = c.agent_config("alpha", token="")
        stored = state.StoredIdentity(c.gateway.agent_target, "vn-a", "127.0.20.1", "cred", 2_000_000_000, "sha256:ab")
        state.save(config.state_dir, stored)
        expected = r"vn-a was issued under another CA .*\(CA sha256:ab then, CA sha256:[0-9a-f]{64} now\).* join again "
        with pytest.raises(
            JoinRefused, match=expected + "with a token, or configure the CA the identity was issued under"
        ):
            await asyncio.wait_for(Agent(config).run(), 10)
        assert c.registry.objects == {}


async def test_an_identity_from_before_trust_was_recorded_is_reused_at_the_same_address(tmp_path: Path) -> None:
    """An identity.json from an agent that did not record its trust (trusted_ca "") tells one CA
    from another by nothing: at the address it was issued for it is reused, as before."""
    async with cluster(tmp_path) as c:
        config = c.agent_config("alpha", token="")
        legacy = state.StoredIdentity(c.gateway.agent_target, "vn-a", "127.0.20.1", "cred", 2_000_000_000, "")
        state.save(config.state_dir, legacy)
        assert await Agent(config)._ensure_identity() == legacy


PRIVATE_CA = create_ca().cert_pem


def config_trusting(state_dir: Path, trust: str, gateway: str = "gw.example.org:443") -> AgentConfig:
    """An agent without a token for ``gateway``, trusting it through ``trust``: "system" (no CA
    configured: the system's trust store) or "private" (a CA of its own, as a platform has)."""
    ca_pem = PRIVATE_CA if trust == "private" else b""
    return AgentConfig(gateway=gateway, state_dir=state_dir, simulate_gpus=0, ca_pem=ca_pem)


async def test_an_identity_joined_through_the_system_trust_store_is_not_shown_to_a_gateway_of_another_ca(
    tmp_path: Path,
) -> None:
    """Joined with the system's trust store (no --ca-file, a publicly trusted gateway certificate),
    the identity records that, not "" as an identity from before trust was recorded: the DNS name
    moved to another operator, whose gateway the config now trusts through a private CA, is not
    shown the credential (README: only to a gateway trusted as the one that issued it was)."""
    recorded = trust_fingerprint(config_trusting(tmp_path, "system"))
    assert recorded == SYSTEM_TRUST != LEGACY_TRUST
    stored = state.StoredIdentity("gw.example.org:443", "vn-a", "127.0.20.1", "cred", 2_000_000_000, recorded)
    state.save(tmp_path, stored)
    with pytest.raises(JoinRefused, match=r"another CA .*\(the system's trust store then, CA sha256:"):
        await Agent(config_trusting(tmp_path, "private"))._ensure_identity()
    assert await Agent(config_trusting(tmp_path, "system"))._ensure_identity() == stored


@pytest.mark.parametrize("recorded", [SYSTEM_TRUST, LEGACY_TRUST])
async def test_an_identity_of_the_system_trust_store_or_of_unrecorded_trust_is_not_shown_at_another_address(
    tmp_path: Path, recorded: str
) -> None:
    """The system's trust store takes any publicly trusted certificate for the address it is
    given, and an older agent's identity says nothing of its trust: neither tells that a gateway
    at another address is the one that issued the credential. Here no token: the agent stops."""
    stored = state.StoredIdentity("gw.example.org:443", "vn-a", "127.0.20.1", "cred", 2_000_000_000, recorded)
    state.save(tmp_path, stored)
    moved = config_trusting(tmp_path, "system", gateway="gw.example.net:443")
    with pytest.raises(ValueError, match="token: required for the first join"):
        await Agent(moved)._ensure_identity()


async def test_an_identity_from_before_trust_was_recorded_is_reused_at_the_same_address_under_any_trust(
    tmp_path: Path,
) -> None:
    """trusted_ca "" (an agent from before trust was recorded, which also stored it for the system's
    trust store) is reused at its own address whatever the config trusts now, as it always was."""
    legacy = state.StoredIdentity("gw.example.org:443", "vn-a", "127.0.20.1", "cred", 2_000_000_000, LEGACY_TRUST)
    state.save(tmp_path, legacy)
    for trust in ("system", "private"):
        assert await Agent(config_trusting(tmp_path, trust))._ensure_identity() == legacy
