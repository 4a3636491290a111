"""The local control plane's entry points as a new user meets them: `make clean` with a cluster up,
pinned kubectl/helm, the demo with a job that never reached Ray, a damaged state file, `dev status`
after the processes died, Ctrl-C during `dev down`, and arguments or state dirs it cannot use."""

from __future__ import annotations

import argparse
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from koinon_dev import binaries, cli, demo
from koinon_dev.cluster import DevCluster, DevClusterConfig, DevClusterInfo
from koinon_dev.processes import boot_id, process_start_time

REPO = Path(__file__).resolve().parents[2]


def _koinon(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from koinon_dev.cli import main; main()", "--state-dir", str(state), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_clean_stops_a_running_control_plane_before_deleting_its_record(tmp_path: Path) -> None:
    """`make clean` deleted .koinon, the only record of what `make up` runs: `dev down` then found
    nothing, and the processes, network namespaces and /tmp/koinon-* stayed."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / ".koinon" / "dev").mkdir(parents=True)
    (tmp_path / ".koinon" / "dev" / "cluster.json").write_text("{}")
    fake_bin = tmp_path / ".venv" / "bin"
    fake_bin.mkdir(parents=True)
    calls = tmp_path / "calls"
    (fake_bin / "koinon").write_text(f'#!/bin/sh\necho "$@" >> {calls}\ntest -f .koinon/dev/cluster.json\n')
    (fake_bin / "koinon").chmod(0o755)
    done = subprocess.run(["make", "-C", str(tmp_path), "clean"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().split("\n")[0] == "dev down"  # while the record still existed
    assert not (tmp_path / ".koinon").exists()


def _layer_with(tmp_path: Path, kubectl: bytes) -> Path:
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as archive:
        archive.writestr("kubectl/kubectl", kubectl)
        archive.writestr("helm/helm", b"#!/bin/sh\necho helm\n")
    tarball = tmp_path / "fake.jsii.tgz"
    with tarfile.open(tarball, "w:gz") as outer:
        info = tarfile.TarInfo("package/lib/layer.zip")
        info.size = len(layer.getvalue())
        outer.addfile(info, io.BytesIO(layer.getvalue()))
    return tarball


def test_a_kubectl_or_helm_that_is_not_the_pinned_build_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They run with the user's kubeconfig: a tampered package, or a file put in the venv's bin,
    was used as found."""
    monkeypatch.setattr(binaries, "_layer_tarball", lambda: _layer_with(tmp_path, b"#!/bin/sh\necho tampered\n"))
    extracted = tmp_path / "extract"
    with pytest.raises(binaries.BinariesUnavailableError, match="not the pinned kubectl"):
        binaries.ensure_binaries(extracted)
    assert not (extracted / "kubectl").exists() and not list(extracted.glob(".*partial"))
    in_place = tmp_path / "in-place"
    in_place.mkdir()
    for name in ("kubectl", "helm"):
        (in_place / name).write_text("#!/bin/sh\necho planted\n")
    with pytest.raises(binaries.BinariesUnavailableError, match="not the pinned kubectl"):
        binaries.ensure_binaries(in_place)


def test_the_venvs_own_binaries_are_the_pinned_ones() -> None:
    found = binaries.ensure_binaries()  # what every other test runs
    assert found.kubectl.exists() and found.helm.exists()


def test_the_demo_shows_the_events_of_a_job_that_never_reached_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job the operator refuses (InvalidSpec) ends Failed with no submission: the demo stopped at
    "has no Ray submission yet" and never printed the Events that say why."""

    def fake_kubectl(_kubeconfig: Path, *args: str, **_: Any) -> str:
        if "jsonpath={.status.phase}" in args:
            return "Failed"
        if "jsonpath={.status.submissionId}" in args:
            return ""
        if args[0] == "describe":
            return "Name: x\nEvents:\n  Warning  InvalidSpec  spec.runtimeEnv.env_vars[A=B]: not a name\n"
        return "ok\n"

    class Watch:
        def __init__(self, *args: Any, **kwargs: Any) -> None: ...
        def terminate(self) -> None: ...
        def kill(self) -> None: ...
        def wait(self, timeout: float | None = None) -> int:
            return 0

    class Cluster:
        downs = 0
        info = DevClusterInfo(
            kubeconfig=tmp_path / "kubeconfig", api_url="", ray_dashboard_url="http://127.0.0.1:1",
            ray_address="", process_groups={}, log_dir=tmp_path,
        )  # fmt: skip

        def up(self) -> DevClusterInfo:
            return self.info

        def down(self, report: Callable[[list[str]], None] | None = None) -> list[str]:
            self.downs += 1
            if report is not None:
                report([])
            return []

    monkeypatch.setattr(demo, "kubectl", fake_kubectl)
    monkeypatch.setattr("koinon_dev.cli.kubectl", fake_kubectl)
    monkeypatch.setattr("koinon_dev.demo.subprocess.Popen", Watch)
    monkeypatch.setattr(demo, "ensure_binaries", lambda: binaries.Binaries(Path("kubectl"), Path("helm")))
    monkeypatch.setattr("koinon_dev.demo.time.sleep", lambda _seconds: None)
    example = tmp_path / "job.yaml"
    example.write_text("kind: AIJob\nmetadata: {name: x}\n")
    cluster = Cluster()
    fake: Any = cluster
    assert demo.run_demo(fake, example) == 1
    out = capsys.readouterr().out
    assert "InvalidSpec" in out and "no Ray logs" in out
    assert cluster.downs == 1
    assert "stopped: nothing was running" in out


def test_the_demo_says_what_it_stopped_before_a_held_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`koinon demo` (make demo) printed "stopped: ..." after `down` returned, where a Ctrl-C held
    back during the teardown is delivered: the line was lost, as it was for `koinon dev down`."""
    info = DevClusterInfo(tmp_path / "kubeconfig", "", "", "", {}, tmp_path)

    def stop_everything(self: DevCluster) -> list[str]:
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C while the teardown runs: held
        return ["ray-head"]

    def failing_kubectl(*args: object, **kwargs: object) -> str:
        raise RuntimeError("apply failed")

    monkeypatch.setattr(DevCluster, "up", lambda self, progress=True: info)
    monkeypatch.setattr(DevCluster, "_stop_everything", stop_everything)
    monkeypatch.setattr(demo, "kubectl", failing_kubectl)
    example = tmp_path / "job.yaml"
    example.write_text("kind: AIJob\nmetadata: {name: x}\n")
    (tmp_path / "state").mkdir()
    cluster = DevCluster(DevClusterConfig(state_dir=tmp_path / "state"))
    # Ctrl-C as at a terminal: a test run in the background (CI) hands SIGINT down ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            demo.run_demo(cluster, example)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "stopped: ray-head" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["{}", "", '{"kubeconfig": "k"}', "[]"])
def test_dev_down_with_a_damaged_state_file_says_so_and_lets_up_start_again(tmp_path: Path, content: str) -> None:
    """A cut-short or foreign cluster.json gave `dev down` a traceback, and `dev up` kept sending
    the user back to `dev down`."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "cluster.json").write_text(content)
    done = _koinon(state, "dev", "down")
    assert "Traceback" not in done.stderr, done.stderr
    assert "unreadable" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (state / "cluster.json").exists()
    assert [aside.read_text() for aside in state.glob("cluster.json.damaged-*")] == [content]  # kept for a look


def test_dev_status_does_not_call_a_dead_control_plane_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    info = DevClusterInfo(
        kubeconfig=state / "kubeconfig", api_url="http://127.0.0.1:1", ray_dashboard_url="http://127.0.10.1:1",
        ray_address="127.0.10.1:1", process_groups={"kube-emulator": gone.pid}, log_dir=state / "logs",
        start_times={"kube-emulator": 1}, boot_id=None,
    )  # fmt: skip
    (state / "cluster.json").write_text(info.to_json())
    done = _koinon(state, "dev", "status")
    assert done.returncode == 1 and "not running: kube-emulator" in done.stderr, done
    # A process group that runs, recorded as `up` records it (its leader's pid, start time, boot).
    from koinon_dev.processes import boot_id, process_start_time

    leader = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        started = process_start_time(leader.pid)
        assert started is not None
        alive = DevClusterInfo(**{**info.__dict__, "process_groups": {"kube-emulator": leader.pid},
                                  "start_times": {"kube-emulator": started}, "boot_id": boot_id()})  # fmt: skip
        (state / "cluster.json").write_text(alive.to_json())
        assert _koinon(state, "dev", "status").returncode == 0
    finally:
        leader.kill()
        leader.wait()


@pytest.fixture
def slow_component(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A state dir recording one component slow to stop (as a draining agent or a Ray head is): it
    ignores SIGTERM, so `dev down` waits out its grace period (8 s) before killing it."""
    state = tmp_path / "state dir"  # a space: the command printed to finish must quote it
    state.mkdir()
    slow = subprocess.Popen(["sh", "-c", 'trap "" TERM; sleep 60'], start_new_session=True)
    try:
        time.sleep(0.2)  # the trap is set
        started = process_start_time(slow.pid)
        assert started is not None
        info = DevClusterInfo(
            kubeconfig=state / "kubeconfig", api_url="https://127.0.0.1:1", ray_dashboard_url="http://127.0.10.1:1",
            ray_address="127.0.10.1:1", process_groups={"ray-head": slow.pid}, log_dir=state / "logs",
            start_times={"ray-head": started}, boot_id=boot_id(),
        )  # fmt: skip
        (state / "cluster.json").write_text(info.to_json())
        yield state, slow
    finally:
        slow.kill()
        slow.wait()


INTERACTIVE_MAIN = (
    "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); from koinon_dev.cli import main; main()"
)


def _down_interrupted(state: Path, interrupts: int) -> subprocess.CompletedProcess[str]:
    down = subprocess.Popen(
        # Ctrl-C as at a terminal: a test run in the background (CI) hands SIGINT down ignored.
        [sys.executable, "-c", INTERACTIVE_MAIN, "--state-dir", str(state), "dev", "down"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(2.0)  # inside the grace period of the recorded component
    for _ in range(interrupts):
        down.send_signal(signal.SIGINT)  # Ctrl-C
        time.sleep(0.3)
    stdout, stderr = down.communicate(timeout=30)
    return subprocess.CompletedProcess(down.args, down.returncode, stdout, stderr)


def test_ctrl_c_during_dev_down_is_held_until_everything_is_stopped(
    slow_component: tuple[Path, subprocess.Popen[bytes]],
) -> None:
    """One Ctrl-C while `dev down` waited for a component aborted it with "koinon: interrupted":
    the rest kept running (Ray nodes, network namespaces, /tmp/koinon-*) and the record said nothing."""
    state, slow = slow_component
    done = _down_interrupted(state, interrupts=1)
    assert done.stderr.count("stopping the local control plane; wait") == 1, done.stderr
    assert slow.wait(timeout=5) is not None  # killed after its grace period
    assert not (state / "cluster.json").exists()
    assert done.returncode == 130  # the Ctrl-C, delivered once all was stopped
    # What was stopped is said before "interrupted": the held Ctrl-C, delivered as `down` returned,
    # ended the command before it printed its list, so a user could not tell all had stopped.
    assert done.stdout.splitlines() == ["stopped: ray-head"], done.stdout
    assert done.stderr.rstrip().endswith("koinon: interrupted"), done.stderr


def test_a_second_ctrl_c_during_dev_down_says_how_to_finish(
    slow_component: tuple[Path, subprocess.Popen[bytes]],
) -> None:
    state, slow = slow_component
    done = _down_interrupted(state, interrupts=2)
    assert done.returncode == 130
    assert f"partly stopped; finish with: koinon --state-dir {shlex.quote(str(state))} dev down" in done.stderr
    assert (state / "cluster.json").exists()  # what `dev down` needs to finish
    assert slow.poll() is None
    assert _koinon(state, "dev", "down").returncode == 0
    assert slow.wait(timeout=5) is not None and not (state / "cluster.json").exists()


CLEANUP_WITH_SIGINT_IGNORED = """
import signal, sys
from koinon_dev.processes import cleanup_signals
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job of a script inherits it
try:
    with cleanup_signals("notice"):
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        print("teardown finished")
except KeyboardInterrupt:
    print("teardown aborted by an ignored SIGINT")
    sys.exit(1)
"""


def test_an_ignored_ctrl_c_stays_ignored_during_teardown() -> None:
    """`koinon dev down &` in a script ignores SIGINT; the teardown's handler replaced that, and a
    second Ctrl-C at the terminal aborted the teardown half-way."""
    done = subprocess.run([sys.executable, "-c", CLEANUP_WITH_SIGINT_IGNORED], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert done.returncode == 0 and "teardown finished" in done.stdout, done.stdout + done.stderr
    assert "notice" not in done.stderr


@pytest.mark.parametrize("volunteers", ["17", "0", "-1", "two"])
def test_volunteer_counts_the_port_claim_cannot_hold_are_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], volunteers: str
) -> None:
    """The gateway claims 16 port blocks (tunnel_plane.MAX_VOLUNTEERS) and gives volunteer N the
    N-th: a 17th volunteer's Ray ports lay in another control plane's slot. With 0, no job could
    ever run (`make demo`-style runs waited out their whole timeout)."""
    started: list[bool] = []

    def start_all(self: DevCluster, say: object) -> None:
        started.append(True)
        raise RuntimeError("stop here")

    monkeypatch.setattr(DevCluster, "_start_all", start_all)
    with pytest.raises(SystemExit) as exited:
        cli.main(["--state-dir", str(tmp_path / "state"), "--volunteers", volunteers, "dev", "up"])
    assert exited.value.code == 2 and not started
    assert "--volunteers" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_up_over_a_recorded_control_plane_names_its_state_dir_in_the_advice(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "cluster.json").write_text("{}")
    done = _koinon(state, "dev", "up")
    assert done.returncode == 1
    assert f"run `koinon --state-dir {state} dev down` first" in done.stderr, done.stderr


def test_down_where_no_control_plane_ever_was_creates_nothing(tmp_path: Path) -> None:
    state = tmp_path / "typo" / "state"
    done = _koinon(state, "dev", "down")
    assert done.returncode == 0 and "nothing was running" in done.stdout
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("case", ["state dir under a file", "cluster.json a directory"])
def test_a_state_dir_that_cannot_be_used_is_a_one_line_error(tmp_path: Path, case: str) -> None:
    if case == "state dir under a file":
        (tmp_path / "file").write_text("")
        state, command = tmp_path / "file" / "state", ("dev", "up")
    else:
        state, command = tmp_path / "state", ("dev", "down")
        (state / "cluster.json").mkdir(parents=True)
    done = _koinon(state, *command)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


GLOBAL_OPTIONS = ["--state-dir", "/elsewhere", "--volunteers", "3", "--no-netns"]


def _recorder(seen: list[argparse.Namespace]) -> Callable[[argparse.Namespace], int]:
    """A subcommand that only records the arguments it was given."""

    def record(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    return record


@pytest.mark.parametrize(
    ("argv", "func"),
    [
        (["logs", "--state-dir", "/elsewhere", "--volunteers", "3", "--no-netns", "-n", "team-a", "train"], "cmd_logs"),
        (["logs", "-n", "team-a", "train", *GLOBAL_OPTIONS], "cmd_logs"),
        ([*GLOBAL_OPTIONS, "logs", "-n", "team-a", "train"], "cmd_logs"),
        (["dev", "down", *GLOBAL_OPTIONS], "cmd_down"),
        (["dev", *GLOBAL_OPTIONS, "status"], "cmd_status"),
        (["demo", *GLOBAL_OPTIONS], "cmd_demo"),
    ],
)
def test_global_options_are_taken_before_or_after_the_subcommand(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], func: str
) -> None:
    """README.md: "`koinon logs` reads `./.koinon/dev` ... or give `--state-dir`": read as
    `koinon logs --state-dir DIR NAME`, argparse refused it (global options only before the
    subcommand: "unrecognized arguments")."""
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, func, _recorder(seen))
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 0
    [args] = seen
    assert (args.state_dir, args.volunteers, args.no_netns) == ("/elsewhere", 3, True)
    if func == "cmd_logs":
        assert (args.namespace, args.name) == ("team-a", "train")


def test_a_subcommand_without_the_global_options_keeps_those_given_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The subcommands' copies of the options have no defaults of their own, which would overwrite
    the value given before the subcommand."""
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, "cmd_up", _recorder(seen))
    for argv, expected in (
        ([*GLOBAL_OPTIONS, "dev", "up"], ("/elsewhere", 3, True)),
        (["--state-dir", "/first", "dev", "up", "--state-dir", "/last"], ("/last", 2, False)),
        (["dev", "up"], (".koinon/dev", 2, False)),
    ):
        with pytest.raises(SystemExit):
            cli.main(argv)
        args = seen.pop()
        assert (args.state_dir, args.volunteers, args.no_netns) == expected, argv


def test_logs_with_state_dir_after_the_subcommand_reads_that_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["logs", "--state-dir", str(tmp_path / "dev"), "monte-carlo-pi"])
    err = capsys.readouterr().err
    # No control plane there: the command says so (exit 1) rather than refusing the option (2).
    assert exited.value.code == 1 and str(tmp_path / "dev") in err, err
