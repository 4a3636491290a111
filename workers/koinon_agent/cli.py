"""``koinon-agent join --gateway HOST:PORT --token TOKEN`` (every flag also reads a KOINON_* variable)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from koinon_gateway import event_loop

from . import health
from .agent import Agent, DrainedBeforeJoining, JoinRefused
from .config import ENV_VARS, VERSION, AgentConfig, default_health_file, default_state_dir

PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def _env(name: str, default: str | None = None) -> str | None:
    # An empty variable counts as unset (templating often renders one). Numbers stay strings here:
    # argparse converts a string default with the flag's type, so a bad value is refused naming the
    # flag instead of failing with a traceback before the arguments are parsed.
    return os.environ.get(name) or default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koinon-agent")
    parser.add_argument("--version", action="version", version=f"koinon-agent {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    join = sub.add_parser("join", help="join the platform and run a Ray worker node through the tunnel")
    join.add_argument("--gateway", default=_env("KOINON_GATEWAY"), help="host:port or unix:/path [KOINON_GATEWAY]")
    join.add_argument(
        "--token",
        action=_TokenOnCommandLine,
        default=_env("KOINON_TOKEN", ""),
        help="join token [KOINON_TOKEN]; KOINON_TOKEN_HINT (environment only) says where it should come from, "
        "quoted when none came",
    )
    join.add_argument(
        "--state-dir",
        type=Path,
        default=_env("KOINON_STATE_DIR"),
        help="keeps the node's credential; one agent per dir (default ~/.koinon/agent) [KOINON_STATE_DIR]",
    )
    join.add_argument("--ca-file", type=Path, default=_env("KOINON_CA_FILE"), help="gateway CA [KOINON_CA_FILE]")
    join.add_argument(
        "--ca-cert-hash",
        default=_env("KOINON_CA_CERT_HASH", ""),
        help="trust the gateway CA with this public-key hash, sha256:<hex>, instead of a CA file [KOINON_CA_CERT_HASH]",
    )
    join.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plaintext gRPC (tests only) [KOINON_INSECURE=1]",
    )
    join.add_argument(
        "--tls-server-name",
        default=_env("KOINON_TLS_SERVER_NAME", ""),
        help="name the gateway's certificate must carry (default: the gateway host; koinon-gateway for unix "
        "sockets) [KOINON_TLS_SERVER_NAME]",
    )
    join.add_argument(
        "--node-name",
        default=_env("KOINON_NODE_NAME", os.uname().nodename),
        help="name hint for the VolunteerNode (default: the hostname) [KOINON_NODE_NAME]",
    )
    join.add_argument(
        "--region", default=_env("KOINON_REGION", ""), help="region, unless the token fixes it [KOINON_REGION]"
    )
    join.add_argument(
        "--simulate-gpus",
        type=_number(int, "KOINON_SIMULATE_GPUS"),
        default=_env("KOINON_SIMULATE_GPUS"),
        help="declare N simulated GPUs instead of NVML detection; 0 hides real ones [KOINON_SIMULATE_GPUS]",
    )
    join.add_argument(
        "--simulate-gpu-memory",
        type=_number(int, "KOINON_SIMULATE_GPU_MEMORY"),
        default=_env("KOINON_SIMULATE_GPU_MEMORY", "16384"),
        help="MiB per simulated GPU [KOINON_SIMULATE_GPU_MEMORY]",
    )
    join.add_argument(
        "--num-cpus",
        type=_number(int, "KOINON_NUM_CPUS"),
        default=_env("KOINON_NUM_CPUS"),
        help="CPUs lent to Ray (ray start --num-cpus; default: all) [KOINON_NUM_CPUS]",
    )
    join.add_argument(
        "--object-store-memory",
        type=_number(int, "KOINON_OBJECT_STORE_MEMORY"),
        default=_env("KOINON_OBJECT_STORE_MEMORY"),
        help="bytes of Ray's object store, at least 78643200 (default: Ray's choice) [KOINON_OBJECT_STORE_MEMORY]",
    )
    join.add_argument(
        "--ray-bin",
        default=_env("KOINON_RAY_BIN", _default_ray_bin()),
        help="the ray executable, a path or a name on PATH (default: next to this Python) [KOINON_RAY_BIN]",
    )
    join.add_argument(
        "--temp-dir",
        type=Path,
        default=_env("KOINON_TEMP_DIR"),
        help="Ray's --temp-dir, one per node (default <state-dir>/ray) [KOINON_TEMP_DIR]",
    )
    join.add_argument(
        "--health-file",
        type=Path,
        default=_env("KOINON_HEALTH_FILE"),
        help="where to write the health report; default <state-dir>/health.json [KOINON_HEALTH_FILE]",
    )
    join.add_argument(
        "--drain-grace",
        type=_number(float, "KOINON_DRAIN_GRACE"),
        default=_env("KOINON_DRAIN_GRACE", "30"),
        help="seconds running tasks get to finish on SIGTERM [KOINON_DRAIN_GRACE]",
    )
    join.add_argument(
        "--ray-restart-after",
        type=_number(float, "KOINON_RAY_RESTART_AFTER"),
        default=_env("KOINON_RAY_RESTART_AFTER", "60"),
        help="restart the Ray node when the gateway was unreachable this many seconds [KOINON_RAY_RESTART_AFTER]",
    )
    join.add_argument(
        "--proxy-port",
        type=_number(int, "KOINON_PROXY_PORT"),
        default=_env("KOINON_PROXY_PORT", "0"),
        help="port of the local CONNECT proxy on 127.0.0.1 [KOINON_PROXY_PORT]; its clients need its "
        "secret, random per start, or KOINON_PROXY_SECRET (environment only)",
    )
    join.add_argument("--no-ray", action="store_true", help="tunnel only, do not start Ray (benchmarks)")
    join.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    check = sub.add_parser(
        "health", help="exit 0 if the agent of this state dir is alive (and with --ready, in the pool)"
    )
    check.add_argument("--state-dir", type=Path, default=_env("KOINON_STATE_DIR"), help="[KOINON_STATE_DIR]")
    check.add_argument(
        "--health-file",
        type=Path,
        default=_env("KOINON_HEALTH_FILE"),
        help="the agent's health report; default <state-dir>/health.json [KOINON_HEALTH_FILE]",
    )
    check.add_argument(
        "--max-age",
        type=_positive_seconds,
        default=30.0,
        help=f"seconds a health report stays valid (the agent writes one every {health.WRITE_INTERVAL_S:.0f}s)",
    )
    check.add_argument("--ready", action="store_true", help="also require the gateway connected and Ray serving")
    return parser


class _TokenOnCommandLine(argparse.Action):
    """Stores --token and notes that it came from the command line (token_on_command_line), which
    every local user can read (ps, /proc/<pid>/cmdline), unlike the environment."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.token_on_command_line = True


