"""GatewayConfig.validate: the head's Ray ports must not open the gateway's own ports to volunteers,
and volunteers' virtual addresses must not include the head's address."""

from __future__ import annotations

import pytest
from koinon_gateway.config import MAX_UINT32, GatewayConfig, milliseconds
from koinon_gateway.main import BootstrapToken, build_parser, config_from_args, main, parse_bootstrap_token
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

HEAD = "127.0.10.1"


def test_defaults_validate() -> None:
    GatewayConfig().validate()


def test_head_port_range_covering_the_admin_port_is_refused() -> None:
    config = GatewayConfig(
        head_address=HEAD, listen="unix:/tmp/gw.sock", admin_listen="0.0.0.0:7481", head_port_ranges=[(7000, 8000)]
    )
    with pytest.raises(ValueError, match=r"^head_port_ranges: 7000-8000 includes 7481, the port of admin_listen"):
        config.validate()


def test_head_port_range_covering_the_agent_port_is_refused() -> None:
    config = GatewayConfig(head_address=HEAD, listen="0.0.0.0:7443", head_port_ranges=[(7000, 8000)])
    with pytest.raises(ValueError, match=r"^head_port_ranges: 7000-8000 includes 7443, the port of listen"):
        config.validate()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("head_gcs_port", 7443, r"^head_gcs_port: 7443 is the port of listen \(\[::\]:7443\)"),
        ("head_ports", [7443], r"^head_ports: 7443 is the port of listen"),
        ("head_port_ranges", [(7443, 7443)], r"^head_port_ranges: 7443-7443 includes 7443, the port of listen"),
    ],
)
def test_each_head_port_setting_is_named(field: str, value: object, message: str) -> None:
    config = GatewayConfig(head_address=HEAD, listen="[::]:7443")
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        config.validate()


@pytest.mark.parametrize("host", [HEAD, "0.0.0.0", "", "gateway.example.org"])
def test_listeners_that_answer_at_the_head_address_are_checked(host: str) -> None:
    config = GatewayConfig(head_address=HEAD, head_proxy_listen=f"{host}:7480", head_ports=[7480])
    with pytest.raises(ValueError, match=r"head_ports: 7480 is the port of head_proxy_listen"):
        config.validate()


@pytest.mark.parametrize(
    ("listen", "admin_listen"),
    [
        # Bound to another loopback address: head_address:7481 reaches nothing of the gateway.
        ("127.0.0.1:7443", "127.0.0.1:7481"),
        # A Unix socket, or a free port: nothing to check before binding.
        ("unix:/tmp/gw.sock", "0.0.0.0:0"),
    ],
)
def test_listeners_out_of_the_heads_reach_pass(listen: str, admin_listen: str) -> None:
    GatewayConfig(
        head_address=HEAD, listen=listen, admin_listen=admin_listen, head_port_ranges=[(7000, 8000)]
    ).validate()


def test_vip_cidr_containing_the_head_address_is_refused() -> None:
    config = GatewayConfig(head_address=HEAD, vip_cidr="127.0.8.0/22")
    with pytest.raises(ValueError, match=r"^vip_cidr: 127.0.8.0/22 contains head_address 127.0.10.1"):
        config.validate()


def test_vip_cidr_that_does_not_parse_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^vip_cidr: "):
        GatewayConfig(vip_cidr="127.0.20.1/22").validate()  # host bits set


def test_vip_cidr_beside_the_head_address_passes() -> None:
    GatewayConfig(head_address=HEAD, vip_cidr="127.0.20.0/22").validate()
    GatewayConfig(head_address="ray-head.local", vip_cidr="127.0.20.0/22").validate()


