"""``koinon-kube-emulator``: serve the Kubernetes API emulator until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .kubeconfig import write_kubeconfig
from .server import KubeEmulator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="koinon-kube-emulator",
        description="Koinon Kubernetes API emulator (in-memory, plain HTTP, no auth) for tests and local dev.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: any free port)")
    parser.add_argument("--kubeconfig", help="write a kubeconfig (context koinon-local) for the server here")
    parser.add_argument("--state-file", help="load objects from this file at start and save them at stop")
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    emulator = KubeEmulator(state_file=args.state_file)
    url = await emulator.start(args.host, args.port)
    if args.kubeconfig:
        write_kubeconfig(args.kubeconfig, url)
    print(url, flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await stopping.wait()
    finally:
        await emulator.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
