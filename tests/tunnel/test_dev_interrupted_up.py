"""A real `koinon dev up`, stopped by SIGTERM while its volunteer's Ray node is starting: every
process (Ray's renamed ones too), network namespace and file it created is gone afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from koinon_dev.cluster import RUN_ENV, DevCluster, DevClusterConfig, DevClusterInfo
from koinon_dev.processes import kill_processes_using
from koinon_dev.tunnel_plane import delete_netns

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# `koinon dev up` that never sees its volunteers as joined: it is still starting when signalled.
UP_DRIVER = """
import signal, sys
import koinon_dev.cluster as cluster
from koinon_dev import cli
cluster._alive_workers = lambda head: 0
cli.main(["--state-dir", sys.argv[1], "--volunteers", "1", "dev", "up"])
"""


def users_of(work_dir: Path) -> list[str]:
    """Processes naming ``work_dir`` in their command line, holding a file under it, or carrying
    the run's environment marker."""
    marker = f"\0{RUN_ENV}={work_dir}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            uses = str(work_dir).encode() in (entry / "cmdline").read_bytes()
            uses = uses or marker in b"\0" + (entry / "environ").read_bytes() + b"\0"
            for fd in os.listdir(entry / "fd"):
                uses = uses or os.readlink(entry / "fd" / fd).startswith(f"{work_dir}/")
        except OSError:
            continue
        if uses:
            found.append(f"{entry.name} {(entry / 'comm').read_text().strip()}")
    return found


def volunteer_ray_started(work_dir: Path) -> bool:
    """The volunteer's Ray node runs its (renamed) dashboard agent."""
    node_dir = f"{work_dir}/ray-volunteer-1/"
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and (entry / "comm").read_text().startswith("ray::Dashboard")
                and any(os.readlink(entry / "fd" / fd).startswith(node_dir) for fd in os.listdir(entry / "fd"))
            ):
                return True
        except OSError:
            continue
    return False


def test_sigterm_during_up_leaves_nothing_behind(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    up = subprocess.Popen(
        [sys.executable, "-c", UP_DRIVER, str(state_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    state: DevClusterInfo | None = None
    try:
        deadline = time.monotonic() + 120
        while True:
            assert up.poll() is None, up.communicate()[0]
            assert time.monotonic() < deadline, "the volunteer's Ray node never started"
            if (state_dir / "cluster.json").exists():
                state = DevClusterInfo.load(state_dir / "cluster.json")
                joining = "agent-volunteer-1" in state.process_groups
                if joining and state.work_dir is not None and volunteer_ray_started(state.work_dir):
                    break
            time.sleep(0.3)
        assert state is not None and state.work_dir is not None
        up.send_signal(signal.SIGTERM)
        output, _ = up.communicate(timeout=120)
        assert up.returncode == 128 + signal.SIGTERM, output
        assert "koinon: stopped by SIGTERM" in output
        time.sleep(0.5)
        assert users_of(state.work_dir) == []
        assert not state.work_dir.exists()
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(name not in namespaces for name in state.network_namespaces), namespaces
        assert not {"cluster.json", "kubeconfig", "ray-auth-token"} & {p.name for p in state_dir.iterdir()}
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if (state_dir / "cluster.json").exists():
            DevCluster(DevClusterConfig(state_dir=state_dir)).down()
        if state is not None and state.work_dir is not None:
            kill_processes_using(state.work_dir, env_marker=f"{RUN_ENV}={state.work_dir}")
            for name in state.network_namespaces:
                delete_netns(name)
            shutil.rmtree(state.work_dir, ignore_errors=True)
