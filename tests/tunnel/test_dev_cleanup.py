"""`koinon dev up`/`dev down` leave nothing behind, and touch nothing they did not start.

Fast: no Ray. `up` runs (in a child process) against a fake Kubernetes API emulator and stops at its
first kubectl call, which is where the signals of these tests reach it; `down` runs against state
files written here for `sleep`/python processes standing in for the control plane's parts."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import koinon_dev.cluster as cluster_module
import pytest
from koinon_dev import cli
from koinon_dev.cluster import AGENT_STOP_GRACE_SECONDS, RUN_ENV, DevCluster, DevClusterConfig, DevClusterInfo
from koinon_dev.processes import boot_id, kill_processes_using, process_start_time
from koinon_dev.tunnel_plane import netns_available

pytestmark = pytest.mark.timeout(120)

FAKE_EMULATOR = f"""#!{sys.executable}
import http.server, sys, threading, time
args = dict(arg.removeprefix("--").split("=", 1) for arg in sys.argv[1:])
class Reply(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{{}}")
    def log_message(self, *_args):
        pass
def write_kubeconfig():
    time.sleep(0.5)  # later than the API answers: a stale kubeconfig would be used meanwhile
    with open(args["kubeconfig"], "w") as out:
        out.write("fresh")
threading.Thread(target=write_kubeconfig, daemon=True).start()
server = http.server.HTTPServer((args["host"], int(args["port"])), Reply)
threading.Thread(target=server.serve_forever, daemon=True).start()
time.sleep(120)  # gone by itself should a test fail before stopping it
"""

# `koinon dev up` with the emulator faked and kubectl replaced by a wait: the signal comes there.
UP_DRIVER = """
import signal, sys, time
from pathlib import Path
import koinon_dev.cluster as cluster
from koinon_dev import cli
state_dir, emulator, reached = sys.argv[1:4]
signal.signal(signal.SIGINT, signal.default_int_handler)  # not inherited as ignored
cluster.ensure_binaries = lambda: None
real_bin = cluster._bin
cluster._bin = lambda name: emulator if name == "koinon-kube-emulator" else real_bin(name)
def kubectl(kubeconfig, *args, **kwargs):
    Path(reached).write_text(Path(kubeconfig).read_text())
    time.sleep(60)
cluster.kubectl = kubectl
cli.main(["--state-dir", state_dir, "dev", "up"])
"""


def alive(pid: int, start_time: int | None) -> bool:
    return start_time is not None and process_start_time(pid) == start_time


def wait_gone(pid: int, start_time: int | None, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid, start_time):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class FakeUp:
    def __init__(self, tmp_path: Path) -> None:
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir()
        (self.state_dir / "kubeconfig").write_text("stale")  # left by an earlier run
        emulator = tmp_path / "fake-emulator"
        emulator.write_text(FAKE_EMULATOR)
        emulator.chmod(0o755)
        self.reached = tmp_path / "reached"
        self.process = subprocess.Popen(
            [sys.executable, "-c", UP_DRIVER, str(self.state_dir), str(emulator), str(self.reached)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.state: DevClusterInfo | None = None

    def wait_for_kubectl(self) -> None:
        deadline = time.monotonic() + 30
        while not self.reached.exists():
            assert self.process.poll() is None, self.process.communicate()
            assert time.monotonic() < deadline, "`dev up` never reached its first kubectl call"
            time.sleep(0.05)
        self.state = DevClusterInfo.load(self.state_dir / "cluster.json")

    @property
    def emulator(self) -> tuple[int, int | None]:
        assert self.state is not None
        pid = self.state.process_groups["kube-emulator"]
        return pid, self.state.start_times.get("kube-emulator")

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.state is not None:
            pid, started = self.emulator
            if alive(pid, started):
                os.killpg(pid, signal.SIGKILL)
            if self.state.work_dir is not None:
                shutil.rmtree(self.state.work_dir, ignore_errors=True)


@pytest.fixture
def fake_up(tmp_path: Path) -> Iterator[FakeUp]:
    up = FakeUp(tmp_path)
    try:
        up.wait_for_kubectl()
        yield up
    finally:
        up.cleanup()


def assert_all_gone(up: FakeUp) -> None:
    pid, started = up.emulator
    assert wait_gone(pid, started), "the emulator survived"
    assert up.state is not None and up.state.work_dir is not None and not up.state.work_dir.exists()
    assert sorted(p.name for p in up.state_dir.iterdir()) == ["lock", "logs"]


def test_up_records_each_part_as_it_starts(fake_up: FakeUp) -> None:
    state = fake_up.state
    assert state is not None and not state.complete
    assert state.work_dir is not None and state.work_dir.is_dir()
    assert state.boot_id == boot_id()
    pid, started = fake_up.emulator
    assert alive(pid, started)
    # The kubeconfig left by an earlier run was removed before the emulator started.
    assert fake_up.reached.read_text() == "fresh"


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signal_during_up_stops_everything_it_started(fake_up: FakeUp, signum: int, exit_code: int) -> None:
    fake_up.process.send_signal(signum)
    _, stderr = fake_up.process.communicate(timeout=60)
    assert fake_up.process.returncode == exit_code, stderr
    assert "Traceback" not in stderr and stderr.strip().startswith("koinon:"), stderr
    assert_all_gone(fake_up)


def test_down_after_up_was_killed_stops_what_it_had_started(fake_up: FakeUp) -> None:
    fake_up.process.kill()
    fake_up.process.wait()
    pid, started = fake_up.emulator
    assert alive(pid, started)
    stopped = DevCluster(DevClusterConfig(state_dir=fake_up.state_dir)).down()
    assert stopped == ["kube-emulator"]
    assert_all_gone(fake_up)


def test_second_up_or_down_fails_at_once_while_up_runs(fake_up: FakeUp) -> None:
    config = DevClusterConfig(state_dir=fake_up.state_dir)
    for action in (DevCluster(config).up, DevCluster(config).down):
        began = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"another `koinon dev up`.*pid {fake_up.process.pid}"):
            action()
        assert time.monotonic() - began < 2
    assert fake_up.process.poll() is None and (fake_up.state_dir / "cluster.json").exists()


# --- `down` against hand-written state files -------------------------------------------------------


@pytest.fixture
def work_dir() -> Iterator[Path]:
    path = Path("/tmp") / f"koinon-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def session(*argv: str, env: dict[str, str] | None = None) -> tuple[int, int | None]:
    """A process in a session of its own (as every part of the control plane runs), not our child
    once started (as after `up` exited): (pid, start time)."""
    process = subprocess.Popen(
        list(argv), start_new_session=True, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    time.sleep(0.2)
    return process.pid, process_start_time(process.pid)


def write_state(state_dir: Path, **fields: object) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "kubeconfig": str(state_dir / "kubeconfig"), "api_url": "http://127.0.0.1:1",
        "ray_dashboard_url": "http://127.0.10.1:1", "ray_address": "127.0.10.1:1", "process_groups": {},
        "log_dir": str(state_dir / "logs"), "ray_auth_token_file": None, "work_dir": None,
        "network_namespaces": [], **fields,
    }  # fmt: skip
    (state_dir / "cluster.json").write_text(json.dumps(data))


def kill(*processes: tuple[int, int | None]) -> None:
    for pid, started in processes:
        if alive(pid, started):
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize("record", ["old format", "other start time", "other boot"])
def test_down_does_not_signal_a_pid_that_is_no_longer_ours(
    tmp_path: Path, record: str, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = session("sleep", "1000")  # an unrelated process that was given the recorded pid
    pid, started = victim
    assert started is not None
    fields: dict[str, object] = {"process_groups": {"kube-emulator": pid}}
    if record == "other start time":
        fields.update(start_times={"kube-emulator": started - 1}, boot_id=boot_id())
    elif record == "other boot":
        fields.update(start_times={"kube-emulator": started}, boot_id="an-earlier-boot")
    write_state(tmp_path / "state", **fields)
    try:
        assert DevCluster(DevClusterConfig(state_dir=tmp_path / "state")).down() == []
        time.sleep(0.3)
        assert alive(pid, started), "dev down killed an unrelated process"
        assert f"not stopping kube-emulator (pid {pid})" in capsys.readouterr().err
        assert not (tmp_path / "state" / "cluster.json").exists()
    finally:
        kill(victim)


def test_down_stops_what_escaped_the_recorded_groups(tmp_path: Path, work_dir: Path) -> None:
    """A Ray node left by a dead agent: processes whose command line no longer names the work dir
    (ray::DashboardAgent), but that keep a file under it open, or carry the run's environment marker."""
    (work_dir / "logs").mkdir()
    script = f"sleep 1000 & exec 3>{work_dir}/logs/agent.out; exec -a ray::DashboardAgent sleep 1000"
    with_file = session("bash", "-c", script)
    marked = session("sleep", "1000", env={**os.environ, RUN_ENV: str(work_dir)})
    unrelated = session("sleep", "1000", env={**os.environ, RUN_ENV: f"{work_dir}0"})
    recorded = session("sleep", "1000")
    group_member = [int(p) for p in subprocess.check_output(["pgrep", "-g", str(with_file[0])]).split()]
    assert len(group_member) == 2  # the renamed leader and its child, which has nothing open there
    (tmp_path / "state").mkdir()
    for name in ("kubeconfig", "ray-auth-token"):
        (tmp_path / "state" / name).write_text("x")
    write_state(
        tmp_path / "state", process_groups={"kube-emulator": recorded[0]},
        start_times={"kube-emulator": recorded[1]}, boot_id=boot_id(), work_dir=str(work_dir),
    )  # fmt: skip
    try:
        assert DevCluster(DevClusterConfig(state_dir=tmp_path / "state")).down() == ["kube-emulator"]
        for process in (with_file, marked, recorded):
            assert wait_gone(*process), process
        for pid in group_member:
            assert wait_gone(pid, process_start_time(pid)), pid
        assert alive(*unrelated)
        assert not work_dir.exists()
        assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["lock"]
    finally:
        kill(with_file, marked, unrelated, recorded)


def test_down_gives_agents_their_drain_time_together(tmp_path: Path) -> None:
    assert AGENT_STOP_GRACE_SECONDS >= 5 + 15  # the agents' --drain-grace, and 10 s for Ray to stop
    drain = textwrap.dedent(
        """
        import signal, sys, time
        from pathlib import Path
        def drain(*_):
            time.sleep(9)  # longer than the 8 s every other part gets
            Path(sys.argv[1] + ".drained").touch()
            sys.exit(0)
        signal.signal(signal.SIGTERM, drain)
        Path(sys.argv[1] + ".ready").touch()
        time.sleep(1000)
        """
    )
    agents = {f"agent-volunteer-{n}": session(sys.executable, "-c", drain, str(tmp_path / str(n))) for n in (1, 2)}
    operator = session("sleep", "1000")
    groups = {"operator": operator, **agents}
    for n in (1, 2):
        deadline = time.monotonic() + 10
        while not (tmp_path / f"{n}.ready").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    write_state(
        tmp_path / "state", process_groups={name: pid for name, (pid, _) in groups.items()},
        start_times={name: started for name, (_, started) in groups.items()}, boot_id=boot_id(),
    )  # fmt: skip
    try:
        began = time.monotonic()
        stopped = DevCluster(DevClusterConfig(state_dir=tmp_path / "state")).down()
        took = time.monotonic() - began
        assert sorted(stopped) == sorted(groups)
        assert (tmp_path / "1.drained").exists() and (tmp_path / "2.drained").exists()
        assert took < 15, f"agents drained one after the other ({took:.1f}s)"
    finally:
        kill(operator, *agents.values())


# --- CLI errors ------------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    return int(exited.value.code or 0)


def test_logs_without_a_control_plane_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--state-dir", str(tmp_path), "logs", "some-job") == 1
    err = capsys.readouterr().err
    assert err.startswith("koinon: no local control plane is running") and err.count("\n") == 1, err


def test_kubectl_timeout_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_state(tmp_path)

    def slow_kubectl(*_args: object, **_kwargs: object) -> str:
        raise subprocess.TimeoutExpired(["kubectl", "get", "aijob"], 60)

    monkeypatch.setattr(cli, "kubectl", slow_kubectl)
    assert run_cli("--state-dir", str(tmp_path), "logs", "some-job") == 1
    err = capsys.readouterr().err
    assert err.startswith("koinon: ") and "timed out after 60 seconds" in err and err.count("\n") == 1, err


def test_failed_command_shows_its_stderr(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def failing_up(_self: DevCluster, progress: bool = True) -> DevClusterInfo:
        raise subprocess.CalledProcessError(2, ["ip", "netns", "add", "kn-1"], stderr=b"RTNETLINK answers: Exists\n")

    monkeypatch.setattr(DevCluster, "up", failing_up)
    assert run_cli("--state-dir", "/nonexistent/state", "dev", "up") == 1
    err = capsys.readouterr().err
    assert err == "koinon: `ip netns add kn-1` failed (exit status 2): RTNETLINK answers: Exists\n"


DEMO_DRIVER = """
import sys, time
from pathlib import Path
from koinon_dev import cli, demo
from koinon_dev.cluster import DevCluster, DevClusterInfo
marks = Path(sys.argv[1])
def up(self, progress=True):
    return DevClusterInfo(marks / "kubeconfig", "", "", "", {}, marks)
def down(self, report=None):
    (marks / "down").touch()
    return []
def kubectl(*args, **kwargs):
    (marks / "applying").touch()
    time.sleep(60)
DevCluster.up, DevCluster.down, demo.kubectl = up, down, kubectl
cli.main(["--state-dir", str(marks), "demo", "--example", sys.argv[2]])
"""


def test_sigterm_during_demo_takes_the_control_plane_down(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "numeric-job.yaml"
    demo = subprocess.Popen(
        [sys.executable, "-c", DEMO_DRIVER, str(tmp_path), str(example)], stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "applying").exists():
            assert demo.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        demo.send_signal(signal.SIGTERM)
        demo.communicate(timeout=30)
        assert demo.returncode == 128 + signal.SIGTERM
        assert (tmp_path / "down").exists()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def test_killing_a_volunteers_processes_spares_one_whose_name_shares_the_prefix(tmp_path: Path) -> None:
    """`volunteer-1`'s directory is a prefix of `volunteer-10`'s: whole arguments are compared."""
    sleepers = [
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)", f"--temp-dir={tmp_path}/ray-volunteer-{n}"]
        )
        for n in ("1", "10")
    ]
    try:
        killed = kill_processes_using(tmp_path / "ray-volunteer-1")
        assert killed == [sleepers[0].pid]
        assert sleepers[0].wait(5) == -signal.SIGKILL and sleepers[1].poll() is None
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()


SLOW_IP = '#!/bin/sh\n{real} "$@"; rc=$?\n[ "$2" = add ] && touch {marker} && sleep 2\nexit $rc\n'
PROBE_DRIVER = """
from koinon_dev.processes import TerminatedBySignal, signals_as_exceptions
from koinon_dev.tunnel_plane import netns_available
with signals_as_exceptions():  # as `dev up` runs it
    try:
        netns_available()
    except TerminatedBySignal:
        print("stopped")
"""


@pytest.mark.skipif(not netns_available(), reason="needs root and ip netns")
def test_a_signal_during_the_netns_probe_leaves_no_namespace(tmp_path: Path) -> None:
    real_ip = shutil.which("ip")
    assert real_ip is not None
    (tmp_path / "ip").write_text(SLOW_IP.format(real=real_ip, marker=tmp_path / "added"))
    (tmp_path / "ip").chmod(0o755)

    def namespaces() -> set[str]:
        listed = subprocess.run([real_ip, "netns", "list"], capture_output=True, text=True).stdout
        return {line.split()[0] for line in listed.splitlines() if line.startswith("kprobe-")}

    before = namespaces()
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    up = subprocess.Popen([sys.executable, "-c", PROBE_DRIVER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "added").exists():
            assert time.monotonic() < deadline, "the probe never added its namespace"
            time.sleep(0.02)
        up.send_signal(signal.SIGTERM)  # a supervisor stopping `koinon dev up` mid-probe
        out, _ = up.communicate(timeout=30)
        assert "stopped" in out
        assert namespaces() - before == set()
    finally:
        if up.poll() is None:
            up.kill()
        for leaked in namespaces() - before:
            subprocess.run([real_ip, "netns", "del", leaked], check=False)


@pytest.mark.skipif(not netns_available(), reason="needs root and ip netns")
def test_volunteers_that_could_not_run_sandboxed_run_as_plain_processes_or_fail_when_namespaces_were_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cluster_module, "runs_without_privileges", lambda: "PermissionError: [Errno 13]")
    auto = DevCluster(DevClusterConfig(state_dir=tmp_path / "auto"))
    assert auto._network_namespaces() is False
    assert "volunteers run as plain processes instead" in caplog.text
    asked = DevCluster(DevClusterConfig(state_dir=tmp_path / "asked", network_namespaces=True))
    with pytest.raises(RuntimeError, match=r"cannot run .* without privileges"):
        asked._network_namespaces()
    monkeypatch.setattr(cluster_module, "runs_without_privileges", lambda: "")
    assert auto._network_namespaces() is True
