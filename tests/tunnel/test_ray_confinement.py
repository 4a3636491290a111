"""Ray, and the job code it runs, cannot reach the agent's state dir (Landlock, ray_launch.py), and
Ray goes when the agent is killed. The launcher is run as the agent runs it; the agent tests use a
stand-in ``ray`` through a real agent and gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from koinon_agent import ray_launch
from koinon_agent.ray_node import RaySettings, ray_environment
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import cluster

needs_landlock = pytest.mark.skipif(ray_launch.landlock_abi() == 0, reason="this kernel has no Landlock")

# What job code tries; prints one "name outcome" line per attempt.
PROBE = """
import os, sys
state, outside = sys.argv[1], sys.argv[2]
ray = os.path.join(state, "ray")

def attempt(name, action):
    try:
        action()
        print(name, "allowed")
    except OSError as exc:
        print(name, type(exc).__name__)

def write(path):
    with open(path, "w") as handle:
        handle.write("x")

attempt("read-credential", lambda: open(os.path.join(state, "identity.json")).read())
attempt("write-credential", lambda: write(os.path.join(state, "identity.json")))
attempt("truncate-credential", lambda: os.truncate(os.path.join(state, "identity.json"), 0))
attempt("create-in-state", lambda: write(os.path.join(state, "planted")))
attempt("symlink-in-state", lambda: os.symlink("/etc/passwd", os.path.join(state, "health.tmp")))
attempt("remove-credential", lambda: os.unlink(os.path.join(state, "identity.json")))
attempt("rename-credential", lambda: os.rename(os.path.join(state, "identity.json"), os.path.join(state, "i")))
attempt("move-credential-out", lambda: os.rename(os.path.join(state, "identity.json"), os.path.join(ray, "i")))
attempt("link-credential-out", lambda: os.link(os.path.join(state, "identity.json"), os.path.join(ray, "l")))
attempt("ray-write", lambda: write(os.path.join(ray, "session", "new")))
attempt("ray-read", lambda: open(os.path.join(ray, "session", "new")).read())
attempt("ray-move-across", lambda: os.rename(os.path.join(ray, "session", "new"), os.path.join(ray, "moved")))
attempt("ray-remove", lambda: os.unlink(os.path.join(ray, "moved")))
attempt("read-sibling", lambda: open(outside).read())
attempt("read-usr", lambda: open(os.path.realpath(sys.executable), "rb").read(16))
"""

DENIED = ("PermissionError", "OSError")  # EACCES, and EXDEV for a link out of the state dir


def launch(tmp_path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    state = tmp_path / "state"
    argv = ray_launch.launcher_command(os.getpid(), command, state, state / "ray")
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def make_state(tmp_path: Path) -> tuple[Path, Path]:
    state = tmp_path / "state"
    (state / "ray" / "session").mkdir(parents=True)
    (state / "identity.json").write_text('{"credential": "secret"}')
    outside = tmp_path / "beside-the-state-dir.txt"
    outside.write_text("not secret")
    return state, outside


@needs_landlock
def test_job_code_cannot_reach_the_state_dir_but_ray_keeps_its_temp_dir(tmp_path: Path) -> None:
    # Landlock binds root too (these tests run as root): no capability lets job code past it.
    state, outside = make_state(tmp_path)
    result = launch(tmp_path, sys.executable, "-c", PROBE, str(state), str(outside))
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
    outcomes = dict(line.split() for line in result.stdout.splitlines())
    for name in (
        "read-credential",
        "write-credential",
        "truncate-credential",
        "create-in-state",
        "symlink-in-state",
        "remove-credential",
        "rename-credential",
        "move-credential-out",
        "link-credential-out",
    ):
        assert outcomes[name] in DENIED, f"{name}: {outcomes[name]} (as uid {os.geteuid()})"
    for name in ("ray-write", "ray-read", "ray-move-across", "ray-remove", "read-sibling", "read-usr"):
        assert outcomes[name] == "allowed", f"{name}: {outcomes[name]}"
    assert (state / "identity.json").read_text() == '{"credential": "secret"}'
    assert sorted(p.name for p in state.iterdir()) == ["identity.json", "ray"]


@needs_landlock
def test_a_symlink_beside_the_state_dir_grants_nothing_in_it(tmp_path: Path) -> None:
    # A rule on what a symlink beside the state dir points at would cover the state dir.
    state, _ = make_state(tmp_path)
    (tmp_path / "to-parent").symlink_to(tmp_path)
    (tmp_path / "to-state").symlink_to(state)
    (tmp_path / "to-credential").symlink_to(state / "identity.json")
    read = (
        "import sys\nfor p in sys.argv[1:]:\n try: open(p).read(); print('allowed')\n except OSError: print('denied')"
    )
    paths = [tmp_path / "to-parent" / "state" / "identity.json", tmp_path / "to-state" / "identity.json"]
    paths.append(tmp_path / "to-credential")
    result = launch(tmp_path, sys.executable, "-c", read, *map(str, paths))
    assert result.stdout.split() == ["denied"] * 3, result.stderr


def test_without_landlock_ray_starts_unconfined_with_a_warning(tmp_path: Path) -> None:
    state, _ = make_state(tmp_path)
    unavailable = (
        "import sys, ray_launch\nray_launch.landlock_abi = lambda: 0\nsys.exit(ray_launch.main(sys.argv[1:]))\n"
    )
    argv = ray_launch.launcher_command(os.getpid(), ["cat", str(state / "identity.json")], state, state / "ray")
    argv[1:3] = ["-c", unavailable]  # the launcher itself, with Landlock taken away
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, cwd=Path(ray_launch.__file__).parent
    )
    assert result.returncode == 0 and result.stdout == '{"credential": "secret"}'
    assert result.stderr.count("\n") == 1
    assert f"job code on this node can read the node credential in {state}" in result.stderr


def test_ray_gets_a_tmpdir_and_home_it_can_use_when_the_state_dir_is_beneath_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Files created once Ray runs directly in a directory above the state dir are covered by no rule.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() caches its answer
    state = tmp_path / "home" / ".koinon" / "agent"
    settings = RaySettings("ray", state / "ray", "http://127.0.0.1:1", None, 0, 0, None, state_dir=state)
    env = ray_environment(settings, pb.Assignment(address="127.0.20.1"))
    assert env["TMPDIR"] == str(state / "ray" / "tmpdir")
    assert env["HOME"] == str(state / "ray" / "home")
    elsewhere = RaySettings("ray", tmp_path / "ray", "http://127.0.0.1:1", None, 0, 0, None, state_dir=tmp_path / "s")
    env = ray_environment(elsewhere, pb.Assignment(address="127.0.20.1"))
    assert env["TMPDIR"] == str(tmp_path / "ray" / "tmpdir")  # /tmp/... holds the state dir
    assert env["HOME"] == str(tmp_path / "home")  # HOME does not


@needs_landlock
async def test_the_agents_ray_node_cannot_read_its_credential(tmp_path: Path) -> None:
    state = tmp_path / "agent-confined"
    temp = state / "ray"
    fake_ray = tmp_path / "ray"
    # A job's process on the node: reads the credential, uses Ray's TMPDIR, records both.
    fake_ray.write_text(
        "#!/bin/sh\n"
        f"sh -c 'cat {state}/identity.json > /dev/null 2>&1; echo $? > {temp}/credential-read'\n"
        f'sh -c \'echo x > "$TMPDIR/probe" && cat "$TMPDIR/probe" > {temp}/tmpdir-used\'\n'
        "exec sleep 600\n"
    )
    fake_ray.chmod(0o755)
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("confined", start_ray=True, ray_bin=str(fake_ray))
        assert (state / "identity.json").exists()
        deadline = time.monotonic() + 15
        while not (temp / "credential-read").exists() or not (temp / "tmpdir-used").exists():
            assert time.monotonic() < deadline, f"the fake Ray never ran: {agent._ray_state()}"
            await asyncio.sleep(0.1)
        assert (temp / "credential-read").read_text().strip() != "0", "Ray's job code read identity.json"
        assert (temp / "tmpdir-used").read_text() == "x\n"


async def test_a_killed_agent_does_not_leave_its_ray_node_running(tmp_path: Path) -> None:
    """An agent that is SIGKILLed (OOM killer, systemd's stop timeout) takes its Ray node along
    (the launcher's PR_SET_PDEATHSIG), rather than leaving it holding GPUs and ports."""
    # Made before Ray starts: confined Ray can create no entry in tmp_path, above the state dir.
    (tmp_path / "records").mkdir()
    pid_file = tmp_path / "records" / "ray.pid"
    fake_ray = tmp_path / "ray"
    fake_ray.write_text(f"#!/bin/bash\necho $$ > {pid_file}\nexec sleep 600\n")
    fake_ray.chmod(0o755)
    async with cluster(tmp_path, tls=False) as c:
        token = c.tokens.add(owner="alice", region="eu")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KOINON_")}
        process = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "koinon_agent.cli", "join", "--gateway", c.gateway.agent_target],
            *["--insecure", "--token", token, "--state-dir", str(tmp_path / "agent"), "--simulate-gpus", "0"],
            *["--ray-bin", str(fake_ray)],
            env=env,
            stderr=asyncio.subprocess.DEVNULL,
        )
        ray_pid = 0
        try:
            deadline = time.monotonic() + 60
            while not pid_file.exists() or not pid_file.read_text().strip():
                assert process.returncode is None and time.monotonic() < deadline, "ray never started"
                await asyncio.sleep(0.2)
            ray_pid = int(pid_file.read_text())
            ray = psutil.Process(ray_pid)
            process.kill()  # SIGKILL: no finally, no _shutdown
            await process.wait()
            deadline = time.monotonic() + 2
            while ray.is_running() and ray.status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline, f"Ray node (pid {ray_pid}) outlived its SIGKILLed agent"
                await asyncio.sleep(0.05)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            if ray_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(ray_pid, signal.SIGKILL)
