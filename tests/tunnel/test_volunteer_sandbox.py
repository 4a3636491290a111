"""A volunteer in a network namespace still shares the filesystem, and unix socket paths cross
network namespaces: the sandbox leaves it only the paths it needs."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from koinon_dev.tunnel_plane import create_netns, delete_netns, netns_available

pytestmark = pytest.mark.skipif(not netns_available(), reason="needs root and ip netns")

PROBE = r"""
import os, socket, sys
def connect(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return "connected"
    except OSError as exc:
        return type(exc).__name__
work, state = sys.argv[1], sys.argv[2]
print("head-socket", connect(f"{work}/head/raylet.sock"))
print("gateway-socket", connect(f"{work}/gw.sock"))
print("ca", open(f"{work}/ca.pem").read())
print("other-volunteer", os.path.exists(f"{work}/agent-other/identity.json"))
print("state", sorted(os.listdir(state)))
print("shm", sorted(os.listdir("/dev/shm")))
open(f"{work}/agent-me/identity.json", "w").write("mine")
open("/tmp/scratch", "w").write("stays inside")
"""


def test_a_sandboxed_volunteer_sees_only_the_gateway_the_ca_and_its_own_directories() -> None:
    work = Path("/tmp") / f"koinon-sbx-{secrets.token_hex(3)}"  # the sandbox covers /tmp
    state = Path("/var/tmp") / f"koinon-sbx-state-{secrets.token_hex(3)}"  # outside it: hidden on request
    netns = f"ksbx-{secrets.token_hex(3)}"
    listeners = []
    try:
        for directory in (work / "head", work / "agent-me", work / "agent-other", state):
            directory.mkdir(parents=True)
        (work / "agent-other" / "identity.json").write_text("credential")
        (work / "ca.pem").write_text("CA")
        (state / "ray-auth-token").write_text("token")
        for path in (work / "head" / "raylet.sock", work / "gw.sock"):
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(path))
            listener.listen()
            listeners.append(listener)
        create_netns(netns)
        shm_marker = Path("/dev/shm") / f"koinon-sbx-{secrets.token_hex(3)}"
        shm_marker.write_text("host")
        try:
            completed = subprocess.run(
                ["ip", "netns", "exec", netns, sys.executable, "-m", "koinon_dev.volunteer_sandbox",
                 f"--expose={work}/gw.sock", f"--expose={work}/ca.pem", f"--expose={work}/agent-me",
                 f"--hide={state}", "--", sys.executable, "-c", PROBE, str(work), str(state)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        finally:
            shm_marker.unlink()
        assert completed.returncode == 0, completed.stderr
        seen = dict(line.split(" ", 1) for line in completed.stdout.splitlines())
        assert seen == {
            "head-socket": "FileNotFoundError",
            "gateway-socket": "connected",
            "ca": "CA",
            "other-volunteer": "False",
            "state": "[]",
            "shm": "[]",
        }
        # Its own directory is the real one; what it wrote elsewhere in /tmp stayed in the sandbox.
        assert (work / "agent-me" / "identity.json").read_text() == "mine"
        assert not Path("/tmp/scratch").exists()
        assert "koinon-sandbox" not in Path("/proc/mounts").read_text()
    finally:
        delete_netns(netns)
        for listener in listeners:
            listener.close()
        subprocess.run(["rm", "-rf", str(work), str(state)], check=False)
