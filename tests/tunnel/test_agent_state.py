"""The agent's state dir, its stored identity, what a stop before joining means, and what job code
inherits: each checked against a real gateway where one is involved."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from koinon_agent import cli, state
from koinon_agent.agent import Agent, DrainedBeforeJoining, JoinRefused
from koinon_agent.config import AgentConfig
from koinon_agent.ray_node import RaySettings, ray_environment
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import Cluster, cluster


@pytest.fixture
async def c(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(tmp_path) as result:
        yield result


async def test_a_state_dir_that_cannot_be_written_stops_the_agent_before_it_joins(c: Cluster) -> None:
    (c.tmp / "a-file").write_text("")
    config = c.agent_config("alpha", state_dir=c.tmp / "a-file" / "state")  # cannot be created
    token_id = config.token.split(".")[0]
    with pytest.raises(state.StateError, match="a-file/state: not writable"):
        await asyncio.wait_for(Agent(config).run(), 10)
    assert c.registry.objects == {}  # no node nobody could use...
    assert c.tokens.tokens[token_id].usages_count == 0  # ...and the token's use is still there


TYPED_WRONG = '{"gateway": "%s", "node_name": "n", "address": "127.0.20.1", "credential": "c", "expires_at": %s}'


@pytest.mark.parametrize(
    "garbage",
    ["", '{"gateway": "x", "node_na', "[]", '{"gateway": "x"}', TYPED_WRONG % ("{gw}", "null"),
     TYPED_WRONG % ("{gw}", '"1700000000"'), TYPED_WRONG % ("{gw}", "true")],
)  # fmt: skip
async def test_an_unreadable_identity_is_set_aside_when_a_token_can_join_again(c: Cluster, garbage: str) -> None:
    config = c.agent_config("alpha")
    config.state_dir.mkdir(parents=True)
    garbage = garbage.replace("{gw}", c.gateway.agent_target)  # JSON that parses, with a wrong type
    (config.state_dir / "identity.json").write_text(garbage)
    agent = await c.start_agent("alpha")
    assert agent.identity is not None and agent.identity.node_name in c.registry.objects
    assert (config.state_dir / "identity.json.corrupt").read_text() == garbage
    assert state.load(config.state_dir) == agent.identity


async def test_an_unreadable_identity_without_a_token_names_the_file(c: Cluster, tmp_path: Path) -> None:
    config = c.agent_config("alpha", token="")
    config.state_dir.mkdir(parents=True)
    (config.state_dir / "identity.json").write_text("{")
    with pytest.raises(state.StateError, match=r"identity\.json: unreadable stored identity"):
        await asyncio.wait_for(Agent(config).run(), 10)
    assert (config.state_dir / "identity.json").read_text() == "{"  # kept for the volunteer to restore


def test_the_identity_is_written_for_this_user_only_and_never_through_a_planted_file(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    leak = tmp_path / "leak.txt"
    (state_dir / "identity.tmp").symlink_to(leak)  # what an older agent used as its temporary file
    identity = state.StoredIdentity("gw:1", "alpha-1", "127.0.20.1", "secret-credential", 123)
    state.save(state_dir, identity)
    path = state_dir / "identity.json"
    assert not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not leak.exists()
    assert state.load(state_dir) == identity
    assert sorted(p.name for p in state_dir.iterdir()) == ["identity.json", "identity.tmp"]  # no leftovers
    fresh = tmp_path / "fresh" / "state"
    state.save(fresh, identity)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


def test_a_save_cut_short_leaves_no_copy_of_the_credential_behind(tmp_path: Path) -> None:
    identity = state.StoredIdentity("gw:1", "alpha-1", "127.0.20.1", "secret-credential", 123)
    state.save(tmp_path, identity)
    (tmp_path / ".identity-k2j3.tmp").write_text('{"credential": "secret-credential"}')  # killed mid-save
    assert state.load(tmp_path) == identity
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.json"]


async def test_a_stop_while_the_gateway_does_not_answer_the_join_is_prompt(tmp_path: Path) -> None:
    # A gateway that accepts the connection and then says nothing: the Join would wait 15 s.
    silent: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    from koinon_agent.config import AgentConfig

    config = AgentConfig(
        gateway=f"127.0.0.1:{port}", token="abcdef.0123456789abcdef", state_dir=tmp_path, insecure=True, start_ray=False
    )
    agent = Agent(config)
    task = asyncio.ensure_future(agent.run())
    await asyncio.sleep(1.0)
    stopped = time.monotonic()
    agent.request_drain()
    with pytest.raises(DrainedBeforeJoining):
        await asyncio.wait_for(task, 10)
    assert time.monotonic() - stopped < 2
    server.close()
    for writer in silent:
        writer.close()


def test_sigterm_before_joining_exits_zero(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "koinon_agent.cli", "join", "--gateway", "127.0.0.1:1", "--insecure", "--no-ray"],
        env={**os.environ, "KOINON_TOKEN": "abcdef.0123456789abcdef", "KOINON_STATE_DIR": str(tmp_path)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)  # importing, then retrying an unreachable gateway
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    assert process.returncode == 0, err
    assert "drained before joining" in err


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--gateway", "localhost"], "gateway: expected host:port"),
        (["--gateway", "gw:99999"], "gateway: expected host:port"),
        (["--gateway", "gw:1", "--ca-file", "/nonexistent/ca.pem"], "ca_file: /nonexistent/ca.pem"),
        (["--gateway", "gw:1", "--insecure"], "token: required for the first join"),
    ],
)
def test_configuration_mistakes_exit_2_naming_the_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], field: str
) -> None:
    assert cli.main(["join", "--state-dir", str(tmp_path), "--no-ray", *argv]) == 2
    assert field in capsys.readouterr().err


def test_a_pem_that_is_not_one_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KOINON_CA_CERT", "not a pem")
    assert cli.main(["join", "--gateway", "gw:1"]) == 2
    assert "ca_pem (KOINON_CA_CERT): holds no PEM certificate" in capsys.readouterr().err


def test_job_code_does_not_inherit_the_agents_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOINON_TOKEN", "abcdef.0123456789abcdef")
    monkeypatch.setenv("KOINON_CA_CERT", "-----BEGIN CERTIFICATE-----")
    monkeypatch.setenv("KOINON_PROXY_SECRET", "0123456789abcdef")
    proxy_url = "http://koinon:0123456789abcdef@127.0.0.1:1"
    settings = RaySettings("/opt/ray/bin/ray", Path("/tmp/ray"), proxy_url, None, 0, 0, None)
    env = ray_environment(settings, pb.Assignment(address="127.0.20.1", ray_auth_token="ray-secret"))
    assert "KOINON_TOKEN" not in env and "KOINON_CA_CERT" not in env and "KOINON_PROXY_SECRET" not in env
    assert env["RAY_AUTH_TOKEN"] == "ray-secret" and env["grpc_proxy"] == proxy_url


def test_a_bare_ray_bin_puts_its_own_directory_first_on_rays_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--ray-bin ray` is looked up on PATH; abspath("ray") put the working directory first, where
    job drivers then found `python`."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "ray").write_text("#!/bin/sh\n")
    (bin_dir / "ray").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin")
    monkeypatch.chdir(tmp_path)
    settings = RaySettings("ray", Path("/tmp/ray"), "http://127.0.0.1:1", None, 0, 0, None)
    path = ray_environment(settings, pb.Assignment(address="127.0.20.1"))["PATH"].split(os.pathsep)
    assert path[0] == str(bin_dir) and str(tmp_path) not in path


@pytest.mark.parametrize("set_by_the_agent", [True, False])
def test_ray_inherits_grpc_experiments_only_from_the_user(
    monkeypatch: pytest.MonkeyPatch, set_by_the_agent: bool
) -> None:
    from koinon_gateway import event_loop

    monkeypatch.setattr(event_loop, "GRPC_EXPERIMENTS_SET_HERE", set_by_the_agent)
    monkeypatch.setenv("GRPC_EXPERIMENTS", event_loop.GRPC_EXPERIMENTS)
    settings = RaySettings("/opt/ray/bin/ray", Path("/tmp/ray"), "http://127.0.0.1:1", None, 0, 0, None)
    env = ray_environment(settings, pb.Assignment(address="127.0.20.1"))
    assert ("GRPC_EXPERIMENTS" in env) is not set_by_the_agent


def test_the_agent_process_sets_grpc_experiments_for_itself_only_when_unset() -> None:
    code = "import koinon_agent.cli; from koinon_gateway import event_loop as e; print(e.GRPC_EXPERIMENTS_SET_HERE)"
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    ran = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "True"
    env["GRPC_EXPERIMENTS"] = "-some_experiment"
    ran = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "False"


def test_an_identity_with_a_field_of_a_later_version_is_read(tmp_path: Path) -> None:
    """After a rollback, an identity a later agent stored (with a field this one does not know)
    was set aside as corrupt: a token use and a new VolunteerNode, or exit 2 without a token."""
    state_dir = tmp_path / "agent"
    state_dir.mkdir(mode=0o700)
    state.save(state_dir, state.StoredIdentity("gw:443", "vn-a", "127.0.20.1", "cred", 2_000_000_000, "sha256:ab"))
    path = state_dir / "identity.json"
    path.write_text(path.read_text().rstrip().rstrip("}") + ', "added_later": 1}')
    loaded = state.load(state_dir, can_rejoin=True)
    assert loaded is not None and (loaded.credential, loaded.trusted_ca) == ("cred", "sha256:ab")


async def test_an_expired_credential_without_a_token_names_where_the_token_was_to_come_from(tmp_path: Path) -> None:
    """A joined node offline longer than its credential lives needs its token again; with the
    chart's optional Secret reference a misspelt Secret leaves none, and KOINON_TOKEN_HINT says so."""
    state.save(tmp_path, state.StoredIdentity("gw:1", "vn-a", "127.0.20.1", "cred", 123, "insecure"))
    hint = 'Secret "koinon-jion" (key "token") in namespace v was not found or is empty'
    agent = Agent(AgentConfig(gateway="gw:1", insecure=True, state_dir=tmp_path, token_hint=hint))
    with pytest.raises(JoinRefused, match='join again with a new token; none came: Secret "koinon-jion"'):
        await agent._ensure_identity()


