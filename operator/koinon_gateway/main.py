"""``koinon-gateway``: run the tunnel gateway next to the Ray head.

Stores: ``--store kube`` keeps join tokens (Secrets), the CA (Secret ``koinon-gateway-ca``, its
certificate alone published in ConfigMap ``koinon-gateway-ca-cert``) and VolunteerNodes in the
cluster (``--kubeconfig``, else in-cluster, else ``$KUBECONFIG``; Secrets in ``--namespace``);
``--store file`` keeps nodes, the CA and join tokens' usage counts under ``--state-dir`` (local
dev, tests);
``--store memory`` keeps nothing (benchmarks). With file/memory stores, join tokens come from
``--bootstrap-token``; with the kube store from ``koinon-gateway token create`` (see token_cli.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from . import event_loop, token_cli
from .config import FROM_NODE_BYTES_PER_STREAM, MAX_STATUS_REFRESH_S, MIN_BUFFERED_BYTES_PER_NODE, GatewayConfig
from .file_tokens import FileTokenStore
from .kube_ca import KubeCAStore, StalePin
from .kube_client import KubeApiError, KubeConfigError, kube_client, load_config
from .kube_registry import KubeNodeRegistry
from .kube_tokens import KubeTokenStore
from .pki import CAStore, FileCAStore, InMemoryCAStore
from .registry import FileNodeRegistry, InMemoryNodeRegistry, NodeRegistry
from .send_stalls import STALL_AFTER_S
from .server import Gateway
from .tokens import InMemoryTokenStore, TokenError, TokenStore, parse_token


def _port_ranges(text: str) -> list[tuple[int, int]]:
    ranges = []
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        try:
            ranges.append((int(low), int(high or low)))
        except ValueError:
            # int()'s own message names neither the flag nor the part: say which, of some twenty flags
            raise ValueError(f"--head-ports: {part!r} is not a port or a range LOW-HIGH") from None
    return ranges


def _ray_auth_token(path: Path | None) -> str:
    """The head's Ray token from --ray-auth-token-file ("" without one); a file that cannot be read
    is a one-line error naming the flag, not a traceback."""
    if path is None:
        return ""
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--ray-auth-token-file {path}: cannot read it: {exc}") from None


BOOTSTRAP_OWNER = "bootstrap"


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (NaN would pass every later comparison)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def _bytes_at_least(minimum: int, why: str) -> Callable[[str], int]:
    """An argparse type: a whole number of bytes, at least ``minimum`` (``why`` says what that is)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number of bytes, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"at least {minimum} bytes ({why}), got {text!r}")
        return value

    return parse


