"""The agent's supervision of ``ray start``, with a stand-in that hangs instead of serving (or
fails, saying why on stderr).

A Ray node that never gets to serve (no raylet, no node id) cannot be made from real Ray on
demand, so ``--ray-bin`` points at a script that records each start and then sleeps; the agent,
gateway and tunnel are the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from koinon_agent.ray_node import START_LOG_TAIL_LINES, read_start_log_tail

from .helpers import cluster


async def test_a_ray_start_that_never_serves_is_replaced(tmp_path: Path) -> None:
    # Made before Ray starts: confined Ray can create no entry in tmp_path, above the state dir.
    (tmp_path / "records").mkdir()
    starts = tmp_path / "records" / "starts"
    hung_ray = tmp_path / "ray"
    hung_ray.write_text(f"#!/bin/sh\necho $$ >> {starts}\nexec sleep 600\n")
    hung_ray.chmod(0o755)
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("hung", start_ray=True, ray_bin=str(hung_ray), ray_start_timeout_s=1.0)
        deadline = asyncio.get_running_loop().time() + 15
        while not starts.exists() or len(starts.read_text().split()) < 2:
            assert asyncio.get_running_loop().time() < deadline, "the hung start was never replaced"
            await asyncio.sleep(0.1)
        first, second = (int(pid) for pid in starts.read_text().split()[:2])
        assert first != second
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
        # Meanwhile the node is connected and says why it is not Ready.
        assert agent.identity is not None
        node = await c.registry.get(agent.identity.node_name)
        assert node is not None
        status = node["status"]
        assert status["phase"] == "NotReady" and status["connected"] is True
        ready = next(cond for cond in status["conditions"] if cond["type"] == "Ready")
        assert ready["reason"] == "RayNotRunning"
        os.kill(second, 0)  # the replacement is the one running now


NODE_ID = "ab" * 28

# A stand-in for `ray start --block` that behaves as Ray 2.60's does (ray/scripts/scripts.py): it
# watches its subprocesses and exits 1 only when one of them exits with an *unexpected* code; a
# raylet that exits 0 or by SIGTERM ("treated as graceful, thus NOT reported") leaves it blocking.
FAKE_RAYLET = """#!/bin/bash
# comm of a script run through its shebang is the script's name: psutil sees a "raylet".
logs="$1"; shift
mkdir -p "$logs"
printf 'node_id=%s\\nNodeManager server started\\n' "{node_id}" >> "$logs/raylet.out"
sleep {raylet_lifetime}
exit 0   # a graceful exit (what a SIGTERM'd raylet does: `ray stop` run by a job, a drain, ...)
"""

FAKE_RAY_START = """#!/bin/bash
echo $$ >> {starts}
for arg in "$@"; do case "$arg" in --temp-dir=*) temp="${{arg#--temp-dir=}}";; esac; done
{raylet} "$temp/session_latest/logs" --node_id={node_id} &
raylet=$!
wait $raylet
code=$?
case $code in 0|15|143) ;; *) exit 1;; esac   # ray start --block: graceful exits are not reported
exec sleep 600
"""


async def test_a_raylet_that_exits_gracefully_is_noticed_and_the_node_restarted(tmp_path: Path) -> None:
    """The agent watches only `ray start --block`. When the raylet exits gracefully (code 0 or
    SIGTERM) `ray start --block` keeps blocking, so the agent keeps reporting the dead node as
    "running" with its old node id (the gateway keeps the VolunteerNode Ready) and never restarts
    it: the volunteer is silently out of the Ray cluster for good."""
    starts = tmp_path / "starts"
    starts.touch()
    raylet = tmp_path / "bin" / "raylet"
    raylet.parent.mkdir()
    raylet.write_text(FAKE_RAYLET.format(node_id=NODE_ID, raylet_lifetime=2))
    raylet.chmod(0o755)
    fake_ray = tmp_path / "ray"
    fake_ray.write_text(FAKE_RAY_START.format(starts=starts, raylet=raylet, node_id=NODE_ID))
    fake_ray.chmod(0o755)
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("graceful", start_ray=True, ray_bin=str(fake_ray))
        deadline = time.monotonic() + 15
        while agent._ray_state()[1] != "running":
            assert time.monotonic() < deadline, f"fake Ray never served: {agent._ray_state()}"
            await asyncio.sleep(0.1)
        # The raylet exits ~2 s after it started; give the agent ample time to notice.
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            restarted = len(starts.read_text().split()) >= 2
            if restarted or agent._ray_state()[1] != "running":
                return
            await asyncio.sleep(0.2)
        pytest.fail(
            f"raylet gone for ~10 s, yet the agent still reports {agent._ray_state()} and never restarted Ray "
            f"({len(starts.read_text().split())} start(s))"
        )


async def test_a_ray_start_that_fails_is_logged_with_the_end_of_its_output(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`ray start` exits 1 with its reason on stderr (a Ray version that does not match the
    head's, say). The agent logged only "Ray node exited with 1; restarting", again and again: a
    volunteer reading the agent's log (kubectl logs) learnt neither why nor where to look."""
    fake_ray = tmp_path / "ray"
    fake_ray.write_text(
        "#!/bin/sh\nprintf 'RuntimeError: Version mismatch: head runs Ray 2.59.0\\033[2J\\n' >&2\nexit 1\n"
    )
    fake_ray.chmod(0o755)
    caplog.set_level(logging.INFO, logger="koinon_agent")
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("alpha", start_ray=True, ray_bin=str(fake_ray))
        deadline = asyncio.get_running_loop().time() + 15
        while "Ray node exited" not in caplog.text:
            assert asyncio.get_running_loop().time() < deadline, "the failed start was not noticed"
            await asyncio.sleep(0.05)
        line = next(r.getMessage() for r in caplog.records if "Ray node exited" in r.getMessage())
        assert str(agent.config.ray_temp_dir.absolute() / "ray-start.log") in line, line
        assert "RuntimeError: Version mismatch: head runs Ray 2.59.0?[2J" in line, line  # no escape reaches the log
        assert "\x1b" not in line


