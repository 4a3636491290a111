"""The agent's configuration from flags and KOINON_* variables, and its reconnect backoff."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path

import pytest
from koinon_agent import channel, cli
from koinon_agent.agent import Agent, BackoffIterator
from koinon_agent.config import ENV_VARS, VERSION, AgentConfig
from koinon_gateway.pki import create_ca

from .helpers import cluster

# One distinct, non-default value per variable the agent reads (KOINON_INSECURE is tested alone:
# it cannot be combined with a CA).
ENV_VALUES = {
    "KOINON_GATEWAY": "gateway.example:443",
    "KOINON_TOKEN": "abcdef.0123456789abcdef",
    "KOINON_TOKEN_HINT": 'Secret "my-join" (key "token")',
    "KOINON_STATE_DIR": "/var/lib/koinon-agent",
    "KOINON_CA_FILE": "",  # a file holding a certificate, written by the test
    "KOINON_CA_CERT": create_ca().cert_pem.decode(),
    "KOINON_CA_CERT_HASH": "sha256:" + "ab" * 32,
    "KOINON_TLS_SERVER_NAME": "koinon-gateway",
    "KOINON_NODE_NAME": "alice-desktop",
    "KOINON_REGION": "eu-west",
    "KOINON_SIMULATE_GPUS": "3",
    "KOINON_SIMULATE_GPU_MEMORY": "8192",
    "KOINON_NUM_CPUS": "4",
    "KOINON_OBJECT_STORE_MEMORY": "100000000",
    "KOINON_RAY_BIN": "/opt/ray/bin/ray",
    "KOINON_TEMP_DIR": "/tmp/koinon-ray",
    "KOINON_HEALTH_FILE": "/tmp/koinon-agent/health.json",
    "KOINON_DRAIN_GRACE": "0",  # zero is a real choice (stop at once), not "unset"
    "KOINON_PROXY_PORT": "7999",
    "KOINON_PROXY_SECRET": "bench-0123456789abcdef",
    "KOINON_RAY_RESTART_AFTER": "12.5",
}
EXPECTED: dict[str, object] = {
    "gateway": "gateway.example:443",
    "token": "abcdef.0123456789abcdef",
    "token_hint": 'Secret "my-join" (key "token")',
    "state_dir": Path("/var/lib/koinon-agent"),
    "ca_file": None,  # the file the test wrote
    "ca_pem": ENV_VALUES["KOINON_CA_CERT"].encode(),
    "ca_cert_hash": "sha256:" + "ab" * 32,
    "tls_server_name": "koinon-gateway",
    "name_hint": "alice-desktop",
    "region": "eu-west",
    "simulate_gpus": 3,
    "simulate_gpu_memory_mib": 8192,
    "num_cpus": 4,
    "object_store_memory": 100_000_000,
    "ray_bin": "/opt/ray/bin/ray",
    "temp_dir": Path("/tmp/koinon-ray"),
    "health_file": Path("/tmp/koinon-agent/health.json"),
    "drain_grace_s": 0.0,
    "proxy_port": 7999,
    "proxy_secret": "bench-0123456789abcdef",
    "ray_restart_after_s": 12.5,
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def config_from(argv: list[str]) -> AgentConfig:
    return cli.config_from_args(cli.build_parser().parse_args(["join", *argv]))


def test_every_variable_sets_its_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert set(ENV_VALUES) | {"KOINON_INSECURE"} == set(ENV_VARS), "give each new variable a value above"
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(ENV_VALUES["KOINON_CA_CERT"])
    for name, value in {**ENV_VALUES, "KOINON_CA_FILE": str(ca_file)}.items():
        monkeypatch.setenv(name, value)
    config = config_from([])
    for name, field in ENV_VARS.items():
        if name not in ("KOINON_INSECURE", "KOINON_CA_FILE"):
            assert getattr(config, field) == EXPECTED[field], name
    assert config.ca_file == ca_file
    assert config.insecure is False


@pytest.mark.parametrize(
    ("value", "insecure"), [("1", True), ("true", True), ("Yes", True), ("0", False), ("false", False), ("", False)]
)
def test_insecure_variable(monkeypatch: pytest.MonkeyPatch, value: str, insecure: bool) -> None:
    monkeypatch.setenv("KOINON_GATEWAY", "gw:1")
    monkeypatch.setenv("KOINON_INSECURE", value)
    assert config_from([]).insecure is insecure
    assert config_from(["--insecure"]).insecure is True


def test_an_insecure_variable_that_is_neither_yes_nor_no_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Taken as "off" before: the agent then dialled TLS without a CA and retried for ever.
    monkeypatch.setenv("KOINON_INSECURE", "ture")
    assert cli.main(["join", "--gateway", "gw:1"]) == 2
    assert "KOINON_INSECURE: expected one of" in capsys.readouterr().err


def test_flags_win_over_variables_and_defaults_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOINON_GATEWAY", "gw:1")
    defaults = config_from([])
    assert (defaults.drain_grace_s, defaults.ray_restart_after_s, defaults.proxy_port) == (30.0, 60.0, 0)
    assert defaults.num_cpus is None and defaults.simulate_gpus is None
    monkeypatch.setenv("KOINON_RAY_RESTART_AFTER", "5")
    monkeypatch.setenv("KOINON_NUM_CPUS", "")  # empty (as templates render) counts as unset
    config = config_from(["--gateway", "other:2", "--ray-restart-after", "7"])
    assert (config.gateway, config.ray_restart_after_s, config.num_cpus) == ("other:2", 7.0, None)


@pytest.mark.parametrize(
    ("variable", "value", "flag"),
    [
        ("KOINON_NUM_CPUS", "four", "--num-cpus"),
        ("KOINON_DRAIN_GRACE", "30s", "--drain-grace"),
        ("KOINON_RAY_RESTART_AFTER", "1m", "--ray-restart-after"),
    ],
)
def test_non_number_variable_is_refused_naming_flag_and_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str, flag: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        cli.main(["join", "--gateway", "gw:1"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert flag in error and variable in error and repr(value) in error


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--ray-restart-after", "0"], "ray_restart_after_s"),
        (["--drain-grace", "-1"], "drain_grace_s"),
        # Beyond what DrainRequest.grace_seconds (uint32) carries, or not finite: the first
        # SIGTERM used to crash the agent building the DrainRequest, and Ray stopped at once.
        (["--drain-grace", "inf"], "drain_grace_s"),
        (["--drain-grace", "1e10"], "drain_grace_s"),
        (["--drain-grace", "nan"], "drain_grace_s"),
        # NaN: `outage > nan` is never true, so Ray was never restarted after an outage.
        (["--ray-restart-after", "nan"], "ray_restart_after_s"),
        (["--proxy-port", "70000"], "proxy_port"),
        # Ray refuses these after the join has spent the token, and its supervisor retried for ever.
        (["--num-cpus", "-1"], "num_cpus"),
        (["--object-store-memory", "-100000000"], "object_store_memory"),
        (["--object-store-memory", "78643199"], "object_store_memory"),  # under Ray's 75 MiB
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(
    capsys: pytest.CaptureFixture[str], argv: list[str], field: str
) -> None:
    assert cli.main(["join", "--gateway", "gw:1", *argv]) == 2
    assert field in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag", "variable"),
    [
        # What the gateway takes in a JoinRequest (koinon_gateway.limits). These passed, then the
        # join was refused (exit 3, "refused", as for a bad token), or building it raised a
        # protobuf "Value out of range" naming nothing; 10**8 GPUs were 10**8 objects first; and
        # with a stored identity, Register clamped to 64 GPUs while Ray ran with 65.
        (["--simulate-gpus", "65"], "--simulate-gpus", "KOINON_SIMULATE_GPUS"),
        (["--simulate-gpus", "100000000"], "--simulate-gpus", "KOINON_SIMULATE_GPUS"),
        (["--simulate-gpus", "-1"], "--simulate-gpus", "KOINON_SIMULATE_GPUS"),
        (
            ["--simulate-gpus", "1", "--simulate-gpu-memory", str((1 << 24) + 1)],
            "--simulate-gpu-memory",
            "KOINON_SIMULATE_GPU_MEMORY",
        ),
        (
            ["--simulate-gpus", "1", "--simulate-gpu-memory", str(1 << 64)],
            "--simulate-gpu-memory",
            "KOINON_SIMULATE_GPU_MEMORY",
        ),
        (["--simulate-gpus", "1", "--simulate-gpu-memory", "0"], "--simulate-gpu-memory", "KOINON_SIMULATE_GPU_MEMORY"),
        (["--region", "r" * 129], "--region", "KOINON_REGION"),
    ],
)
def test_values_the_gateway_refuses_are_bad_configuration(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str, variable: str
) -> None:
    assert cli.main(["join", "--gateway", "gw:1", *argv]) == 2
    error = capsys.readouterr().err
    assert flag in error and variable in error


def test_the_gateways_largest_values_are_taken() -> None:
    from koinon_gateway.limits import MAX_GPU_MEMORY_MIB, MAX_GPUS, MAX_TEXT
    from koinon_gateway.service import validate_join
    from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

    config = config_from(
        [
            "--gateway", "gw:1",
            "--simulate-gpus", str(MAX_GPUS),
            "--simulate-gpu-memory", str(MAX_GPU_MEMORY_MIB),
            "--node-name", "n" * MAX_TEXT,
            "--region", "r" * MAX_TEXT,
        ]
    )  # fmt: skip
    assert config.simulate_gpus is not None
    gpu = pb.Gpu(model="Simulated GPU", memory_mib=config.simulate_gpu_memory_mib)
    validate_join(
        pb.JoinRequest(
            name_hint=config.name_hint, region=config.region, gpus=[gpu] * config.simulate_gpus, agent_version=VERSION
        )
    )


# A legal Kubernetes node name (a DNS subdomain, at most 253 characters): the chart sets
# KOINON_NODE_NAME from spec.nodeName.
LONG_NODE_NAME = ".".join(["worker-" + "x" * 40] * 4) + ".example.internal"  # 209 characters


def test_a_long_node_name_is_a_hint_cut_short_for_the_join(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused as bad configuration (exit 2) before, on every start: an agent already joined on a
    long-named node crash-looped, though the hint only serves a join."""
    from koinon_gateway.limits import MAX_TEXT
    from koinon_gateway.service import node_name_from_hint, validate_join
    from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

    monkeypatch.setenv("KOINON_NODE_NAME", "n" * 253)
    assert config_from(["--gateway", "gw:1"]).join_name_hint == "n" * MAX_TEXT
    config = config_from(["--gateway", "gw:1", "--node-name", LONG_NODE_NAME])
    assert config.name_hint == LONG_NODE_NAME and config.join_name_hint == LONG_NODE_NAME[:MAX_TEXT]
    # The gateway takes a long hint from an agent that sends it whole (one from before the limits).
    validate_join(pb.JoinRequest(name_hint=LONG_NODE_NAME))
    assert node_name_from_hint(LONG_NODE_NAME).startswith("worker-" + "x" * 33 + "-")


