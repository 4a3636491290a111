"""A throwaway OpenSSH server on a loopback port (key auth only) for the `ssh -L` baseline."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The tunnel's cipher (TLS 1.3 AES-128-GCM), for a like-for-like comparison beside `ssh -L` as it
# comes (OpenSSH then picks chacha20-poly1305, slower per byte on CPUs with AES instructions).
SAME_CIPHER_AS_TUNNEL = "aes128-gcm@openssh.com"


def default_cipher() -> str:
    """The cipher a plain `ssh` negotiates with a default sshd: the first of its client list."""
    shown = subprocess.run(["ssh", "-G", "127.0.0.1"], capture_output=True, text=True, check=True).stdout
    listed = next(line.split()[1] for line in shown.splitlines() if line.startswith("ciphers "))
    return listed.split(",")[0]


@contextlib.contextmanager
def ssh_forward(workdir: Path, target_port: int, cipher: str | None = None) -> Iterator[int]:
    """Yields a local port forwarded by `ssh -L` to 127.0.0.1:target_port (with ``cipher``, else
    OpenSSH's default choice)."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists() or shutil.which("ssh") is None:
        raise FileNotFoundError("OpenSSH not installed (apt-get install -y openssh-server openssh-client)")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "user_key"):
        (workdir / name).unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / name)], check=True)
    (workdir / "authorized_keys").write_text((workdir / "user_key.pub").read_text())
    (workdir / "authorized_keys").chmod(0o600)
    sshd_port, local_port = _free_port(), _free_port()
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {workdir / 'host_key'}\n"
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}\nPasswordAuthentication no\n"
        f"PidFile {workdir / 'sshd.pid'}\nStrictModes no\nUsePAM no\nAllowTcpForwarding yes\n"
    )
    try:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    except OSError as exc:  # not root: the baseline is reported missing, the rest still runs
        raise RuntimeError(f"sshd needs /run/sshd: {exc}") from exc
    daemon = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL)
    forward = None
    try:
        time.sleep(0.5)
        forward = subprocess.Popen(
            [
                "ssh",
                "-N",
                "-i",
                str(workdir / "user_key"),
                "-p",
                str(sshd_port),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                f"UserKnownHostsFile={workdir / 'known_hosts'}",
                "-o",
                "ExitOnForwardFailure=yes",
                *(["-c", cipher] if cipher else []),
                "-L",
                f"{local_port}:127.0.0.1:{target_port}",
                "root@127.0.0.1",
            ],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", local_port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline or forward.poll() is not None:
                    raise RuntimeError("ssh -L did not come up") from None
                time.sleep(0.2)
        yield local_port
    finally:
        for process in (forward, daemon):
            if process is not None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
