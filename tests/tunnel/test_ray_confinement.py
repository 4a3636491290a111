"""Ray, and the job code it runs, cannot reach the agent's state dir (Landlock, ray_launch.py), and
Ray goes when the agent is killed. The launcher is run as the agent runs it; the agent tests use a
stand-in ``ray`` through a real agent and gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from koinon_agent import own_dir, ray_launch, ray_node, state
from koinon_agent.ray_node import RayNode, RaySettings, ray_environment
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import as_non_root, cluster, start_agent_process

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


@contextlib.contextmanager
def temp_dir_fd(temp: Path) -> Iterator[int]:
    """A descriptor of what ``temp`` leads to now, followed through symlinks and whatever it is:
    the launcher grants by the descriptor it gets (the agent's, of the dir it checked) and must
    refuse one that is not a dir it may grant, however the descriptor came to be."""
    if not temp.is_symlink():
        temp.mkdir(parents=True, exist_ok=True)
    fd = os.open(temp, os.O_PATH | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def launch(tmp_path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    state = tmp_path / "state"
    with temp_dir_fd(state / "ray") as fd:
        argv = ray_launch.launcher_command(os.getpid(), command, state, fd)
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, pass_fds=(fd,))


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
    with temp_dir_fd(state / "ray") as fd:
        argv = ray_launch.launcher_command(os.getpid(), ["cat", str(state / "identity.json")], state, fd)
        argv[1:3] = ["-c", unavailable]  # the launcher itself, with Landlock taken away
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=Path(ray_launch.__file__).parent,
            pass_fds=(fd,),
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
        process = await start_agent_process(c, tmp_path / "agent", fake_ray)
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


# Job code prepares something for the next Ray start (it can kill the raylet: same uid) or the agent.
SECRET = '{"credential": "secret"}'
READ = "import sys\ntry:\n print(open(sys.argv[1]).read())\nexcept OSError as exc:\n print('denied', exc)\n"


def run_confined(
    state: Path, temp: Path, *command: str, user: list[str] | None = None, launcher_copy: Path | None = None
) -> str:
    with temp_dir_fd(temp) as fd:
        argv = ray_launch.launcher_command(os.getpid(), command, state, fd)
        if user:
            argv[0] = "/usr/bin/python3"  # the venv's interpreter lies in /root, which nobody cannot enter
        if launcher_copy is not None:
            # A checkout in a private dir (a CI clone in a 0700 mkdtemp) is not readable to nobody.
            if not launcher_copy.exists():
                shutil.copyfile(ray_launch.__file__, launcher_copy)
                launcher_copy.chmod(0o644)
            argv[2] = str(launcher_copy)
        result = subprocess.run(
            [*(user or []), *argv], capture_output=True, text=True, timeout=60, check=False, pass_fds=(fd,)
        )
    return result.stdout + result.stderr


@needs_landlock
def test_a_ray_temp_dir_repointed_at_the_state_dir_grants_nothing(tmp_path: Path) -> None:
    """The chart's layout: state /var/lib/koinon-agent, KOINON_TEMP_DIR=/tmp/ray. Job code has full
    access in /tmp: it may move /tmp/ray away and put a symlink to the state dir there, then kill
    the raylet. The next launch must not grant what that symlink reaches (it granted all of it)."""
    state = tmp_path / "var" / "lib" / "koinon-agent"
    state.mkdir(parents=True)
    (state / "identity.json").write_text(SECRET)
    temp = tmp_path / "tmp" / "ray"
    temp.mkdir(parents=True)
    plant = f"import os\nos.rename({str(temp)!r}, {str(temp) + '.old'!r})\nos.symlink({str(state)!r}, {str(temp)!r})\n"
    out = run_confined(state, temp, sys.executable, "-c", plant)
    assert temp.is_symlink(), f"the confined job could not plant the symlink: {out}"
    # The raylet dies (the job kills it); the agent starts Ray again with the same settings.
    out = run_confined(state, temp, sys.executable, "-c", READ, str(state / "identity.json"))
    assert SECRET not in out, "job code on the restarted Ray node read the credential"


@needs_landlock
def test_a_ray_temp_dir_above_the_state_dir_is_refused(tmp_path: Path) -> None:
    """KOINON_TEMP_DIR=/tmp with the state dir in /tmp (or the temp dir the state dir itself): Ray is
    not started (the allowed dir would cover the credential, silently)."""
    state = tmp_path / "koinon"
    state.mkdir()
    (state / "identity.json").write_text(SECRET)
    out = run_confined(state, tmp_path, sys.executable, "-c", READ, str(state / "identity.json"))
    assert SECRET not in out
    assert "not starting Ray" in out, out


# Job code that outlived its Ray (setsid and a double fork escape stop()'s process group; tini only
# reaps) flips the chart's /tmp/ray between a symlink to a directory and a symlink to the
# credential, with atomic renames, while the agent starts the next Ray.
FLIPPER = """
import os, sys, time
link, directory, credential, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
a, b = link + ".a", link + ".b"
end = time.monotonic() + seconds
while time.monotonic() < end:
    os.symlink(directory, a); os.rename(a, link)
    os.symlink(credential, b); os.rename(b, link)
os.symlink(directory, a); os.rename(a, link)
"""


def chart_layout(tmp_path: Path) -> tuple[Path, Path]:
    """The chart's state dir, /var/lib/koinon-agent, holding the credential; and its pod's /tmp."""
    state = tmp_path / "var" / "lib" / "koinon-agent"
    state.mkdir(parents=True)
    (state / "identity.json").write_text(SECRET)
    pod_tmp = tmp_path / "tmp"
    pod_tmp.mkdir()
    return state, pod_tmp


@needs_landlock
def test_a_temp_dir_flipped_during_the_launch_never_grants_the_credential(tmp_path: Path) -> None:
    """The launcher made the temp dir by its path (makedirs), then opened that path again for its
    rule: a symlink to a dir at the first look and to identity.json at the second got the credential
    granted (read and write), found within a few dozen starts. Now it grants the descriptor it is
    given, only a directory, and never looks the path up."""
    state, pod_tmp = chart_layout(tmp_path)
    credential = state / "identity.json"
    old_ray = pod_tmp / "ray.old"  # the old Ray's temp dir, where the escaped job code lives
    old_ray.mkdir()
    temp = pod_tmp / "ray"
    temp.symlink_to(old_ray)
    with temp_dir_fd(old_ray) as fd:  # the flipper runs confined, as the old Ray's job code does
        argv = ray_launch.launcher_command(
            0, [sys.executable, "-c", FLIPPER, str(temp), str(old_ray), str(credential), "60"], state, fd
        )
        flipper = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(fd,))
    try:
        for start in range(1, 101):
            out = run_confined(state, temp, sys.executable, "-c", READ, str(credential))
            assert SECRET not in out, f"job code on the new Ray read the credential after {start} starts"
        assert flipper.poll() is None, "the flipper stopped early"
    finally:
        flipper.kill()
        flipper.wait()


@needs_landlock
def test_the_launcher_grants_the_dir_the_agent_checked_not_what_its_path_leads_to_later(tmp_path: Path) -> None:
    """The agent checks Ray's temp dir (own_dir) and hands the launcher that dir's descriptor. Job code
    swapping the path for a symlink to the credential after that check gets nothing granted by it:
    the grant is on the dir checked (still usable), and the launcher keeps no descriptor for Ray."""
    state, pod_tmp = chart_layout(tmp_path)
    credential = state / "identity.json"
    temp = pod_tmp / "ray"
    fd = own_dir.open_own_dir(temp, 0o777)
    try:
        os.rename(temp, pod_tmp / "ray.old")
        temp.symlink_to(credential)
        job = (
            "import os, sys\n"
            "try:\n print(open(sys.argv[1]).read())\nexcept OSError as exc:\n print('denied', exc)\n"
            "open(os.path.join(sys.argv[2], 'written'), 'w').write('x')\n"
            "print('descriptor', os.path.exists(f'/proc/self/fd/{sys.argv[3]}'))\n"
        )
        argv = ray_launch.launcher_command(
            os.getpid(), [sys.executable, "-c", job, str(credential), str(pod_tmp / "ray.old"), str(fd)], state, fd
        )
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, pass_fds=(fd,))
    finally:
        os.close(fd)
    assert SECRET not in result.stdout and "denied" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 0 and (pod_tmp / "ray.old" / "written").read_text() == "x", result.stderr
    assert "descriptor False" in result.stdout


@needs_landlock
def test_the_launcher_refuses_to_grant_anything_but_a_directory(tmp_path: Path) -> None:
    """A file's rights were cut to read, write and truncate and granted: the credential, where its
    path had been opened for the temp dir. Refused now, and Ray not started (exit 78)."""
    state, _ = chart_layout(tmp_path)
    credential = state / "identity.json"
    fd = os.open(credential, os.O_PATH | os.O_CLOEXEC)
    try:
        argv = ray_launch.launcher_command(os.getpid(), [sys.executable, "-c", READ, str(credential)], state, fd)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, pass_fds=(fd,))
    finally:
        os.close(fd)
    assert SECRET not in result.stdout + result.stderr
    assert result.returncode == ray_launch.EXIT_CANNOT_CONFINE, result.stdout + result.stderr
    assert "not a directory" in result.stderr


@needs_landlock
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to drop to nobody")
def test_an_ancestor_made_unlistable_by_job_code_does_not_unconfine_the_next_ray() -> None:
    """Default layout ~/.koinon/agent, agent not root. Landlock does not cover chmod: job code may
    chmod ~/.koinon to 0100 (still traversable, so the agent keeps working). The next launch cannot
    list it: it must grant nothing there, not run Ray unconfined (it did)."""
    base = Path("/tmp") / f"review-confine-{uuid.uuid4().hex[:8]}"
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    try:
        home = base / "home"
        state = home / ".koinon" / "agent"
        (state / "ray").mkdir(parents=True)
        (state / "identity.json").write_text(SECRET)
        base.chmod(0o755)
        for dirpath, _, files in os.walk(base):
            os.chown(dirpath, 65534, 65534)
            for name in files:
                os.chown(os.path.join(dirpath, name), 65534, 65534)
        (state / "identity.json").chmod(0o600)

        def as_nobody(*command: str) -> str:
            return run_confined(state, state / "ray", *command, user=nobody, launcher_copy=base / "ray_launch.py")

        check = as_nobody("cat", str(state / "identity.json"))
        assert SECRET not in check and "Permission denied" in check, check  # confined to begin with
        chmod = f"import os\nos.chmod({str(home / '.koinon')!r}, 0o100)\n"
        as_nobody("/usr/bin/python3", "-c", chmod)
        assert (home / ".koinon").stat().st_mode & 0o777 == 0o100
        out = as_nobody("cat", str(state / "identity.json"))
        assert SECRET not in out and "Permission denied" in out, f"the next Ray start ran unconfined: {out!r}"
    finally:
        if base.exists():
            (base / "home" / ".koinon").chmod(0o700)
            shutil.rmtree(base, ignore_errors=True)


@needs_landlock
async def test_the_agent_does_not_write_ray_output_through_a_planted_symlink(tmp_path: Path) -> None:
    """Ray's temp dir <state>/ray is job code's to write: a symlink ray-start.log -> ../identity.json
    must not make the agent append Ray's output to the credential on the next start (it did)."""
    state = tmp_path / "agent"
    temp = state / "ray"
    temp.mkdir(parents=True)
    (state / "identity.json").write_text(SECRET)
    plant = f"import os\nos.symlink('../identity.json', {str(temp / 'ray-start.log')!r})\n"
    run_confined(state, temp, sys.executable, "-c", plant)
    assert (temp / "ray-start.log").is_symlink()
    fake_ray = tmp_path / "ray"
    fake_ray.write_text("#!/bin/sh\necho 'Ray runtime started.'\n")
    fake_ray.chmod(0o755)
    settings = RaySettings(str(fake_ray), temp, "http://127.0.0.1:1", None, 0, 0, None, state_dir=state)
    node = RayNode(settings)
    await node.start(pb.Assignment(address="127.0.20.1"))
    assert node.process is not None
    await node.process.wait()
    assert (state / "identity.json").read_text() == SECRET, "Ray's output was appended to identity.json"


@pytest.mark.parametrize("plant", ["fifo", "fifo with a reader", "directory"])
async def test_ray_starts_again_whatever_job_code_put_at_its_start_log(tmp_path: Path, plant: str) -> None:
    """A FIFO at ray-start.log made the next start block in open(2) on the event loop (the whole agent
    froze: no heartbeats, no health report, no SIGTERM); a directory there made every start fail.
    The chart's temp dir outlives container restarts, so either lasted until the pod went."""
    temp = tmp_path / "ray"
    temp.mkdir()
    log_path = temp / "ray-start.log"
    reader = -1
    if plant == "directory":
        log_path.mkdir()
    else:
        os.mkfifo(log_path)
        if plant == "fifo with a reader":
            reader = os.open(log_path, os.O_RDONLY | os.O_NONBLOCK)
    fake_ray = tmp_path / "ray-bin"
    fake_ray.write_text("#!/bin/sh\necho 'Ray runtime started.'\n")
    fake_ray.chmod(0o755)
    settings = RaySettings(str(fake_ray), temp, "http://127.0.0.1:1", None, 0, 0, None)
    node = RayNode(settings)
    started = asyncio.create_task(asyncio.to_thread(asyncio.run, _start_and_wait(node)))
    try:
        # In a thread with a deadline: a start blocked in open(2) cannot be cancelled from its loop.
        done, _ = await asyncio.wait({started}, timeout=20)
        if not done and plant != "directory":  # frees the blocked open(2), so the thread can end
            os.close(os.open(log_path, os.O_RDONLY | os.O_NONBLOCK))
        assert done, "starting Ray blocked on what job code put at ray-start.log"
        started.result()
    finally:
        if reader >= 0:
            os.close(reader)
    assert log_path.is_file() and not log_path.is_symlink()
    assert b"Ray runtime started." in log_path.read_bytes()


async def _start_and_wait(node: RayNode) -> None:
    await node.start(pb.Assignment(address="127.0.20.1"))
    assert node.process is not None
    await node.process.wait()


def test_a_start_log_made_unwritable_is_replaced() -> None:
    """Job code (the agent's user, not root in the chart) can chmod 000 the log: open(2) failed
    EACCES on every start, and Ray never started again. Run as a user root's permissions do not
    override, in a dir it can reach (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="koinon-start-log-"))
    try:
        base.chmod(0o755)
        temp = base / "ray"
        temp.mkdir()
        uid = 65534 if os.geteuid() == 0 else os.geteuid()
        if os.geteuid() == 0:
            os.chown(temp, uid, uid)
        path = temp / "ray-start.log"

        def plant_then_open() -> None:
            path.write_bytes(b"planted by job code")
            path.chmod(0o000)  # what job code of the agent's own user can do
            dir_fd = os.open(temp, os.O_RDONLY | os.O_DIRECTORY)
            fd = ray_node._open_start_log(dir_fd, path.name)
            os.close(dir_fd)
            os.write(fd, b"ray output")
            os.close(fd)

        error = as_non_root(uid, plant_then_open)
        assert error == "", f"ray start cannot open its log: {error}"
        assert path.read_bytes() == b"ray output"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_landlock
def test_a_landlock_abi_1_kernel_runs_ray_unconfined_rather_than_break_renames(tmp_path: Path) -> None:
    """On ABI 1 (5.13-5.18) a ruleset refuses every rename or link across directories (EXDEV), in
    /tmp and $HOME too (pip, model caches): such a kernel gets no confinement, with a warning."""
    state = tmp_path / "state"
    (state / "ray").mkdir(parents=True)
    work = tmp_path / "work"
    (work / "a").mkdir(parents=True)
    (work / "b").mkdir()
    (work / "a" / "f").write_text("x")
    script = (
        "import os, sys\nsys.path.insert(0, sys.argv[1])\nimport ray_launch\n"
        "ray_launch.landlock_abi = lambda: 1\n"
        "try:\n ray_launch.confine(sys.argv[2], [os.open(sys.argv[3], os.O_RDONLY | os.O_DIRECTORY)])\n"
        "except ray_launch.KernelCannotConfine:\n print('unconfined')\n"
        "try:\n os.rename(sys.argv[4], sys.argv[5]); print('renamed')\n"
        "except OSError as e: print('refused', e)\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            script,
            str(Path(ray_launch.__file__).parent),
            str(state),
            str(state / "ray"),
            str(work / "a" / "f"),
            str(work / "b" / "f"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "renamed" in result.stdout, result.stdout + result.stderr
    assert "unconfined" in result.stdout, result.stdout + result.stderr


@pytest.mark.skipif(ray_launch.landlock_abi() < 6, reason="Landlock scopes signals from ABI 6 (Linux 6.12)")
async def test_confined_job_code_cannot_stop_the_agent(tmp_path: Path) -> None:
    """A real `koinon-agent join`. Job code confined as its Ray node is cannot SIGSTOP or SIGKILL the
    agent, its uid's though it is (Landlock ABI 6+ scopes signals); and Ray inherits no socket."""
    rec = tmp_path / "records"
    rec.mkdir()
    fake_ray = tmp_path / "ray"
    fake_ray.write_text(f"#!/bin/bash\nls -l /proc/$$/fd > {rec}/fds\necho $$ > {rec}/ray.pid\nexec sleep 600\n")
    fake_ray.chmod(0o755)
    async with cluster(tmp_path, tls=False) as c:
        process = await start_agent_process(c, tmp_path / "agent", fake_ray)
        try:
            deadline = time.monotonic() + 60
            while not (rec / "ray.pid").exists() or not (rec / "ray.pid").read_text().strip():
                assert process.returncode is None and time.monotonic() < deadline
                await asyncio.sleep(0.2)
            assert "socket:" not in (rec / "fds").read_text()
            state = tmp_path / "agent"
            stop = f"import os, signal\nos.kill({process.pid}, signal.SIGSTOP)\n"
            run_confined(state, state / "ray", sys.executable, "-c", stop)
            await asyncio.sleep(0.3)
            status = psutil.Process(process.pid).status()
            os.kill(process.pid, signal.SIGCONT)
            assert status != psutil.STATUS_STOPPED, "confined job code SIGSTOPped the agent"
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            with contextlib.suppress(Exception):
                os.killpg(int((rec / "ray.pid").read_text()), signal.SIGKILL)


def test_a_fifo_planted_as_a_raylet_log_does_not_block_the_agent(tmp_path: Path) -> None:
    """The agent reads raylet*.out in Ray's temp dir, which job code can write: a FIFO there must
    not block the agent's event loop (a plain open waits for a writer for ever)."""
    temp = tmp_path / "ray"
    logs = temp / "session_latest" / "logs"
    logs.mkdir(parents=True)
    os.mkfifo(logs / "raylet.out")
    (logs / "raylet.1.out").symlink_to("/etc/hostname")
    settings = RaySettings("ray", temp, "http://127.0.0.1:1", None, 0, 0, None, state_dir=tmp_path)
    started = time.monotonic()
    assert RayNode(settings)._raylet_serving("ab" * 28) is False
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("temp", ["state", ".", "state/."])
def test_a_ray_temp_dir_holding_the_state_dir_is_refused_at_start(tmp_path: Path, temp: str) -> None:
    from koinon_agent.config import AgentConfig

    config = AgentConfig(gateway="127.0.0.1:1", state_dir=tmp_path / "state", temp_dir=tmp_path / temp)
    with pytest.raises(ValueError, match=r"^temp_dir \(KOINON_TEMP_DIR\): .* Ray's jobs would reach"):
        config.validate()
    AgentConfig(gateway="127.0.0.1:1", state_dir=tmp_path / "state", temp_dir=tmp_path / "state" / "ray").validate()
    AgentConfig(gateway="127.0.0.1:1", state_dir=tmp_path / "state", temp_dir=tmp_path / "ray").validate()


@needs_landlock
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to drop to nobody")
def test_confined_job_code_cannot_read_the_environment_of_the_containers_other_processes() -> None:
    """In the chart's pod KOINON_TOKEN is in the environment of tini (PID 1) and of the exec probes,
    which, unlike the agent, stay dumpable: a process of the same (non-root) user reads it from
    /proc/<pid>/environ. A process Landlock confines may read the environment of no process outside
    its domain (a ptrace check): job code confined as Ray is cannot (README: when that holds)."""
    base = Path("/tmp") / f"review-environ-{uuid.uuid4().hex[:8]}"
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    token = "abcdef.0123456789abcdef"
    # Stands for tini: started with the container's environment, the token in it.
    holder = subprocess.Popen([*nobody, "env", f"KOINON_TOKEN={token}", "sleep", "60"])
    try:
        state = base / "state"
        (state / "ray").mkdir(parents=True)
        base.chmod(0o755)
        for path in (state, state / "ray"):
            os.chown(path, 65534, 65534)
        read = (
            "import sys, time\n"
            "for _ in range(50):\n"
            "    try:\n"
            f"        data = open('/proc/{holder.pid}/environ', 'rb').read()\n"
            "    except OSError as exc:\n"
            "        print('denied', type(exc).__name__); break\n"
            "    if b'KOINON_TOKEN' in data:\n"
            "        print(data.decode(errors='replace')); break\n"
            "    time.sleep(0.1)  # setpriv has not exec'd env yet\n"
        )
        unconfined = subprocess.run(
            [*nobody, "/usr/bin/python3", "-c", read], capture_output=True, text=True, timeout=30
        )
        assert token in unconfined.stdout, unconfined  # without Landlock, job code reads it
        confined = run_confined(
            state, state / "ray", "/usr/bin/python3", "-c", read, user=nobody, launcher_copy=base / "ray_launch.py"
        )
        assert token not in confined and "denied PermissionError" in confined, confined
    finally:
        holder.kill()
        holder.wait()
        shutil.rmtree(base, ignore_errors=True)


CHMOD_ZERO = (
    "import os, sys\n"
    "try:\n open(sys.argv[1]).read(); print('READ')\nexcept OSError as exc:\n print('read denied', exc.errno)\n"
    "for target in sys.argv[1:]:\n os.chmod(target, 0)\nprint('chmodded')\n"
)


@needs_landlock
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to run as nobody")
def test_confined_job_code_cannot_lock_the_agent_out_of_its_credential() -> None:
    """Landlock has no right for chmod: job code (the agent's user) cannot read the credential but
    could `chmod 0` it, and the state dir too where it is the agent's own. Every later start of the
    agent then stopped on "cannot read the stored identity" (exit 2, a crash loop)."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="koinon-chmod-"))
    try:
        base.chmod(0o755)
        state_dir = base / "home" / ".koinon" / "agent"
        state_dir.mkdir(parents=True)
        temp = base / "tmp" / "ray"
        temp.mkdir(parents=True)
        identity = state_dir / "identity.json"
        identity.write_text('{"gateway": "gw:1", "node_name": "n", "address": "10.0.0.1", "credential": "secret"}')
        for path in (state_dir, identity, temp, temp.parent):
            os.chown(path, 65534, 65534)
        identity.chmod(0o600)
        state_dir.chmod(0o700)
        out = run_confined(
            state_dir, temp, "/usr/bin/python3", "-c", CHMOD_ZERO, str(identity), str(state_dir),
            user=nobody, launcher_copy=base / "ray_launch.py",
        )  # fmt: skip
        assert "read denied" in out and "READ" not in out and "chmodded" in out, out

        def start_again() -> None:
            with state.exclusive(state_dir):
                stored = state.load(state_dir, can_rejoin=True)
                assert stored is not None and stored.credential == "secret"

        assert as_non_root(65534, start_again) == ""
        assert (identity.stat().st_mode & 0o777, state_dir.stat().st_mode & 0o777) == (0o600, 0o700)
    finally:
        shutil.rmtree(base, ignore_errors=True)


CHMOD_TO = (
    "import os, sys\n"
    "try:\n open(sys.argv[1]).read(); print('READ')\nexcept OSError as exc:\n print('read denied', exc.errno)\n"
    "for target, mode in zip(sys.argv[2::2], sys.argv[3::2]):\n os.chmod(target, int(mode, 8))\nprint('chmodded')\n"
)
NOBODY_IDS = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _layout(base: Path) -> tuple[Path, Path, Path]:
    base.chmod(0o755)
    home = base / "home"
    state_dir = home / ".koinon" / "agent"  # the default ~/.koinon/agent
    state_dir.mkdir(parents=True)
    temp = base / "tmp" / "ray"
    temp.mkdir(parents=True)
    identity = state_dir / "identity.json"
    identity.write_text('{"gateway": "gw:1", "node_name": "n", "address": "10.0.0.1", "credential": "secret"}')
    for path in (home, home / ".koinon", state_dir, identity, temp, temp.parent):
        os.chown(path, 65534, 65534)
    identity.chmod(0o600)
    state_dir.chmod(0o700)
    return state_dir, identity, temp


def _start_again(state_dir: Path) -> str:
    def start() -> None:
        with state.exclusive(state_dir):
            stored = state.load(state_dir, can_rejoin=True)
            assert stored is not None and stored.credential == "secret"

    return as_non_root(65534, start)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to run as nobody"
)


@needs_landlock
@needs_root
@pytest.mark.parametrize("what", ["parent-0", "home-0", "state-dir-o+w"])
def test_no_chmod_of_job_code_locks_the_agent_out(what: str) -> None:
    """Dirs above the state dir that the agent's user owns (~, ~/.koinon), and the state dir made
    writable by others, which check_private refuses: every later start stopped with exit 2."""
    base = Path(tempfile.mkdtemp(prefix="koinon-review-"))
    try:
        state_dir, identity, temp = _layout(base)
        target, mode = {
            "parent-0": (state_dir.parent, "0"),  # ~/.koinon
            "home-0": (state_dir.parent.parent, "0"),  # ~
            "state-dir-o+w": (state_dir, "707"),
        }[what]
        out = run_confined(
            state_dir, temp, "/usr/bin/python3", "-c", CHMOD_TO, str(identity), str(target), mode,
            user=NOBODY_IDS, launcher_copy=base / "ray_launch.py",
        )  # fmt: skip
        assert "read denied" in out and "READ" not in out and "chmodded" in out, out
        assert _start_again(state_dir) == ""
    finally:
        for path in (base / "home", base / "home" / ".koinon"):
            path.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


@needs_landlock
@needs_root
def test_job_code_cannot_make_the_credential_readable_by_other_users() -> None:
    """identity.json is set back to 0600, as the agent writes it, when the agent starts."""
    base = Path(tempfile.mkdtemp(prefix="koinon-review-"))
    try:
        state_dir, identity, temp = _layout(base)
        (base / "home").chmod(0o755)
        (base / "home" / ".koinon").chmod(0o755)
        out = run_confined(
            state_dir, temp, "/usr/bin/python3", "-c", CHMOD_TO, str(identity), str(state_dir), "711",
            str(identity), "644", user=NOBODY_IDS, launcher_copy=base / "ray_launch.py",
        )  # fmt: skip
        assert "read denied" in out and "READ" not in out and "chmodded" in out, out
        assert _start_again(state_dir) == ""
        other = subprocess.run(
            ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups", "cat", str(identity)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert "secret" not in other.stdout, "another user of the machine reads the node credential"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_landlock
@needs_root
def test_no_chmod_of_job_code_locks_out_an_agent_whose_state_dir_is_given_as_a_symlink() -> None:
    base = Path(tempfile.mkdtemp(prefix="koinon-review-"))
    try:
        state_dir, identity, temp = _layout(base)
        link = base / "home" / "state-link"
        link.symlink_to(state_dir)
        os.chown(link, 65534, 65534, follow_symlinks=False)
        out = run_confined(
            state_dir, temp, "/usr/bin/python3", "-c", CHMOD_TO, str(identity), str(state_dir), "0",
            user=NOBODY_IDS, launcher_copy=base / "ray_launch.py",
        )  # fmt: skip
        assert "chmodded" in out, out
        assert _start_again(link) == ""  # the agent run with --state-dir <link>
    finally:
        shutil.rmtree(base, ignore_errors=True)
