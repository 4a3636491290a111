"""The agent's health report and ``koinon-agent health`` (what the Helm chart's exec probes run)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from koinon_agent import cli, health
from koinon_agent.agent import Agent
from koinon_agent.config import AgentConfig

from .helpers import as_non_root, cluster


def report(tmp_path: Path, written_at: float, connected: bool = True, ray_state: str = "running") -> None:
    health.write(tmp_path / health.FILE_NAME, health.HealthReport(written_at, connected, ray_state, "alice-1"))


@pytest.mark.parametrize(
    ("connected", "ray_state", "ready"),
    [
        (True, "running", True),
        (True, "disabled", True),
        (True, "starting", False),
        (True, "restarting", False),
        (False, "running", False),
    ],
)
def test_ready_needs_the_gateway_and_a_serving_ray_node(
    tmp_path: Path, connected: bool, ray_state: str, ready: bool
) -> None:
    report(tmp_path, 1000.0, connected, ray_state)
    assert health.check(tmp_path / health.FILE_NAME, 30, need_ready=False, now=1010.0)[0] is True  # alive either way
    healthy, why = health.check(tmp_path / health.FILE_NAME, 30, need_ready=True, now=1010.0)
    assert healthy is ready
    assert f"connected={connected} ray={ray_state} node=alice-1" in why


def test_a_stale_report_means_a_stuck_agent(tmp_path: Path) -> None:
    report(tmp_path, 1000.0)
    healthy, why = health.check(tmp_path / health.FILE_NAME, 30, need_ready=False, now=1031.0)
    assert not healthy and "31s ago" in why


def test_a_report_from_the_future_is_not_fresh_for_ever(tmp_path: Path) -> None:
    """A clock that was ahead when the report was written and has stepped back since (a board
    without a real-time clock, corrected after boot) gave the report a negative age: it passed
    the liveness probe however long the agent stayed stuck."""
    report(tmp_path, 4600.0)
    healthy, why = health.check(tmp_path / health.FILE_NAME, 30, need_ready=False, now=1000.0)
    assert not healthy and "in the future" in why
    assert (
        health.check(tmp_path / health.FILE_NAME, 30, need_ready=False, now=4590.0)[0] is True
    )  # a little skew is fine


def test_missing_or_garbled_report_fails_saying_why(tmp_path: Path) -> None:
    assert health.check(tmp_path / health.FILE_NAME, 30, need_ready=False) == (
        False,
        f"{tmp_path / 'health.json'}: no health report yet (agent not started, or another --state-dir/--health-file)",
    )
    (tmp_path / "health.json").write_text('{"written_at": 1')
    healthy, why = health.check(tmp_path / health.FILE_NAME, 30, need_ready=False)
    assert not healthy and "unreadable health report" in why


def test_health_command_reads_the_state_dir_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    report(tmp_path, time.time(), connected=False)
    monkeypatch.setenv("KOINON_STATE_DIR", str(tmp_path))
    assert cli.main(["health"]) == 0
    assert cli.main(["health", "--ready"]) == 1
    assert "not ready: connected=False" in capsys.readouterr().err


async def test_running_agent_reports_connection_and_losing_the_gateway(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha")
        state_dir = agent.config.state_dir
        # The first report predates the join; the next one (every 5 s) says connected.
        deadline = asyncio.get_running_loop().time() + 12
        report_file = state_dir / health.FILE_NAME
        while not health.check(report_file, 30, need_ready=True)[0]:
            assert asyncio.get_running_loop().time() < deadline, health.check(
                state_dir / health.FILE_NAME, 30, need_ready=True
            )
            await asyncio.sleep(0.2)
        written = json.loads((state_dir / "health.json").read_text())
        assert agent.identity is not None
        assert (written["ray_state"], written["node_name"]) == ("disabled", agent.identity.node_name)
        await c.gateway.stop(0)
        deadline = asyncio.get_running_loop().time() + 12
        while health.check(state_dir / health.FILE_NAME, 30, need_ready=True)[0]:
            assert asyncio.get_running_loop().time() < deadline, "still ready without a gateway"
            await asyncio.sleep(0.2)
        assert health.check(state_dir / health.FILE_NAME, 30, need_ready=False)[0]  # not ready, but alive


def run_health(
    state_dir: Path, *, new_pid_namespace: bool, write_first: bool = False
) -> subprocess.CompletedProcess[str]:
    """``koinon-agent health`` as an exec probe runs it, optionally in a PID namespace of its own
    (a container started after the report was written); ``write_first``: an agent in that
    namespace writes its report first."""
    probe = f"{shlex.quote(sys.executable)} -m koinon_agent.cli health --state-dir {shlex.quote(str(state_dir))}"
    if write_first:
        writer = (
            "import time; from pathlib import Path; from koinon_agent import health; "
            f"health.write(Path({str(state_dir / 'health.json')!r}), "
            "health.HealthReport(time.time(), True, 'running', 'alice-1'))"
        )
        probe = f"{shlex.quote(sys.executable)} -c {shlex.quote(writer)} && {probe}"
    command = ["sh", "-c", probe]
    if new_pid_namespace:
        command = ["unshare", "--pid", "--fork", "--mount-proc", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_a_report_left_by_a_previous_container_is_not_taken_for_the_running_agent(tmp_path: Path) -> None:
    """A PVC, hostPath or an emptyDir kept across a container restart hands the new container the
    old one's health.json; until the new agent writes its own, it must not pass the probes."""
    report(tmp_path, time.time() - 3)  # fresh by age, written before the "container" below started
    time.sleep(1.5)
    assert run_health(tmp_path, new_pid_namespace=False).returncode == 0  # the writer's own namespace
    stale = run_health(tmp_path, new_pid_namespace=True)
    assert stale.returncode == 1 and "previous container" in stale.stdout + stale.stderr
    own = run_health(tmp_path, new_pid_namespace=True, write_first=True)
    assert own.returncode == 0, own.stdout + own.stderr


