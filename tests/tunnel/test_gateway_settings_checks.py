"""Gateway settings that used to pass validation and fail later: listen addresses that answer at the
head's address under another spelling, a virtual-address pool with no host in it, out-of-range
ports and intervals, and IPv6 listen addresses in the URLs the gateway reports."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from pathlib import Path

import grpc
import psutil
import pytest
from koinon_gateway.config import GatewayConfig
from koinon_gateway.main import build_parser, config_from_args
from koinon_gateway.rpc import tunnel_stub
from koinon_gateway.server import Gateway
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import channel_for, cluster

HEAD = "127.0.10.1"
BASE_FLAGS = ["--head-address", HEAD]


async def _grpc_listener_answers_at_head(host: str) -> bool:
    server = grpc.aio.server()
    port = server.add_insecure_port(f"[{host}]:0")
    await server.start()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(HEAD, port), 2)
        writer.close()
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(Exception):
            await server.stop(0)


@pytest.mark.parametrize("host", ["::0", "0::0", "::ffff:0.0.0.0", "::ffff:127.0.10.1"])
async def test_a_listen_address_answering_at_the_head_under_another_spelling_is_refused(host: str) -> None:
    # What gRPC does with it: it accepts IPv4 connections to the head's address (a dual-stack
    # wildcard, or a v4-mapped address bound as the IPv4 one).
    assert await _grpc_listener_answers_at_head(host)
    config = GatewayConfig(head_address=HEAD, listen=f"[{host}]:10050", head_port_ranges=[(10002, 10100)])
    with pytest.raises(ValueError, match=r"includes 10050, the port of listen"):
        config.validate()
    # Elsewhere than the head's Ray ports, the same address is fine.
    GatewayConfig(head_address=HEAD, listen=f"[{host}]:7443", head_port_ranges=[(10002, 10100)]).validate()


@pytest.mark.parametrize("cidr", ["127.0.20.0/31", "127.0.20.1/32"])
def test_a_vip_pool_without_host_addresses_is_refused(cidr: str) -> None:
    with pytest.raises(ValueError, match=r"^vip_cidr: .* holds no address to hand out"):
        GatewayConfig(head_address=HEAD, vip_cidr=cidr).validate()


async def test_the_smallest_vip_pool_serves_its_two_hosts(tmp_path: Path) -> None:
    async with cluster(tmp_path, vip_cidr="127.0.20.0/30") as c:
        token = c.tokens.add(usage_limit=3)
        async with channel_for(c) as channel:
            stub = tunnel_stub(channel)
            joined = [await stub.Join(pb.JoinRequest(token=token, name_hint=f"n{i}"), timeout=5) for i in range(2)]
            assert sorted(r.assignment.address for r in joined) == ["127.0.20.1", "127.0.20.2"]
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await stub.Join(pb.JoinRequest(token=token, name_hint="n2"), timeout=5)
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        token_id = token.split(".")[0]
        assert c.tokens.tokens[token_id].usages_count == 2  # the refused join gave its use back


@pytest.mark.parametrize("port", ["0", "-1", "70000"])
def test_head_gcs_port_out_of_range_is_refused(port: str) -> None:
    with pytest.raises(ValueError, match="head_gcs_port: must be a port within 1-65535"):
        config_from_args(build_parser().parse_args([*BASE_FLAGS, "--head-gcs-port", port])).validate()


def test_head_ports_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="head_ports: 70000 is not a port"):
        GatewayConfig(head_address=HEAD, head_ports=[6380, 70000]).validate()


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_status_heartbeat_interval_must_be_finite_and_positive(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE_FLAGS, "--status-heartbeat-interval", value])
    assert "--status-heartbeat-interval: must be a finite number of seconds > 0" in capsys.readouterr().err


def test_status_heartbeat_interval_is_bounded_as_the_status_refresh_is(capsys: pytest.CaptureFixture[str]) -> None:
    """The operator takes a Ready status whose lastHeartbeat is over 120 s old as left by a stopped
    gateway (reputation_book.SILENT_STATUS_S). validate() bounds the sessions' refresh for that;
    this flag's coalescing, which adds its wait to it, was unbounded."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE_FLAGS, "--status-heartbeat-interval", "600"])
    assert "--status-heartbeat-interval: at most 60 s" in capsys.readouterr().err
    args = build_parser().parse_args([*BASE_FLAGS, "--status-heartbeat-interval", "60"])
    assert args.status_heartbeat_interval == 60.0