async def test_an_agent_already_joined_starts_on_a_node_with_a_long_kubernetes_name(tmp_path: Path) -> None:
    async with cluster(tmp_path, tls=False) as c:
        first = await c.start_agent("short")
        assert first.identity is not None
        first.request_drain()
        await asyncio.wait_for(c.agents[-1][1], 10)
        agent = Agent(c.agent_config("short", name_hint=LONG_NODE_NAME))  # raised ValueError (exit 2)
        c.agents.append((agent, asyncio.ensure_future(agent.run())))
        await asyncio.wait_for(agent.connected.wait(), 15)
        assert agent.identity is not None and agent.identity.node_name == first.identity.node_name


async def test_a_first_join_on_a_node_with_a_long_kubernetes_name(tmp_path: Path) -> None:
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent(LONG_NODE_NAME)
        assert agent.identity is not None and agent.identity.node_name.startswith("worker-")


@pytest.mark.parametrize("secret", ["too-short", "has space in it here", "a:b@c/d?e#f%20xxxxxxxx", "x" * 257])
def test_a_proxy_secret_that_does_not_fit_a_url_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], secret: str
) -> None:
    monkeypatch.setenv("KOINON_PROXY_SECRET", secret)
    assert cli.main(["join", "--gateway", "gw:1"]) == 2
    error = capsys.readouterr().err
    assert "proxy_secret (KOINON_PROXY_SECRET)" in error and secret not in error