async def test_the_state_dir_is_private_even_though_the_health_writer_starts_first(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha")
        assert stat.S_IMODE(agent.config.state_dir.stat().st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chattr") is None, reason="needs root and chattr(1)")
async def test_a_state_dir_that_cannot_be_written_does_not_fail_liveness(tmp_path: Path) -> None:
    """The health report lives apart from the state volume (the chart puts it on /tmp): a state
    dir that turned read-only or full leaves a working agent alive to the liveness probe."""
    health_file = tmp_path / "scratch" / "health.json"
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha", health_file=health_file)
        state_dir = agent.config.state_dir
        assert not (state_dir / health.FILE_NAME).exists()
        first = json.loads(health_file.read_text())["written_at"]
        # Immutable: nobody, root included, can create or replace a file in it (a read-only volume).
        subprocess.run(["chattr", "+i", str(state_dir)], check=True)
        try:
            with pytest.raises(OSError):
                (state_dir / "probe").write_text("x")
            deadline = time.monotonic() + health.WRITE_INTERVAL_S + 5
            while json.loads(health_file.read_text())["written_at"] == first:
                assert time.monotonic() < deadline, "the health report was not rewritten"
                await asyncio.sleep(0.2)
            assert health.check(health_file, 30, need_ready=False)[0]
            assert agent.connected.is_set()
        finally:
            subprocess.run(["chattr", "-i", str(state_dir)], check=True)


NO_CAPABILITIES = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv(1)")
async def test_processes_of_the_agents_user_cannot_read_its_token_from_proc(tmp_path: Path) -> None:
    """Ray's processes and the jobs they run share the agent's user. Without capabilities, root is
    such a user here (tests run as root): it reads a dumpable process's environ, not the agent's."""
    token_env = {k: v for k, v in os.environ.items() if not k.startswith("KOINON_")}
    async with cluster(tmp_path, tls=False) as c:
        token = c.tokens.add(owner="alice")
        env = {**token_env, "KOINON_TOKEN": token}  # as the chart passes it
        agent = await asyncio.create_subprocess_exec(
            *NO_CAPABILITIES, sys.executable, "-m", "koinon_agent.cli", "join", "--gateway", c.gateway.agent_target,
            "--insecure", "--no-ray", "--state-dir", str(tmp_path / "agent"), "--simulate-gpus", "0",
            env=env, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        dumpable = await asyncio.create_subprocess_exec(*NO_CAPABILITIES, "sleep", "60", env=env)
        try:
            deadline = time.monotonic() + 60
            while not c.gateway.sessions.by_name:  # joined with the token from its environment
                assert agent.returncode is None and time.monotonic() < deadline, "the agent did not join"
                await asyncio.sleep(0.2)

            def read_environ(pid: int) -> subprocess.CompletedProcess[bytes]:
                return subprocess.run([*NO_CAPABILITIES, "cat", f"/proc/{pid}/environ"], capture_output=True)

            assert token.encode() in read_environ(dumpable.pid).stdout  # the reader can read a plain one
            hidden = read_environ(agent.pid)
            assert hidden.returncode != 0 and token.encode() not in hidden.stdout
        finally:
            for process in (agent, dumpable):
                process.terminate()
                await process.wait()


def test_an_agent_without_ray_tells_the_gateway_so(tmp_path: Path) -> None:
    """--no-ray: the heartbeat says "disabled" as the health report does (it said "starting" for
    ever, and the VolunteerNode read "RayNotRunning: Ray node starting")."""
    agent = Agent(
        AgentConfig(gateway="127.0.0.1:1", insecure=True, state_dir=tmp_path, start_ray=False, simulate_gpus=0)
    )
    assert agent.health_report().ray_state == "disabled"
    assert agent._heartbeat(None).ray_state == "disabled"


def test_the_report_is_not_written_through_a_planted_symlink(tmp_path: Path) -> None:
    """The chart keeps the report in /tmp, which Ray's job code can write: a symlink planted where
    the agent writes its next report must not make it overwrite the symlink's target (the node's
    credential, say)."""
    victim = tmp_path / "identity.json"
    victim.write_text("credential")
    report_dir = tmp_path / "health"
    report_dir.mkdir()
    (report_dir / "health.tmp").symlink_to(victim)
    health.write(
        report_dir / "health.json", health.HealthReport(written_at=time.time(), connected=True, ray_state="running")
    )
    assert victim.read_text() == "credential"
    assert json.loads((report_dir / "health.json").read_text())["connected"] is True
    assert sorted(p.name for p in report_dir.iterdir()) == ["health.json", "health.tmp"]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        # NaN fails every comparison: the report counted as fresh for ever. The chart's health file
        # is in /tmp, which job code of the agent's user can write.
        ({"written_at": float("nan")}, "written_at"),
        ({"written_at": float("inf")}, "written_at"),
        ({"written_at": 10**400}, "written_at"),  # past a float
        ({"written_at": "1700000000"}, "written_at"),  # raised TypeError: the probe printed a traceback
        ({"written_at": True}, "written_at"),
        ({"written_at": None}, "written_at"),
        ({"connected": "yes"}, "connected"),
        ({"connected": 1}, "connected"),
        ({"ray_state": ["running"]}, "ray_state"),
        ({"node_name": 7}, "node_name"),
        ({"extra": 1}, "extra"),
    ],
)
def test_a_report_of_another_shape_is_unreadable_saying_why(
    tmp_path: Path, fields: dict[str, object], reason: str
) -> None:
    data = {"written_at": time.time(), "connected": True, "ray_state": "running", "node_name": "a", **fields}
    (tmp_path / health.FILE_NAME).write_text(json.dumps(data))
    healthy, why = health.check(tmp_path / health.FILE_NAME, 30, need_ready=True, started_at=time.time() - 100)
    assert not healthy and "unreadable health report" in why and reason in why, why
    assert len(why) < len(str(tmp_path)) + 200  # what the file holds is cut short


@pytest.mark.parametrize("text", ["[1, 2]", "null", "[" * 100_000])
def test_a_report_that_is_no_object_is_unreadable(tmp_path: Path, text: str) -> None:
    (tmp_path / health.FILE_NAME).write_text(text)
    healthy, why = health.check(tmp_path / health.FILE_NAME, 30, need_ready=False)
    assert not healthy and "unreadable health report" in why


def test_the_health_command_says_why_a_report_is_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / health.FILE_NAME).write_text(json.dumps({"written_at": "soon", "connected": True, "ray_state": "x"}))
    monkeypatch.setenv("KOINON_STATE_DIR", str(tmp_path))
    assert cli.main(["health"]) == 1
    assert "written_at: expected a finite number" in capsys.readouterr().err