@pytest.mark.parametrize("expires_at", [2**62, 2**63 - 1, -(2**62)])
async def test_a_refused_credential_with_an_expiry_no_calendar_holds_is_still_reported(
    tmp_path: Path, expires_at: int
) -> None:
    """A hostile or broken gateway can renew the credential with any int64 expiry; refused later,
    the agent must still say why rather than fail formatting a date."""
    state.save(tmp_path, state.StoredIdentity("gw:1", "vn-a", "127.0.20.1", "cred", expires_at, "insecure"))
    agent = Agent(AgentConfig(gateway="gw:1", insecure=True, state_dir=tmp_path))
    with pytest.raises(JoinRefused, match=r"credential of vn-a refused by the gateway \(key changed\); join again"):
        await agent._ensure_identity("key changed")


async def test_joining_again_names_the_identity_in_use_when_the_disk_holds_an_older_one(tmp_path: Path) -> None:
    """A credential the disk could not take (a full disk after a join or a renewal) is the one in
    use: refused, it is the node the agent names (and, with a token, the Join's previous one)."""
    state.save(tmp_path, state.StoredIdentity("gw:1", "vn-old", "127.0.20.1", "cred-old", 2_000_000_000, "insecure"))
    agent = Agent(AgentConfig(gateway="gw:1", insecure=True, state_dir=tmp_path))
    agent.identity = state.StoredIdentity("gw:1", "vn-new", "127.0.20.2", "cred-new", 2_000_000_000, "insecure")
    agent._identity_unsaved = True
    with pytest.raises(JoinRefused, match="credential of vn-new refused by the gateway"):
        await agent._ensure_identity("key changed")