def test_backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() -> None:
    random.seed(7)
    backoff = BackoffIterator(0.5, 30.0)
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    for ceiling in ceilings:
        delay = backoff.next()
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5


def test_backoff_spreads_agents_that_lost_the_gateway_together() -> None:
    random.seed(11)
    first_retries = []
    for _ in range(200):  # 200 agents, each at its 6th attempt (ceiling 16 s)
        backoff = BackoffIterator(0.5, 30.0)
        for _ in range(5):
            backoff.next()
        first_retries.append(backoff.next())
    assert min(first_retries) >= 8 and max(first_retries) <= 16
    assert max(first_retries) - min(first_retries) > 6  # spread over most of the window


def test_backoff_keeps_working_after_days_of_retries() -> None:
    # At 30 s per try, 10,000 tries is about 3.5 days offline; the ceiling once overflowed a float
    # after ~1,024 tries and crashed the agent.
    backoff = BackoffIterator(0.5, 30.0)
    delays = [backoff.next() for _ in range(10_000)]
    assert all(15.0 <= d <= 30.0 for d in delays[10:])


@pytest.mark.parametrize("insecure", [False, True])
def test_channels_redial_the_gateway_on_the_agents_schedule(monkeypatch: pytest.MonkeyPatch, insecure: bool) -> None:
    """A channel waiting out gRPC's reconnect backoff fails the agent's calls without dialling, so
    its backoff, not the agent's, said when a volunteer was back: gRPC's default grows to 120 s.
    gRPC draws each delay from [0.8, 1.2] times its backoff; set to 0.75 times the agent's, every
    delay lies in the upper half of the agent's ceiling, as the agent's own do."""
    opened: list[dict[str, int]] = []
    monkeypatch.setattr("grpc.aio.insecure_channel", lambda target, options: opened.append(dict(options)))
    monkeypatch.setattr("grpc.aio.secure_channel", lambda target, credentials, options: opened.append(dict(options)))
    channel.open_channel(AgentConfig(gateway="gw.example.org:7443", insecure=insecure))  # 0.5 s to 30 s
    (options,) = opened
    initial, maximum = options["grpc.initial_reconnect_backoff_ms"], options["grpc.max_reconnect_backoff_ms"]
    assert (initial, maximum) == (375, 22_500)
    for backoff_ms, ceiling_ms in ((initial, 500), (maximum, 30_000)):
        assert ceiling_ms / 2 <= 0.8 * backoff_ms and 1.2 * backoff_ms <= ceiling_ms
    # The least time one connection attempt is given (20 s by default), despite its name.
    assert "grpc.min_reconnect_backoff_ms" not in options
    assert options["grpc.max_receive_message_length"]  # the shared options are still there