async def test_a_file_planted_at_the_health_reports_dir_does_not_fail_liveness_for_good(tmp_path: Path) -> None:
    """The chart: KOINON_HEALTH_FILE=/tmp/koinon-agent/health.json, in an emptyDir that outlives
    container restarts and that job code (the agent's user) can write. A file in the dir's place
    failed every write of the agent's, and of every restarted container's: liveness failed, and the
    kubelet restarted the container every ~40 s for ever, killing the Ray node's tasks each time."""
    health_dir = tmp_path / "pod-tmp" / "koinon-agent"
    health_dir.parent.mkdir()
    health_dir.write_text("planted by job code\n")  # what `rm -rf /tmp/koinon-agent; touch ...` leaves
    health_file = health_dir / "health.json"
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("alpha", health_file=health_file)  # a new container's agent
        assert agent.connected.is_set()
        deadline = time.monotonic() + health.WRITE_INTERVAL_S + 3
        while not (healthy := health.check(health_file, 30, need_ready=False))[0]:
            assert time.monotonic() < deadline, f"liveness fails for a working, connected agent: {healthy[1]}"
            await asyncio.sleep(0.2)
        assert health_dir.is_dir() and not health_dir.is_symlink()


@pytest.mark.parametrize(
    "plant", ["file", "fifo", "symlink to the state dir", "dangling symlink", "dir at the report's name"]
)
def test_what_job_code_plants_at_the_reports_dir_is_replaced_never_written_through(tmp_path: Path, plant: str) -> None:
    """Whatever job code leaves where the report goes is replaced by the agent's own dir (or, at the
    report's own name, moved aside), so the next report is written; a symlink there is removed, not
    followed: nothing is written in, or removed from, the state dir it leads to."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "identity.json").write_text("credential")
    health_dir = tmp_path / "pod-tmp" / "koinon-agent"
    health_dir.parent.mkdir()
    if plant == "file":
        health_dir.write_text("planted")
    elif plant == "fifo":
        os.mkfifo(health_dir)
    elif plant == "symlink to the state dir":
        health_dir.symlink_to(state)
    elif plant == "dangling symlink":
        health_dir.symlink_to(tmp_path / "nowhere")
    else:
        (health_dir / "health.json" / "sub").mkdir(parents=True)
    health_file = health_dir / "health.json"
    health.write(health_file, health.HealthReport(time.time(), True, "running"))
    assert health.check(health_file, 30, need_ready=False)[0]
    assert health_dir.is_dir() and not health_dir.is_symlink()
    assert sorted(os.listdir(state)) == ["identity.json"] and (state / "identity.json").read_text() == "credential"
    if plant == "dir at the report's name":
        assert [p.name for p in health_dir.glob("health.json.moved-*/sub")] == ["sub"]  # moved aside, kept


@pytest.mark.parametrize("mode", [0o000, 0o500], ids=["000", "500"])
def test_a_reports_dir_made_unusable_by_job_code_is_taken_back(mode: int) -> None:
    """Job code of the agent's user can chmod the dir: 000 (the agent cannot even open it) or 500
    (cannot create the next report in it). Run as a user root's permissions do not override, in a
    dir it can reach (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="koinon-health-dir-"))
    try:
        base.chmod(0o755)
        uid = 65534 if os.geteuid() == 0 else os.geteuid()
        pod_tmp = base / "pod-tmp"
        pod_tmp.mkdir()
        if os.geteuid() == 0:
            os.chown(pod_tmp, uid, uid)
        health_file = pod_tmp / "koinon-agent" / "health.json"

        def plant_then_write() -> None:
            health.write(health_file, health.HealthReport(time.time(), True, "running"))
            health_file.parent.chmod(mode)  # what job code of the agent's own user can do
            health.write(health_file, health.HealthReport(time.time(), False, "running"))
            healthy, why = health.check(health_file, 30, need_ready=False)
            assert healthy and "connected=False" in why, why

        error = as_non_root(uid, plant_then_write)
        assert error == "", f"the agent cannot write its report: {error}"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_state_dir_reached_through_a_symlink_is_used_as_it_is(tmp_path: Path) -> None:
    """The default report, <state-dir>/health.json: the state dir is the operator's (job code cannot
    write there) and may be a symlink on purpose; the agent writes through it, never replaces it.
    Only that name is: a symlink planted elsewhere that leads to the state dir is still replaced."""
    real = tmp_path / "disk" / "koinon"
    real.mkdir(parents=True, mode=0o700)
    (real / "identity.json").write_text("credential")
    state = tmp_path / "state"
    state.symlink_to(real)
    health.write(state / health.FILE_NAME, health.HealthReport(time.time(), True, "running"), state_dir=state)
    assert state.is_symlink() and (real / "identity.json").read_text() == "credential"
    assert health.check(state / health.FILE_NAME, 30, need_ready=False)[0]
    planted = tmp_path / "pod-tmp"
    planted.symlink_to(real)
    health.write(planted / health.FILE_NAME, health.HealthReport(time.time(), True, "running"), state_dir=state)
    assert planted.is_dir() and not planted.is_symlink()
    assert sorted(os.listdir(real)) == ["health.json", "identity.json"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a dir of another user")
@pytest.mark.parametrize("mode", [0o1733, 0o730], ids=["1733", "730"])
def test_a_writable_but_unlistable_operator_dir_still_takes_the_report(mode: int) -> None:
    """An operator's dir the agent may create files in but not list (root's drop box, /run/koinon
    1733, or 0730 with the agent in its group) is another user's, used as it is: it was taken for
    job code's plant and refused, and every write, and with it liveness, failed for good."""
    base = Path(tempfile.mkdtemp(prefix="koinon-health-drop-"))
    try:
        base.chmod(0o755)
        drop = base / "run-koinon"
        drop.mkdir()
        if mode == 0o730:
            os.chown(drop, 0, 65534)  # the agent's group may write in it
        drop.chmod(mode)
        health_file = drop / "health.json"

        def write_twice() -> None:
            health.write(health_file, health.HealthReport(time.time(), True, "running"))
            health.write(health_file, health.HealthReport(time.time(), False, "running"))  # replaces its own

        error = as_non_root(65534, write_twice)
        assert error == "", f"the agent cannot write its report: {error}"
        assert stat.S_IMODE(drop.stat().st_mode) == mode and drop.stat().st_uid == 0  # left as it was
        healthy, why = health.check(health_file, 30, need_ready=False)
        assert healthy and "connected=False" in why, why
        assert [p.name for p in drop.iterdir()] == ["health.json"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