def _status_heartbeat_seconds(text: str) -> float:
    """An argparse type: seconds > 0 and at most MAX_STATUS_REFRESH_S. The operator takes a Ready
    status whose lastHeartbeat is over 120 s old as left by a stopped gateway
    (reputation_book.SILENT_STATUS_S): this coalescing adds its wait to the sessions' refresh
    (status_write_interval_s + heartbeat_interval_s, which validate() bounds by the same 60 s),
    so that the two together stay within those 120 s."""
    value = _positive_seconds(text)
    if value > MAX_STATUS_REFRESH_S:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_STATUS_REFRESH_S:.0f} s (the operator no longer trusts a Ready status whose "
            f"lastHeartbeat is {2 * MAX_STATUS_REFRESH_S:.0f} s old), got {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="koinon-gateway")
    p.add_argument("--listen", default="0.0.0.0:7443", help="host:port or unix:/path for agents")
    p.add_argument("--head-proxy-listen", default="127.0.0.1:7480")
    p.add_argument("--admin-listen", default="127.0.0.1:7481")
    p.add_argument("--insecure", action="store_true", help="no TLS (tests only)")
    p.add_argument("--tls-hostname", action="append", default=["localhost", "127.0.0.1"])
    p.add_argument(
        "--no-verify-ray-nodes",
        action="store_true",
        help="(tests and benchmarks only) trust the Ray node id each agent reports instead of confirming "
        "it in GCS: any agent could then claim Ready",
    )
    p.add_argument("--head-address", required=True)
    p.add_argument("--head-gcs-port", type=int, default=6379)
    p.add_argument("--head-ports", default="", help="other Ray ports of the head, e.g. 6380,6381,10002-10100")
    p.add_argument("--ray-auth-token-file", type=Path)
    p.add_argument("--vip-cidr", default="127.0.20.0/22")
    p.add_argument("--port-base", type=int, default=20000)
    p.add_argument("--port-block-size", type=int, default=40)
    # GatewayConfig's defaults, which bench/tunnel/run.py measures as the deployed heartbeat.
    p.add_argument("--heartbeat-interval", type=float, default=GatewayConfig.heartbeat_interval_s)
    p.add_argument("--heartbeat-timeout", type=float, default=GatewayConfig.heartbeat_timeout_s)
    p.add_argument(
        "--credential-lifetime",
        type=float,
        default=7 * 24 * 3600.0,
        help="seconds a node credential is valid; connected agents get renewals, offline ones rejoin",
    )
    p.add_argument(
        "--max-streams-per-node",
        type=int,
        default=256,
        help="proxied connections one volunteer may dial at once (ones it accepts do not count); more are refused",
    )
    p.add_argument(
        "--max-head-connections-per-node",
        type=int,
        default=GatewayConfig.max_head_connections_per_node,
        help="connections the head may hold open to one volunteer at once through the head proxy; "
        "more CONNECTs are answered 503",
    )
    p.add_argument(
        "--max-buffered-bytes-per-node",
        type=_bytes_at_least(MIN_BUFFERED_BYTES_PER_NODE, "one receive buffer"),
        default=GatewayConfig.max_buffered_bytes_per_node,
        help="bytes of receive buffers the gateway may hold for one volunteer's connections together "
        "(data from the head it does not read); one node can make the gateway hold at most about "
        "2 x (this + 128 KiB per connection it dials or the head opens to it), see "
        "GatewayConfig.max_buffered_bytes_per_node",
    )
    p.add_argument(
        "--max-unread-write-bytes-per-node",
        type=_bytes_at_least(1, "a byte"),
        default=GatewayConfig.max_unread_write_bytes_per_node,
        help="payload bytes of the gateway's writes to one volunteer that it has not read yet, together; "
        "more wait, see GatewayConfig.max_unread_write_bytes_per_node",
    )
    p.add_argument(
        "--max-stalled-bytes-per-node",
        type=_bytes_at_least(FROM_NODE_BYTES_PER_STREAM, "one stalled connection"),
        default=GatewayConfig.max_stalled_bytes_per_node,
        help="bytes one volunteer's connections may hold of data it sends that the other end does not take, "
        f"counted as {FROM_NODE_BYTES_PER_STREAM} for each connection whose forwarding has waited "
        f"{STALL_AFTER_S:g} s; connections stalled past it are ended, see GatewayConfig.max_stalled_bytes_per_node",
    )
    p.add_argument(
        "--unconnected-node-ttl",
        type=_positive_seconds,
        default=24 * 3600.0,
        help="seconds after its join a VolunteerNode whose agent never connected is deleted (its address freed)",
    )
    p.add_argument("--store", choices=["file", "memory", "kube"], default="file")
    p.add_argument("--kubeconfig", type=Path, help="(kube store) default: in-cluster, else $KUBECONFIG")
    p.add_argument(
        "--status-heartbeat-interval",
        type=_status_heartbeat_seconds,
        default=10.0,
        help="(kube store) at most one status write per node per this many seconds that changes only "
        f"lastHeartbeat; at most {MAX_STATUS_REFRESH_S:.0f}",
    )
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/koinon-gateway"))
    p.add_argument("--namespace", default="koinon-system", help="(kube store) namespace of the Secrets")
    p.add_argument(
        "--bootstrap-token",
        action="append",
        default=[],
        help="accept this join token, '<id>.<secret>[:<usage-limit>[:<owner>]]' (owner: "
        f"{BOOTSTRAP_OWNER!r} unless given); repeatable",
    )
    p.add_argument("--ready-file", type=Path, help="write agent target, head proxy URL and CA path here once serving")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    ranges = _port_ranges(args.head_ports)
    return GatewayConfig(
        listen=args.listen,
        head_proxy_listen=args.head_proxy_listen,
        admin_listen=args.admin_listen,
        tls=not args.insecure,
        tls_hostnames=args.tls_hostname,
        head_address=args.head_address,
        head_gcs_port=args.head_gcs_port,
        head_port_ranges=ranges,
        ray_auth_token=_ray_auth_token(args.ray_auth_token_file),
        vip_cidr=args.vip_cidr,
        port_base=args.port_base,
        port_block_size=args.port_block_size,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_timeout_s=args.heartbeat_timeout,
        credential_lifetime_s=args.credential_lifetime,
        max_streams_per_node=args.max_streams_per_node,
        max_head_connections_per_node=args.max_head_connections_per_node,
        max_buffered_bytes_per_node=args.max_buffered_bytes_per_node,
        max_unread_write_bytes_per_node=args.max_unread_write_bytes_per_node,
        max_stalled_bytes_per_node=args.max_stalled_bytes_per_node,
        unconnected_node_ttl_s=args.unconnected_node_ttl,
        verify_ray_nodes=not args.no_verify_ray_nodes,
        namespace=args.namespace,
    )


@dataclass(frozen=True)
class BootstrapToken:
    token: str
    usage_limit: int | None
    owner: str


def parse_bootstrap_token(entry: str) -> BootstrapToken:
    """``<id>.<secret>[:<usage-limit>[:<owner>]]``; a ValueError names what is wrong, never the secret."""
    token, _, rest = entry.partition(":")
    limit_text, _, owner = rest.partition(":")
    try:
        parse_token(token)
    except TokenError as exc:
        raise ValueError(f"--bootstrap-token: {exc}") from exc
    if limit_text and not (limit_text.isascii() and limit_text.isdigit() and int(limit_text) >= 1):
        raise ValueError(f"--bootstrap-token: usage limit must be a whole number >= 1, got {limit_text!r}")
    # Every VolunteerNode has an owner (the CRD requires one; replicas of a verified job never
    # share one): nodes that join with a bootstrap token get this one unless the flag names another.
    return BootstrapToken(token, int(limit_text) if limit_text else None, owner or BOOTSTRAP_OWNER)


def stores_from_args(args: argparse.Namespace) -> tuple[TokenStore, NodeRegistry, CAStore]:
    bootstraps = [parse_bootstrap_token(entry) for entry in args.bootstrap_token]
    if args.store == "memory":
        tokens = InMemoryTokenStore()
    else:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        tokens = FileTokenStore(path=args.state_dir / "join-token-usage.json")
    for bootstrap in bootstraps:
        tokens.add_plain(bootstrap.token, usage_limit=bootstrap.usage_limit, owner=bootstrap.owner)
    if args.store == "memory":
        return tokens, InMemoryNodeRegistry(), InMemoryCAStore()
    return tokens, FileNodeRegistry(args.state_dir / "volunteernodes.json"), FileCAStore(args.state_dir / "ca")


@asynccontextmanager
async def open_stores(args: argparse.Namespace) -> AsyncIterator[tuple[TokenStore, NodeRegistry, CAStore]]:
    if args.store != "kube":
        yield stores_from_args(args)
        return
    bootstraps = [parse_bootstrap_token(entry) for entry in args.bootstrap_token]  # before any API call
    async with kube_client(load_config(args.kubeconfig)) as client:
        tokens = KubeTokenStore(client, args.namespace)
        for bootstrap in bootstraps:
            await tokens.add_plain(bootstrap.token, usage_limit=bootstrap.usage_limit, owner=bootstrap.owner)
        registry = KubeNodeRegistry(client, heartbeat_write_interval_s=args.status_heartbeat_interval)
        yield tokens, registry, KubeCAStore(client, args.namespace)


async def serve(args: argparse.Namespace) -> None:
    async with open_stores(args) as (tokens, registry, ca_store):
        await serve_with(args, tokens, registry, ca_store)


async def serve_with(args: argparse.Namespace, tokens: TokenStore, registry: NodeRegistry, ca_store: CAStore) -> None:
    gateway = Gateway(config_from_args(args), tokens=tokens, registry=registry, ca_store=ca_store)
    await gateway.start()
    if args.ready_file:
        ca_path = args.ready_file.with_suffix(".ca.pem")
        ca_path.write_bytes(gateway.ca_pem)
        ca_path.chmod(0o644)  # a certificate, no secret: agents may run as another user (the dev plane's as nobody)
        args.ready_file.write_text(
            f"{gateway.agent_target}\n{gateway.head_proxy_url}\n{ca_path}\n{gateway.admin_url}\n"
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await gateway.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["token"]:
        return token_cli.main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        event_loop.run(serve(args))
    except (ValueError, KubeConfigError) as exc:
        print(f"koinon-gateway: {exc}", file=sys.stderr)
        return 2
    except KubeApiError as exc:
        print(f"koinon-gateway: Kubernetes API: {exc}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"koinon-gateway: cannot reach the Kubernetes API: {exc}", file=sys.stderr)
        return 1
    except StalePin as exc:
        print(f"koinon-gateway: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