@pytest.mark.parametrize(
    "argv",
    [
        # manifests/gateway/deployment.yaml
        [
            "--listen=0.0.0.0:7443",
            "--head-proxy-listen=127.0.0.1:7480",
            "--admin-listen=0.0.0.0:7481",
            f"--head-address={HEAD}",
            "--head-gcs-port=6379",
            "--head-ports=6380,6381,10002-10100",
            "--vip-cidr=127.0.20.0/22",
        ],
        # koinon dev up (koinon_dev/tunnel_plane.py; its head ports are drawn at start, its listeners
        # are a Unix socket and free ports): the lowest and highest vip octet it draws
        *(
            [
                "--listen=unix:/tmp/gw.sock",
                "--head-proxy-listen=127.0.0.1:0",
                "--admin-listen=127.0.0.1:0",
                f"--head-address={HEAD}",
                "--head-gcs-port=6379",
                "--head-ports=6380,6381,10002-10100",
                f"--vip-cidr=127.{octet}.0.0/24",
            ]
            for octet in (20, 219)
        ),
    ],
)
def test_configurations_in_use_validate(argv: list[str]) -> None:
    config_from_args(build_parser().parse_args(argv)).validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("heartbeat_interval_s", -1.0),
        ("heartbeat_interval_s", float("nan")),
        ("heartbeat_timeout_s", float("nan")),
        ("credential_lifetime_s", float("nan")),
        ("credential_lifetime_s", float("inf")),
        ("first_frame_timeout_s", 0.0),
        ("accept_timeout_s", -5.0),
    ],
)
def test_timings_must_be_finite_and_positive(field: str, value: float) -> None:
    """NaN passed every comparison, and a negative interval failed only at each join, after its
    token use had been counted (UNKNOWN to the agent, a VolunteerNode left behind)."""
    with pytest.raises(ValueError, match=rf"^{field}: must be a finite number of seconds > 0"):
        GatewayConfig(**{field: value}).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("abcdef.0123456789abcdef", BootstrapToken("abcdef.0123456789abcdef", None, "bootstrap")),
        ("abcdef.0123456789abcdef:3", BootstrapToken("abcdef.0123456789abcdef", 3, "bootstrap")),
        ("abcdef.0123456789abcdef:2:alice", BootstrapToken("abcdef.0123456789abcdef", 2, "alice")),
        ("abcdef.0123456789abcdef::alice", BootstrapToken("abcdef.0123456789abcdef", None, "alice")),
    ],
)
def test_bootstrap_tokens_parse_with_an_owner(entry: str, expected: BootstrapToken) -> None:
    assert parse_bootstrap_token(entry) == expected


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("not-a-token", "expected '<6 chars"),
        ("abcdef.0123456789abcdef:0", "usage limit must be a whole number >= 1, got '0'"),
        ("abcdef.0123456789abcdef:-3", "usage limit must be a whole number >= 1, got '-3'"),
        ("abcdef.0123456789abcdef:many", "usage limit must be a whole number >= 1"),
    ],
)
def test_a_bad_bootstrap_token_stops_the_gateway_with_a_message(
    entry: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--store=memory", "--listen=127.0.0.1:0", "--head-proxy-listen=127.0.0.1:0", "--admin-listen=127.0.0.1:0"]
    assert main([*argv, "--head-address=127.0.0.1", f"--bootstrap-token={entry}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("koinon-gateway: --bootstrap-token: ") and message in err and "Traceback" not in err
    assert "0123456789abcdef" not in err


def test_a_status_refresh_slower_than_the_operator_trusts_is_refused() -> None:
    # The operator takes a Ready status whose lastHeartbeat is over 120 s old as left by a stopped
    # gateway (no uptime evidence): a refresh every 300 s quietly cost healthy nodes theirs.
    from koinon_operator.reputation_book import SILENT_STATUS_S

    config = GatewayConfig(status_write_interval_s=300.0)
    with pytest.raises(ValueError, match=r"^status_write_interval_s \+ heartbeat_interval_s: at most 60 s"):
        config.validate()
    GatewayConfig(status_write_interval_s=55.0, heartbeat_interval_s=5.0).validate()
    assert SILENT_STATUS_S >= 2 * (55.0 + 5.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # 58 days: finite and above the interval, but its milliseconds overflow a uint32.
        ({"heartbeat_timeout_s": 5_000_000.0}, "heartbeat_timeout_s: must be within 0.001-4294967.295 s"),
        ({"heartbeat_interval_s": 0.0005}, "heartbeat_interval_s: must be within 0.001-4294967.295 s"),
        ({"rtt_probe_every": 10**9}, r"heartbeat_interval_s \* rtt_probe_every: must be within"),
        ({"rtt_probe_every": 0}, "rtt_probe_every: must be at least 1"),
    ],
)
def test_heartbeat_timings_agents_get_in_milliseconds_must_fit_their_fields(
    overrides: dict[str, object], message: str
) -> None:
    """The Assignment carries them as uint32 milliseconds: past that every Join failed after its
    node was made and its token use counted (ValueError building the reply, UNKNOWN to the agent),
    and under 1 ms an agent read 0 as "not set" and used its own default."""
    with pytest.raises(ValueError, match=rf"^{message}"):
        GatewayConfig(**overrides).validate()  # type: ignore[arg-type]


def test_the_largest_accepted_heartbeat_timings_fit_an_assignment() -> None:
    config = GatewayConfig(heartbeat_timeout_s=MAX_UINT32 / 1000, rtt_probe_every=MAX_UINT32 // 2000)
    config.validate()
    pb.Assignment(
        heartbeat_interval_ms=milliseconds(config.heartbeat_interval_s),
        heartbeat_timeout_ms=milliseconds(config.heartbeat_timeout_s),
        rtt_probe_interval_ms=milliseconds(config.heartbeat_interval_s * config.rtt_probe_every),
    )


def test_ray_nodes_are_verified_unless_a_test_or_benchmark_says_not() -> None:
    base = ["--head-address=10.0.0.1"]
    deployed = config_from_args(build_parser().parse_args(base))
    assert deployed.verify_ray_nodes
    # The heartbeat the gateway runs with unflagged is GatewayConfig's (what the bench measures as deployed).
    assert (deployed.heartbeat_interval_s, deployed.heartbeat_timeout_s) == (
        GatewayConfig.heartbeat_interval_s,
        GatewayConfig.heartbeat_timeout_s,
    )
    assert not config_from_args(build_parser().parse_args([*base, "--no-verify-ray-nodes"])).verify_ray_nodes