def test_the_start_log_excerpt_is_bounded_and_only_this_runs(tmp_path: Path) -> None:
    """Job code can write Ray's temp dir: what is quoted from ray-start.log is bounded in bytes,
    lines and characters, is this run's output only, and never read through a symlink."""
    log = tmp_path / "ray-start.log"
    log.write_text("an earlier run's line\n")
    offset = log.stat().st_size
    assert read_start_log_tail(log, offset) == []
    with log.open("a") as out:
        out.write("".join(f"line {i}\n" for i in range(10_000)) + "x" * 500 + "\n\x1b]0;title\x07last\n")
    tail = read_start_log_tail(log, offset)
    assert len(tail) == START_LOG_TAIL_LINES and tail[-1] == "?]0;title?last"
    assert all(len(line) <= 300 for line in tail) and tail[-2] == "x" * 300
    assert read_start_log_tail(log, 0)[-1] == "?]0;title?last"
    secret = tmp_path / "identity.json"
    secret.write_text("credential\n")
    log.unlink()
    log.symlink_to(secret)
    assert read_start_log_tail(log) == []
    assert read_start_log_tail(tmp_path / "missing.log") == []


RECORDING_RAY = "#!/bin/sh\necho $$ >> {starts}\nexec sleep 600\n"


@pytest.mark.parametrize(
    "plant", ["a file at the temp dir", "a symlink from the temp dir to the state dir", "a file at Ray's TMPDIR"]
)
async def test_what_job_code_plants_at_rays_temp_dir_does_not_keep_ray_from_starting_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plant: str
) -> None:
    """The chart: KOINON_TEMP_DIR=/tmp/ray, in an emptyDir that outlives container restarts and
    that job code (the agent's user, the same Landlock domain) can write. It moves /tmp/ray aside,
    puts something in its place and kills its raylet. A file failed every later start before it
    ran (mkdir: FileExistsError, retried for ever); a symlink to the state dir had every start
    refused by the launcher (exit 78) and ray-start.log created in the state dir: the node stayed
    connected and NotReady for good, liveness green, so nothing restarted it either."""
    (tmp_path / "records").mkdir()  # made before Ray starts: confined Ray can create nothing in tmp_path
    starts = tmp_path / "records" / "starts"
    fake_ray = tmp_path / "ray-bin"
    fake_ray.write_text(RECORDING_RAY.format(starts=starts))
    fake_ray.chmod(0o755)
    # Ray gets TMPDIR in its temp dir when the agent's own is above the state dir (scratch_dirs).
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    state = tmp_path / "agent-beta"  # the state dir the cluster's agent config gives "beta"
    state.mkdir(mode=0o700)
    temp_dir = tmp_path / "pod-tmp" / "ray"
    temp_dir.parent.mkdir()
    if plant == "a file at the temp dir":
        temp_dir.write_text("planted by job code\n")
    elif plant == "a symlink from the temp dir to the state dir":
        temp_dir.symlink_to(state)
    else:
        temp_dir.mkdir()
        (temp_dir / "tmpdir").write_text("planted by job code\n")
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("beta", start_ray=True, ray_bin=str(fake_ray), temp_dir=temp_dir)
        assert agent.config.state_dir == state
        deadline = time.monotonic() + 8  # the supervisor's first retries come after 1-2 s, 2-4 s
        while not starts.exists():
            assert time.monotonic() < deadline, f"Ray was never started again: {plant} blocks every start"
            await asyncio.sleep(0.2)
        assert temp_dir.is_dir() and not temp_dir.is_symlink() and (temp_dir / "tmpdir").is_dir()
        assert "ray-start.log" not in os.listdir(state), "ray start's output went into the state dir"


