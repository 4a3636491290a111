"""``koinon-kube-emulator``: serve the Kubernetes API emulator until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import secrets
import signal
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .files import write_private
from .kubeconfig import write_kubeconfig
from .server import KubeEmulator
from .tls import ServingCert, self_signed_cert

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="koinon-kube-emulator",
        description="Koinon Kubernetes API emulator (in-memory; HTTPS and a bearer token) for tests and local dev.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: any free port)")
    parser.add_argument("--kubeconfig", help="write a kubeconfig (context koinon-local) for the server here")
    parser.add_argument("--state-file", help="load objects from this file at start and save them at stop")
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="plain HTTP, and every client served without a credential (by default: HTTPS with a "
        "self-signed certificate, and clients need the random token; --kubeconfig carries both)",
    )
    args = parser.parse_args(argv)
    if not args.no_auth and not args.kubeconfig:
        # The token is drawn at start and only the kubeconfig carries it: without one, no client could use it.
        parser.error("give --kubeconfig (it carries the token clients need), or --no-auth")
    return args


def serving_credentials(host: str, state_file: str | None) -> tuple[str, ServingCert]:
    """A new token and certificate; with a state file, the ones kept beside it (0600) from the last
    start for the same host: as kube-apiserver keeps its certificate and credentials across a
    restart, so the clients of an emulator restarted on its state go on being served."""
    hosts = list(dict.fromkeys([host, "127.0.0.1", "localhost"]))
    kept = Path(f"{state_file}.credentials.json") if state_file else None
    reused = _kept_credentials(kept, hosts) if kept is not None and kept.exists() else None
    if reused is not None:
        return reused
    token, tls = secrets.token_urlsafe(32), self_signed_cert(hosts)
    if kept is not None:
        document = {"hosts": hosts, "token": token, "cert": tls.cert_pem.decode(), "key": tls.key_pem.decode()}
        write_private(kept, json.dumps(document))
    return token, tls


def _kept_credentials(kept: Path, hosts: list[str]) -> tuple[str, ServingCert] | None:
    """The token and certificate kept in ``kept`` if they are for ``hosts`` and the certificate
    holds for at least another day; None otherwise (new ones are made): a damaged file (a crash
    while it was written) must not stop every later start, nor an expired certificate every client."""
    try:
        saved = json.loads(kept.read_text())
        token, tls = str(saved["token"]), ServingCert(saved["cert"].encode(), saved["key"].encode())
        expires = x509.load_pem_x509_certificate(tls.cert_pem).not_valid_after_utc
        serialization.load_pem_private_key(tls.key_pem, password=None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logging.getLogger(__name__).warning(
            "%s unreadable (%s); serving with new credentials", kept, type(exc).__name__
        )
        return None
    if saved.get("hosts") != hosts or not token or expires - dt.datetime.now(dt.UTC) < dt.timedelta(days=1):
        return None
    return token, tls


async def serve(args: argparse.Namespace) -> None:
    # Before the URL is printed (what tells a supervisor it serves): a SIGTERM right after it must
    # stop the emulator cleanly, saving its state, not kill it.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    # A token, kept only in the kubeconfig (0600): any local user reaches the port, and the API
    # holds Secrets (the gateway's CA key) and AIJobs that run as the user who started it. HTTPS
    # because kubectl (client-go) sends a kubeconfig's credentials over TLS only.
    token, tls = (None, None) if args.no_auth else serving_credentials(args.host, args.state_file)
    emulator = KubeEmulator(state_file=args.state_file, token=token, tls=tls)
    url = await emulator.start(args.host, args.port)
    if args.kubeconfig:
        write_kubeconfig(args.kubeconfig, url, token=token, ca_pem=tls.cert_pem if tls else None)
    print(url, flush=True)
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