async def test_a_backoff_too_long_for_grpc_is_capped_not_refused() -> None:
    config = AgentConfig(gateway="127.0.0.1:9", insecure=True, backoff_initial_s=1e6, backoff_max_s=1e9)
    assert dict(channel.reconnect_backoff_options(config))["grpc.max_reconnect_backoff_ms"] == 2**31 - 1  # a C int
    await channel.open_channel(config).close(None)  # gRPC takes it


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"koinon-agent {VERSION}"


def test_a_ca_file_that_is_a_directory_is_bad_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # os.access passed a directory, and reading it later escaped main() as a traceback.
    assert cli.main(["join", "--gateway", "gw:1", "--ca-file", str(tmp_path)]) == 2
    assert f"ca_file: {tmp_path}: missing or not readable" in capsys.readouterr().err


def test_a_ca_file_without_a_certificate_is_refused(tmp_path: Path) -> None:
    # Accepted before: every TLS handshake then failed and the join was retried for ever.
    garbage = tmp_path / "ca.pem"
    garbage.write_text("this is not a certificate\n")
    with pytest.raises(ValueError, match=r"ca_file: .* holds no PEM certificate"):
        AgentConfig(gateway="gw:1", ca_file=garbage).validate()


def _cut_short(pem: bytes) -> bytes:
    # What a copy-paste that lost the middle of the certificate leaves.
    lines = pem.decode().splitlines()
    return ("\n".join(lines[:2] + lines[-1:]) + "\n").encode()


def test_a_damaged_ca_is_refused_as_configuration(tmp_path: Path) -> None:
    # Accepted before (the BEGIN line was there): gRPC then failed every handshake ("Could not load
    # any root certificate") as UNAVAILABLE, and the agent retried for ever.
    damaged = _cut_short(create_ca().cert_pem)
    ca = tmp_path / "ca.crt"
    ca.write_bytes(damaged)
    with pytest.raises(ValueError, match=r"ca_file: .*ca\.crt: holds a damaged PEM certificate"):
        AgentConfig(gateway="gw.example.org:7443", ca_file=ca).validate()
    with pytest.raises(ValueError, match=r"ca_pem \(KOINON_CA_CERT\): holds a damaged PEM certificate"):
        AgentConfig(gateway="gw.example.org:7443", ca_pem=damaged).validate()
    # A bundle is fine when every certificate in it parses, and refused when one does not.
    two = create_ca().cert_pem + create_ca().cert_pem
    AgentConfig(gateway="gw.example.org:7443", ca_pem=two).validate()
    with pytest.raises(ValueError, match="damaged"):
        AgentConfig(gateway="gw.example.org:7443", ca_pem=create_ca().cert_pem + damaged).validate()


