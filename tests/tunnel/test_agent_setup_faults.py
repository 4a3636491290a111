"""The agent's configuration, GPU exposure and state dir as volunteers meet them: IPv6 addresses,
`--simulate-gpus 0` on a GPU machine, a read-only or unreadable state dir, two agents on one state
dir, the CA file before a CA left in the environment, a token read from a Secret file."""

from __future__ import annotations

import asyncio
import errno
import os
import types
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from koinon_agent import agent as agent_module
from koinon_agent import cli, state
from koinon_agent.agent import Agent
from koinon_agent.config import AgentConfig
from koinon_agent.ray_node import ray_environment
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import Cluster, cluster


@pytest.mark.parametrize("gateway", ["::1", "fe80::1", "2001:db8::7443"])
def test_an_unbracketed_ipv6_address_is_refused_as_host_port(gateway: str) -> None:
    config = AgentConfig(gateway=gateway, token="abcdef.0123456789abcdef", insecure=True)
    with pytest.raises(ValueError, match="gateway: expected host:port"):
        config.validate()


class _Stop(BaseException):
    """Ends the Ray supervisor from a stand-in's start(): not an Exception, which it retries."""


def test_simulate_gpus_zero_keeps_real_gpus_hidden_from_job_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The volunteer hid its GPUs (CUDA_VISIBLE_DEVICES="") and declared none (--simulate-gpus 0).
    Ray is started with --num-gpus=0 but without CUDA_VISIBLE_DEVICES: Ray sets that variable only
    for tasks that were given GPUs, so every task and actor on this node sees every card."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    seen: list[object] = []

    class RecordingRayNode:
        def __init__(self, settings: object) -> None:
            seen.append(settings)

        async def start(self, assignment: pb.Assignment) -> None:
            raise _Stop

    monkeypatch.setattr(agent_module, "RayNode", RecordingRayNode)
    config = AgentConfig(
        gateway="127.0.0.1:1", token="abcdef.0123456789abcdef", insecure=True, state_dir=tmp_path / "s",
        simulate_gpus=0,
    )  # fmt: skip
    agent = Agent(config)
    agent._proxy = types.SimpleNamespace(url="http://127.0.0.1:1")  # type: ignore[assignment]
    agent.assignment = pb.Assignment(address="127.0.20.1")
    with pytest.raises(_Stop):
        asyncio.run(agent._supervise_ray())
    env = ray_environment(seen[0], agent.assignment)  # type: ignore[arg-type]
    assert env.get("CUDA_VISIBLE_DEVICES") == ""


def test_a_corrupt_identity_on_a_read_only_state_dir_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "identity.json").write_text("{")  # a disk that lost the last write

    real_replace = os.replace

    def read_only_replace(src: object, dst: object) -> None:
        if Path(str(src)).parent == state_dir:
            raise OSError(errno.EROFS, "Read-only file system", str(src))
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr("os.replace", read_only_replace)
    argv = ["join", "--gateway", "127.0.0.1:1", "--insecure", "--no-ray", "--state-dir", str(state_dir),
            "--token", "abcdef.0123456789abcdef"]  # fmt: skip
    code = cli.main(argv)  # raised OSError out of main: a traceback and exit 1
    assert code == 2
    assert "identity.json" in capsys.readouterr().err


@pytest.fixture
async def c(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(tmp_path) as result:
        yield result


async def test_a_second_agent_on_the_same_state_dir_is_refused(c: Cluster) -> None:
    """Both would present one credential: each registration replaces the other's session, and two
    Ray nodes would claim one address and one temp dir."""
    first = await c.start_agent("alpha")
    assert first.identity is not None
    second = Agent(c.agent_config("alpha"))  # same state dir, e.g. a systemd unit and a manual run
    task = asyncio.ensure_future(second.run())
    c.agents.append((second, task))
    done, _ = await asyncio.wait({task}, timeout=3)
    assert task in done, "the second agent runs on the first one's state dir (and credential)"
    assert isinstance(task.exception(), state.StateError)


def test_an_identity_that_cannot_be_read_for_lack_of_permission_is_not_set_aside(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """E.g. a first `sudo koinon-agent join` left a root-owned 0600 identity.json: the agent (with
    its token still set) moves the good credential away and joins as a new node."""
    good = state.StoredIdentity("gw:1", "n", "127.0.20.1", "credential", 0)
    state.save(tmp_path, good)
    real_read_text = Path.read_text

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        if self.name == "identity.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(state.StateError, match=r"identity\.json"):
        state.load(tmp_path, can_rejoin=True)
    assert (tmp_path / "identity.json").exists()


def test_a_ca_file_flag_wins_over_the_ca_cert_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from koinon_agent import channel
    from koinon_gateway.pki import create_ca

    old, new = create_ca("old-ca").cert_pem, create_ca("new-ca").cert_pem
    monkeypatch.setenv("KOINON_CA_CERT", old.decode())  # left in the volunteer's environment
    (tmp_path / "ca.pem").write_bytes(new)
    args = cli.build_parser().parse_args(
        [
            "join",
            "--gateway",
            "gw.example.org:7443",
            "--ca-file",
            str(tmp_path / "ca.pem"),
            "--state-dir",
            str(tmp_path),
        ]
    )
    config = cli.config_from_args(args)
    roots: list[bytes | None] = []
    monkeypatch.setattr("grpc.ssl_channel_credentials", lambda root_certificates=None: roots.append(root_certificates))
    monkeypatch.setattr("grpc.aio.secure_channel", lambda *a, **k: None)
    channel.open_channel(config)
    assert roots == [new]


def test_a_token_variable_of_only_whitespace_counts_as_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kubectl create secret generic koinon-join --from-file=token=./token` where the file is
    just a newline: the agent takes "\\n" for a token (so can_rejoin sets a corrupt identity aside
    and then the join is refused) instead of saying that no token is set."""
    monkeypatch.setenv("KOINON_TOKEN", "abcdef.0123456789abcdef\n")
    args = cli.build_parser().parse_args(["join", "--gateway", "gw.example.org:7443", "--insecure"])
    assert cli.config_from_args(args).token == "abcdef.0123456789abcdef"
    monkeypatch.setenv("KOINON_TOKEN", "\n")
    args = cli.build_parser().parse_args(["join", "--gateway", "gw.example.org:7443", "--insecure"])
    assert cli.config_from_args(args).token == ""
