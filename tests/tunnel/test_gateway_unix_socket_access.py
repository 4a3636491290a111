"""A gateway on a unix socket serves agents running as another user: the dev plane's sandboxed
volunteers run as nobody. Made with the umask, the socket (0755) took connections from root only,
and the CA file it writes beside its ready file (0600 under umask 077) could not be read."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from .helpers import cluster


async def test_a_unix_listener_takes_connections_from_every_local_user(tmp_path: Path) -> None:
    socket_path = tmp_path / "gw.sock"
    async with cluster(tmp_path, listen=f"unix:{socket_path}"):
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o666


def test_the_gateway_writes_its_ca_readable_by_every_local_user_whatever_the_umask(tmp_path: Path) -> None:
    ready = tmp_path / "gateway.ready"
    command = [
        sys.executable, "-m", "koinon_gateway.main", f"--listen=unix:{tmp_path}/gw.sock",
        "--head-proxy-listen=127.0.0.1:0", "--admin-listen=127.0.0.1:0", "--head-address=127.0.0.1",
        "--head-gcs-port=1", "--head-ports=2", f"--state-dir={tmp_path}/state",
        "--bootstrap-token=abcdef.0123456789abcdef", f"--ready-file={ready}",
    ]  # fmt: skip
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        gateway = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=lambda: os.umask(0o077))
    try:
        deadline = time.monotonic() + 30
        while not (ready.exists() and len(ready.read_text().splitlines()) == 4):
            assert gateway.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        ca_path = Path(ready.read_text().splitlines()[2])
        assert stat.S_IMODE(ca_path.stat().st_mode) == 0o644  # a certificate: no secret in it
        assert stat.S_IMODE((tmp_path / "gw.sock").stat().st_mode) == 0o666
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