@pytest.mark.parametrize("max_age", ["nan", "0", "-5", "inf"])
def test_health_max_age_must_be_finite_and_positive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], max_age: str
) -> None:
    # With NaN, `age > nan` is false: an hour-old report passed the liveness check.
    with pytest.raises(SystemExit) as exited:
        cli.main(["health", "--health-file", str(tmp_path / "health.json"), "--max-age", max_age])
    assert exited.value.code == 2
    assert "--max-age: must be a finite number of seconds > 0" in capsys.readouterr().err


def test_join_help_names_the_variable_of_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    # The chart and systemd units set variables, people read --help: each flag says its variable.
    with pytest.raises(SystemExit):
        cli.main(["join", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    # A PEM, a secret: no place on a command line; the token's hint is for the chart to set.
    env_only = {"KOINON_CA_CERT", "KOINON_PROXY_SECRET", "KOINON_TOKEN_HINT"}
    missing = [var for var in ENV_VARS if var not in env_only and f"[{var}" not in text]
    assert "KOINON_PROXY_SECRET (environment only)" in text
    assert "KOINON_TOKEN_HINT (environment only)" in text
    assert not missing, f"flags whose help does not name their variable: {missing}"


def test_a_token_on_the_command_line_is_warned_of_without_showing_it(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A command line is readable by every local user (ps, /proc/<pid>/cmdline): --token is
    warned of once, pointing to KOINON_TOKEN; the environment is not."""
    token = "abcdef.0123456789abcdef"
    caplog.set_level(logging.WARNING)
    # Stops at the configuration (a CA file that is a directory): nothing is dialled.
    assert cli.main(["join", "--gateway", "gw:1", "--ca-file", str(tmp_path), "--token", token]) == 2
    warnings = [r.getMessage() for r in caplog.records if "--token" in r.getMessage()]
    assert len(warnings) == 1 and "KOINON_TOKEN" in warnings[0]
    assert token not in caplog.text and token not in "".join(capsys.readouterr())
    caplog.clear()
    monkeypatch.setenv("KOINON_TOKEN", token)
    assert cli.main(["join", "--gateway", "gw:1", "--ca-file", str(tmp_path)]) == 2
    assert "--token" not in caplog.text
    assert cli.main(["join", "--gateway", "gw:1", "--ca-file", str(tmp_path), "--token", token]) == 2
    assert "--token on the command line" in caplog.text  # the flag, whatever the environment holds


def test_bytes_that_are_not_utf8_in_the_name_hint_are_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The join failed with "'utf-8' codec can't encode character '\\udcff'" (exit 2, naming nothing):
    os.environ keeps undecodable bytes as lone surrogates, which a protobuf string refuses."""
    from koinon_gateway.service import node_name_from_hint, validate_join
    from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

    monkeypatch.setenv("KOINON_NODE_NAME", os.fsdecode(b"gpu-\xffbox"))
    hint = config_from(["--gateway", "gw:1"]).join_name_hint
    assert hint == "gpu-?box"
    request = pb.JoinRequest(name_hint=hint)
    validate_join(pb.JoinRequest.FromString(request.SerializeToString()))
    assert node_name_from_hint(hint).startswith("gpu-")


def test_a_region_that_is_not_utf8_is_bad_configuration(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOINON_REGION", os.fsdecode(b"eu-\xff"))
    assert cli.main(["join", "--gateway", "gw:1"]) == 2
    assert "KOINON_REGION): not valid UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("temp", ["tmp/lnk/../lib/koinon-agent", "tmp/x/../ray"])
def test_a_temp_dir_with_dotdot_is_refused_at_start(tmp_path: Path, temp: str) -> None:
    """The check of the temp dir dropped "lnk/.." by name, while Ray and the launcher got the path
    itself, which the kernel takes through the symlink: here to the state dir (every Ray start then
    refused, exit 78, for ever). One path for both: a ".." is a configuration error, said at start."""
    state = tmp_path / "var" / "lib" / "koinon-agent"
    state.mkdir(parents=True)
    (tmp_path / "tmp" / "x").mkdir(parents=True)
    (tmp_path / "tmp" / "lnk").symlink_to(tmp_path / "var" / "lib")
    assert os.path.realpath(tmp_path / "tmp/lnk/../lib/koinon-agent") == str(state)
    config = AgentConfig(gateway="h:1", state_dir=state, temp_dir=tmp_path / temp)
    with pytest.raises(ValueError, match=r"^temp_dir \(--temp-dir, KOINON_TEMP_DIR\): .* has a '\.\.' component"):
        config.validate()
    AgentConfig(gateway="h:1", state_dir=state, temp_dir=tmp_path / "tmp" / "." / "ray").validate()
