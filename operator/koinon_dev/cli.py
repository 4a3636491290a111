"""``koinon``: the local control plane (``dev up``/``dev down``/``dev status``), the demo, and job logs."""

from __future__ import annotations

import argparse
import asyncio
import math
import subprocess
import sys
from pathlib import Path

from koinon_operator.ray_jobs import RayJobsClient, RayUnavailableError

from koinon_dev.cluster import DevCluster, DevClusterConfig, DevClusterInfo, down_command, kubectl
from koinon_dev.processes import TerminatedBySignal, signals_as_exceptions
from koinon_dev.tunnel_plane import MAX_VOLUNTEERS


def _cluster(args: argparse.Namespace) -> DevCluster:
    return DevCluster(
        DevClusterConfig(
            state_dir=Path(args.state_dir),
            volunteers=args.volunteers,
            network_namespaces=False if args.no_netns else None,
        )
    )


def cmd_up(args: argparse.Namespace) -> int:
    info = _cluster(args).up()
    print(f"\nLocal control plane is up. Use it with:\n  export KUBECONFIG={info.kubeconfig}")
    print("  kubectl apply -f examples/numeric-job.yaml && kubectl get aij -w")
    print(f"Stop it with: {down_command(Path(args.state_dir))}")
    return 0


def report_stopped(stopped: list[str]) -> None:
    # Flushed: a SIGTERM held back during `down` is delivered right after, and may end the process.
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"), flush=True)


def cmd_down(args: argparse.Namespace) -> int:
    # Printed by `down` itself, before a Ctrl-C held back meanwhile ends the command ("interrupted").
    _cluster(args).down(report=report_stopped)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if not cluster.state_path.exists():
        print("no local control plane is running")
        return 1
    info = cluster.info()
    running = cluster.running_components(info)
    missing = sorted(set(info.process_groups) - set(running))
    print(info.to_json())
    if not info.complete:
        print(f"koinon: {cluster.state_path} records an `up` that is starting or was interrupted", file=sys.stderr)
        return 1
    if missing:
        # A crash, an OOM kill or a reboot: the record outlives the processes. Scripts must not read "up".
        print(
            f"koinon: recorded but not running: {', '.join(missing)}; run `{down_command(cluster.state_dir)}`",
            file=sys.stderr,
        )
        return 1
    return 0


def fetch_job_logs(info: DevClusterInfo, name: str, namespace: str) -> str:
    submission_id = kubectl(
        info.kubeconfig, "get", "aijob", name, "-n", namespace, "-o", "jsonpath={.status.submissionId}"
    ).strip()
    if not submission_id:
        raise RuntimeError(f"AIJob {namespace}/{name} has no Ray submission yet")

    async def read() -> str:
        ray = RayJobsClient(info.ray_dashboard_url, auth_token=info.ray_auth_token())
        try:
            job = await ray.get(submission_id)
            return await ray.logs(submission_id, job.driver_node_id if job else None)
        finally:
            await ray.close()

    try:
        return asyncio.run(read())
    except RayUnavailableError as error:
        raise RuntimeError(f"cannot read logs of {submission_id} from Ray: {error}") from error


def cmd_logs(args: argparse.Namespace) -> int:
    print(fetch_job_logs(_cluster(args).info(), args.name, args.namespace), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from koinon_dev.demo import run_demo

    # A SIGTERM/SIGHUP (CI cancelling, terminal closed) stops the demo as Ctrl-C would: all goes down.
    with signals_as_exceptions():
        return run_demo(_cluster(args), Path(args.example), timeout=args.timeout)


def _failed_command(error: subprocess.CalledProcessError) -> str:
    """The command and what it said on stderr (kept by capture_output, else lost to the user)."""
    command = " ".join(str(arg) for arg in error.cmd) if isinstance(error.cmd, list | tuple) else str(error.cmd)
    stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr or ""
    return f"`{command}` failed (exit status {error.returncode})" + (f": {stderr.strip()}" if stderr.strip() else "")


def _timeout_seconds(text: str) -> float:
    """A finite number of seconds > 0, refused before anything starts: NaN, 0 or a negative one
    timed out at once after a whole control plane came up, and inf waited for ever."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def _volunteer_count(text: str) -> int:
    """1 to MAX_VOLUNTEERS: the gateway claims that many port blocks, and a control plane without
    volunteers runs no job."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= count <= MAX_VOLUNTEERS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_VOLUNTEERS}, got {count}")
    return count


def _add_global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--state-dir, --volunteers, --no-netns. Given to the top-level parser with their defaults,
    and to every subcommand without (SUPPRESS: unset unless given there), so they are taken before
    or after the subcommand (`koinon logs --state-dir DIR NAME`, as the README shows) and a
    subcommand that does not name them leaves the value given before it in place."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--state-dir", default=default(".koinon/dev"), help="where the local control plane keeps state")
    parser.add_argument(
        "--volunteers",
        type=_volunteer_count,
        default=default(2),
        help=f"local volunteer nodes to start (1 to {MAX_VOLUNTEERS})",
    )
    parser.add_argument(
        "--no-netns",
        action="store_true",
        default=default(False),
        help="run volunteers as plain local processes even as root (Ray's traffic still uses the tunnel; "
        "job code is not confined)",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="koinon", description=__doc__)
    _add_global_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True)
    dev = commands.add_parser("dev", help="the local control plane", parents=[common]).add_subparsers(
        dest="action", required=True
    )
    for action, func, text in (
        ("up", cmd_up, "start emulator, operator, Ray head and volunteers"),
        ("down", cmd_down, "stop everything `up` started"),
        ("status", cmd_status, "show the running control plane"),
    ):
        dev.add_parser(action, help=text, parents=[common]).set_defaults(func=func)
    demo = commands.add_parser("demo", help="up, run an example AIJob end to end, down", parents=[common])
    demo.add_argument("--example", default="examples/numeric-job.yaml")
    demo.add_argument(
        "--timeout", type=_timeout_seconds, default=150.0, help="seconds to wait for the job (finite, > 0)"
    )
    demo.set_defaults(func=cmd_demo)
    logs = commands.add_parser("logs", help="print the Ray logs of an AIJob", parents=[common])
    logs.add_argument("name")
    logs.add_argument("-n", "--namespace", default="default")
    logs.set_defaults(func=cmd_logs)
    args = parser.parse_args(argv)
    try:
        sys.exit(args.func(args))
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as error:
        print(f"koinon: {error}", file=sys.stderr)
        sys.exit(1)
    except subprocess.CalledProcessError as error:
        print(f"koinon: {_failed_command(error)}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:  # an unwritable --state-dir, a cluster.json that is a directory...
        print(f"koinon: {error}", file=sys.stderr)
        sys.exit(1)
    except TerminatedBySignal as error:  # what was started is stopped by now
        print(f"koinon: {error}", file=sys.stderr)
        sys.exit(128 + error.signum)
    except KeyboardInterrupt:
        print("koinon: interrupted", file=sys.stderr)
        sys.exit(130)