async def test_a_temp_dir_swapped_for_a_symlink_to_the_state_dir_while_ray_runs_is_taken_back(
    tmp_path: Path,
) -> None:
    """Job code moves Ray's temp dir aside, puts a symlink to the state dir in its place and kills
    its Ray. The launcher rightly refused to confine Ray to what that symlink reaches (exit 78),
    on every restart for ever, and ray start's log was opened through it, in the state dir. The
    symlink is removed, never followed, and the next start gets a real temp dir again."""
    (tmp_path / "records").mkdir()  # made before Ray starts: confined Ray can create nothing in tmp_path
    starts = tmp_path / "records" / "starts"
    fake_ray = tmp_path / "ray-bin"
    fake_ray.write_text(RECORDING_RAY.format(starts=starts))
    fake_ray.chmod(0o755)
    temp_dir = tmp_path / "pod-tmp" / "ray"
    async with cluster(tmp_path, tls=False) as c:
        agent = await c.start_agent("gamma", start_ray=True, ray_bin=str(fake_ray), temp_dir=temp_dir)
        state = agent.config.state_dir
        deadline = time.monotonic() + 10
        while not starts.exists():
            assert time.monotonic() < deadline, "Ray never started"
            await asyncio.sleep(0.1)
        before = set(os.listdir(state))
        temp_dir.rename(temp_dir.with_name("ray.old"))
        temp_dir.symlink_to(state)
        os.kill(int(starts.read_text().split()[0]), signal.SIGKILL)
        deadline = time.monotonic() + 10  # the supervisor's next tries come after 1-2 s, 2-4 s
        while len(starts.read_text().split()) < 2:
            assert time.monotonic() < deadline, "Ray was never started again after the temp dir became a symlink"
            await asyncio.sleep(0.2)
        assert temp_dir.is_dir() and not temp_dir.is_symlink()
        assert set(os.listdir(state)) == before, "something was created in, or removed from, the state dir"


SPAWN_RECORDING_RAY = """#!/bin/sh
echo $$ > {pidfile}
exec sleep 30
"""


@pytest.mark.parametrize("delay", [0.001, 0.004])
@pytest.mark.parametrize("confined", [False, True])
async def test_a_start_cancelled_mid_spawn_leaves_no_ray_running(tmp_path: Path, confined: bool, delay: float) -> None:
    """A drain or a new assignment that cancels start() while `ray start` is being spawned in its
    worker thread: the thread goes on, and the Ray it started ran on untracked (stop() found no
    process), holding the node's ports, or closed descriptors were handed to Popen."""
    from koinon_agent.ray_node import RayNode, RaySettings
    from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

    pidfile = tmp_path / "ray-tmp" / "fake-ray.pid"  # beneath the temp dir: writable when confined
    fake_ray = tmp_path / "ray"
    fake_ray.write_text(SPAWN_RECORDING_RAY.format(pidfile=pidfile))
    fake_ray.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    node = RayNode(
        RaySettings(
            ray_bin=str(fake_ray), temp_dir=tmp_path / "ray-tmp", proxy_url="http://127.0.0.1:1",
            num_cpus=1, num_gpus=0, gpu_memory_mib=0, object_store_memory=None,
            state_dir=state if confined else None,
        )
    )  # fmt: skip
    assignment = pb.Assignment(ray_address="127.0.0.1:6379", address="127.0.0.1", node_name="n")
    task = asyncio.ensure_future(node.start(assignment))
    await asyncio.sleep(0)  # start() runs up to its spawn in the worker thread
    time.sleep(delay)  # the worker thread is inside Popen (a loop busy elsewhere for a moment)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await node.stop()  # what the agent's _stop_ray_node does next
    await asyncio.sleep(1.5)
    if pidfile.exists():
        pid = int(pidfile.read_text())
        alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        if alive:
            os.kill(pid, signal.SIGKILL)
        assert not alive, f"ray start (pid {pid}) left running after start() was cancelled and stop() ran"