def test_reported_addresses_of_ipv6_listeners_keep_their_brackets() -> None:
    gateway = Gateway(GatewayConfig(listen="[::1]:0", head_proxy_listen="[::]:0", admin_listen="[::1]:0"))
    gateway._ports.grpc_port, gateway._ports.head_proxy_port, gateway._ports.admin_port = 7443, 7480, 7481
    assert gateway.agent_target == "[::1]:7443"
    for url, port in ((gateway.head_proxy_url, 7480), (gateway.admin_url, 7481)):
        parts = urllib.parse.urlsplit(url)
        assert (parts.hostname, parts.port) == ("::1", port), url
    wildcard = Gateway(GatewayConfig(listen="0.0.0.0:0"))
    wildcard._ports.grpc_port = 7443
    assert wildcard.agent_target == "127.0.0.1:7443"


@pytest.mark.parametrize("cidr", ["10.20.0.0/22", "192.168.1.0/24", "127.0.0.0/22", "0.0.0.0/0"])
def test_a_vip_pool_agents_would_refuse_is_refused(cidr: str) -> None:
    """Agents take only virtual loopback addresses other than 127.0.0.1 (assignment_check): a pool
    elsewhere, or holding 127.0.0.1, gave nodes addresses their agents then refused."""
    with pytest.raises(ValueError, match=r"^vip_cidr: .* must lie within 127.0.0.0/8 and leave out 127.0.0.1"):
        GatewayConfig(head_address=HEAD, vip_cidr=cidr).validate()


def test_a_port_block_agents_would_refuse_is_refused() -> None:
    """More than 10,000 worker ports per block: every agent refuses such an assignment."""
    with pytest.raises(ValueError, match=r"^port_block_size: at most 10008"):
        GatewayConfig(head_address=HEAD, vip_cidr="127.0.20.0/29", port_base=1024, port_block_size=10009).validate()
    GatewayConfig(head_address=HEAD, vip_cidr="127.0.20.0/29", port_base=1024, port_block_size=10008).validate()


@pytest.mark.parametrize("setting", ["listen", "admin_listen", "head_proxy_listen"])
async def test_a_free_port_picked_within_the_head_ports_stops_the_gateway_with_all_ports_closed(setting: str) -> None:
    """validate() cannot check a port 0 listener; its bound port used to go unchecked, so with the
    defaults (head_address 127.0.0.1, admin and head proxy on 127.0.0.1:0) and a wide
    head_port_ranges, a volunteer dialled the gateway's admin port (/metrics) through the tunnel.
    Here only ``setting`` answers at the head's address (the others bind 127.0.0.2)."""
    elsewhere = "127.0.0.2:0"  # loopback, but not head_address: never reachable through the tunnel
    config = GatewayConfig(
        listen=elsewhere, admin_listen=elsewhere, head_proxy_listen=elsewhere, tls=False,
        head_address="127.0.0.1", head_port_ranges=[(1024, 65535)], verify_ray_nodes=False,
    )  # fmt: skip
    setattr(config, setting, "127.0.0.1:0")
    gateway = Gateway(config)  # validate() passes: the port is not known yet
    message = rf"^head_port_ranges: 1024-65535 includes \d+, the port of {setting} \(127.0.0.1:0, given port \d+ when"
    with pytest.raises(ValueError, match=message):
        await gateway.start()
    # Nothing stays open: every listener bound before the check is closed again. Asked of this
    # process's own sockets: a dial to the freed port could reach whatever another process (a
    # parallel test worker) was given that port since.
    ports = {gateway._ports.grpc_port, gateway._ports.admin_port, gateway._ports.head_proxy_port}
    assert all(ports), ports  # each listener was bound (its port known) before the check
    listening = {c.laddr.port for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    assert not listening & ports, f"still listening on {sorted(listening & ports)}"


async def test_stop_after_a_start_refused_for_its_bound_port_is_a_no_op() -> None:
    """start() stops a gateway whose free port landed in head_port_ranges itself; a caller's own
    cleanup (try/finally: stop()) must not then fail, hiding why the start was refused."""
    config = GatewayConfig(
        listen="127.0.0.1:0", admin_listen="127.0.0.2:0", head_proxy_listen="127.0.0.2:0", tls=False,
        head_address="127.0.0.1", head_port_ranges=[(1024, 65535)], verify_ray_nodes=False,
    )  # fmt: skip
    gateway = Gateway(config)
    with pytest.raises(ValueError, match="given port"):
        await gateway.start()
    await gateway.stop(0)