def warn_of_token_on_command_line(args: argparse.Namespace) -> None:
    """One warning line when the join token was given as --token (never the token itself)."""
    if getattr(args, "token_on_command_line", False) and (args.token or "").strip():
        logging.getLogger(__name__).warning(
            "--token on the command line is visible to every local user (ps, /proc/<pid>/cmdline); "
            "prefer the KOINON_TOKEN environment variable"
        )


def _number(kind: type[int] | type[float], env_var: str) -> Callable[[str], int | float]:
    """An argparse type that names the environment variable too when a value is not a number."""

    def parse(text: str) -> int | float:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid {kind.__name__} value {text!r} (from the flag or {env_var})"
            ) from None

    return parse


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (with NaN, every report would pass)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env_flag(name: str) -> bool:
    """A boolean environment variable; a value that is neither yes nor no is refused by name (a
    misspelt KOINON_INSECURE must not quietly mean TLS with no CA, retried for ever)."""
    text = (_env(name) or "0").strip().lower()
    if text not in _TRUE + _FALSE:
        raise ValueError(f"{name}: expected one of {', '.join(_TRUE + _FALSE)}, got {text!r}")
    return text in _TRUE


def _default_ray_bin() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    if not args.gateway:
        raise ValueError("gateway: required (--gateway or KOINON_GATEWAY)")
    ca_pem = (_env("KOINON_CA_CERT") or "").encode()
    config = AgentConfig(
        gateway=args.gateway,
        token=(args.token or "").strip(),
        token_hint=(_env("KOINON_TOKEN_HINT", "") or "").strip(),
        ca_file=args.ca_file,
        ca_pem=ca_pem,
        ca_cert_hash=args.ca_cert_hash,
        insecure=args.insecure if args.insecure is not None else _env_flag("KOINON_INSECURE"),
        tls_server_name=args.tls_server_name,
        name_hint=args.node_name,
        region=args.region,
        simulate_gpus=args.simulate_gpus,
        simulate_gpu_memory_mib=args.simulate_gpu_memory,
        num_cpus=args.num_cpus,
        object_store_memory=args.object_store_memory,
        ray_bin=args.ray_bin,
        temp_dir=args.temp_dir,
        health_file=args.health_file,
        start_ray=not args.no_ray,
        proxy_port=args.proxy_port,
        proxy_secret=_env("KOINON_PROXY_SECRET", "") or "",
        drain_grace_s=args.drain_grace,
        ray_restart_after_s=args.ray_restart_after,
    )
    if args.state_dir is not None:
        config.state_dir = args.state_dir
    config.validate()
    return config


def drain_on_signals(agent: Agent, loop: asyncio.AbstractEventLoop) -> None:
    """SIGTERM/SIGINT drains the agent; a second one skips what is left of the grace period and
    stops Ray at once (SIGKILL would leave Ray running: it has a process group of its own)."""
    received = 0

    def on_signal() -> None:
        nonlocal received
        received += 1
        if received > 1:
            logging.getLogger(__name__).warning("second signal: stopping Ray without waiting for running tasks")
        agent.request_drain(now=received > 1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)


async def _run(config: AgentConfig) -> None:
    agent = Agent(config)
    drain_on_signals(agent, asyncio.get_running_loop())
    await agent.run()


def keep_process_private() -> bool:
    """Makes this process non-dumpable: Ray's processes and the jobs they run share the agent's
    user, and could otherwise read the join token from /proc/<agent>/environ (the chart passes it
    as KOINON_TOKEN) or the agent's memory (ptrace). Its children are dumpable again after exec.
    False where prctl(2) is not available."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return bool(prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)


def health_command(args: argparse.Namespace) -> int:
    state_dir = args.state_dir if args.state_dir is not None else default_state_dir()
    path = args.health_file if args.health_file is not None else default_health_file(state_dir)
    healthy, why = health.check(path, args.max_age, args.ready, started_at=health.processes_started_at())
    print(why, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "health":
        return health_command(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    keep_process_private()
    warn_of_token_on_command_line(args)
    try:
        config = config_from_args(args)
        event_loop.run(_run(config))
    except ValueError as exc:
        print(f"koinon-agent: {exc}", file=sys.stderr)
        return 2
    except DrainedBeforeJoining as exc:
        print(f"koinon-agent: {exc}", file=sys.stderr)
        return 0
    except JoinRefused as exc:
        print(f"koinon-agent: refused: {exc}", file=sys.stderr)
        return 3
    return 0


__all__ = ["ENV_VARS", "main"]

if __name__ == "__main__":
    sys.exit(main())