def test_setting_modes_back_leaves_shared_and_root_dirs_alone(tmp_path: Path) -> None:
    """A root agent given a shared scratch dir (here as /tmp is: 1777) must not take others' write
    from it, nor may an agent of its own user whose sticky dir it is."""
    from koinon_agent import state as agent_state

    from .helpers import as_non_root

    shared = tmp_path / "scratch"
    shared.mkdir()
    shared.chmod(0o1777)
    agent_state.restore_state_dir_modes(shared)  # as root, whatever owns it
    assert shared.stat().st_mode & 0o7777 == 0o1777
    tmp_path.chmod(0o755)
    os.chown(shared, 65534, 65534)
    assert as_non_root(65534, lambda: agent_state.restore_state_dir_modes(shared)) == ""
    assert shared.stat().st_mode & 0o7777 == 0o1777


@pytest.mark.parametrize("trusted_ca", ["sha256:ab", "system", ""])
async def test_a_credential_issued_over_tls_is_never_sent_in_plaintext(tmp_path: Path, trusted_ca: str) -> None:
    """The same gateway address, the agent switched to --insecure: the stored credential (issued
    under a CA, or the system's trust store, or by an agent that did not record which) would cross
    the network readable by anyone on the way.
    The agent joins afresh instead: here, without a token, it refuses to go on."""
    state.save(tmp_path, state.StoredIdentity("gw:1", "vn-a", "127.0.20.1", "cred", 2_000_000_000, trusted_ca))
    agent = Agent(AgentConfig(gateway="gw:1", insecure=True, state_dir=tmp_path))
    with pytest.raises(ValueError, match="token: required for the first join"):
        await agent._ensure_identity()


async def test_a_credential_issued_in_plaintext_is_reused_in_plaintext(tmp_path: Path) -> None:
    stored = state.StoredIdentity("gw:1", "vn-a", "127.0.20.1", "cred", 2_000_000_000, "insecure")
    state.save(tmp_path, stored)
    agent = Agent(AgentConfig(gateway="gw:1", insecure=True, state_dir=tmp_path))
    assert await agent._ensure_identity() == stored
