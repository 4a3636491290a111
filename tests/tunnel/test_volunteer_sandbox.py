"""A volunteer in a network namespace still shares the filesystem, and unix socket paths cross
network namespaces: the sandbox leaves it only the paths it needs."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from koinon_dev.tunnel_plane import create_netns, delete_netns, netns_available
from koinon_dev.volunteer_sandbox import runs_without_privileges

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
def writable(path):
    try:
        open(path, "a").close()
        return True
    except OSError:
        return False
work, state, run_socket = sys.argv[1], sys.argv[2], sys.argv[3]
print("head-socket", connect(f"{work}/head/raylet.sock"))
print("gateway-socket", connect(f"{work}/gw.sock"))
print("host-run-socket", connect(run_socket))
print("ca", open(f"{work}/ca.pem").read())
print("ca-writable", writable(f"{work}/ca.pem"))
print("capabilities", [l.split()[1] for l in open("/proc/self/status") if l.startswith(("CapEff", "CapPrm", "CapBnd"))])
print("other-volunteer", os.path.exists(f"{work}/agent-other/identity.json"))
print("state", sorted(os.listdir(state)))
print("shm", sorted(os.listdir("/dev/shm")))
print("processes", [p for p in os.listdir("/proc") if p.isdigit()])
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
        run_dir = Path("/run") / f"koinon-sbx-{secrets.token_hex(3)}"  # a host service's socket
        run_dir.mkdir()
        for path in (work / "head" / "raylet.sock", work / "gw.sock", run_dir / "service.sock"):
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(path))
            listener.listen()
            listeners.append(listener)
            path.chmod(0o666)  # as the gateway makes its socket: the volunteer connects as nobody
        create_netns(netns)
        shm_marker = Path("/dev/shm") / f"koinon-sbx-{secrets.token_hex(3)}"
        shm_marker.write_text("host")
        try:
            completed = subprocess.run(
                ["ip", "netns", "exec", netns, sys.executable, "-m", "koinon_dev.volunteer_sandbox",
                 f"--expose-ro={work}/gw.sock", f"--expose-ro={work}/ca.pem", f"--expose={work}/agent-me",
                 f"--hide={state}", "--", sys.executable, "-c", PROBE, str(work), str(state),
                 str(run_dir / "service.sock")],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        finally:
            shm_marker.unlink()
        assert completed.returncode == 0, completed.stderr
        seen = dict(line.split(" ", 1) for line in completed.stdout.splitlines())
        processes = sorted(map(int, seen.pop("processes").strip("[]").replace("'", "").split(", ")))
        assert seen == {
            "head-socket": "FileNotFoundError",
            "gateway-socket": "connected",
            "host-run-socket": "FileNotFoundError",
            "ca": "CA",
            "ca-writable": "False",  # shared by every volunteer: none may replace it
            "capabilities": str(["0000000000000000"] * 3),
            "other-volunteer": "False",
            "state": "[]",
            "shm": "[]",
        }
        # Its init and itself (the PIDs between them were mounts): not the head's raylet, nor anything else.
        assert len(processes) == 2 and processes[0] == 1, processes
        # Its own directory is the real one; what it wrote elsewhere in /tmp stayed in the sandbox.
        assert (work / "agent-me" / "identity.json").read_text() == "mine"
        assert not Path("/tmp/scratch").exists()
        assert "koinon-sandbox" not in Path("/proc/mounts").read_text()
    finally:
        delete_netns(netns)
        for listener in listeners:
            listener.close()
        subprocess.run(["rm", "-rf", str(work), str(state), str(run_dir)], check=False)


ESCAPE = r"""
import ctypes, os, subprocess, sys
host_pid = sys.argv[1]
def attempt(what, action):
    try:
        action()
        print(what, "done")
    except BaseException as exc:
        print(what, type(exc).__name__)
def setns():
    fd = os.open(f"/proc/{host_pid}/ns/net", os.O_RDONLY)  # only with the host's /proc
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        raise PermissionError(os.strerror(ctypes.get_errno()))
attempt("umount-tmp", lambda: subprocess.run(["umount", "-l", "/tmp"], check=True, capture_output=True))
attempt("umount-proc", lambda: subprocess.run(["umount", "-l", "/proc"], check=True, capture_output=True))
attempt("setns-host", setns)
attempt("host-tmp-visible", lambda: os.listdir(sys.argv[2]))
attempt("write-root-owned-file", lambda: open(sys.argv[3], "w").write("rewritten by job code"))
"""


def test_job_code_in_the_sandbox_cannot_undo_it() -> None:
    """Root without capabilities: a job cannot unmount what covers the host's /tmp and /proc, nor
    enter the host's network namespace (before, all three worked and the host's loopback
    services and /tmp secrets were reachable)."""
    secret_dir = Path("/tmp") / f"koinon-esc-{secrets.token_hex(3)}"  # stands for the head's work dir
    secret_dir.mkdir()
    host_file = Path("/var/tmp") / f"koinon-esc-{secrets.token_hex(3)}"  # root's, outside /tmp (as /etc is)
    host_file.write_text("the host's")
    host_file.chmod(0o666)  # writable by anyone, nobody included: only the read-only mount keeps it
    netns = f"kesc-{secrets.token_hex(3)}"
    create_netns(netns)
    try:
        completed = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "koinon_dev.volunteer_sandbox",
             "--", sys.executable, "-c", ESCAPE, str(os.getpid()), str(secret_dir), str(host_file)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        seen = dict(line.split(" ", 1) for line in completed.stdout.splitlines())
        assert seen == {
            "umount-tmp": "CalledProcessError",
            "umount-proc": "CalledProcessError",
            "setns-host": "FileNotFoundError",  # the host's processes are not in its /proc
            "host-tmp-visible": "FileNotFoundError",
            "write-root-owned-file": "OSError",  # EROFS: every host mount is read-only in there
        }
        assert host_file.read_text() == "the host's"
    finally:
        delete_netns(netns)
        secret_dir.rmdir()
        host_file.unlink()


def test_software_the_sandbox_cannot_read_without_privileges_is_found_before_volunteers_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout that is another user's and 0750: the sandbox's user (nobody) cannot read it. The dev
    plane finds out first and runs volunteers as plain processes, saying why."""
    assert runs_without_privileges("koinon_agent.cli") == ""
    home = Path("/var/tmp") / f"koinon-home-{secrets.token_hex(3)}"
    home.mkdir(mode=0o750)
    try:
        (home / "koinon_probe_module.py").write_text("")
        os.chown(home, 12345, 12345)  # another user's: neither root's nor the sandbox's (nobody)
        monkeypatch.setenv("PYTHONPATH", f"{home}:{os.environ.get('PYTHONPATH', '')}")
        assert "koinon_probe_module" in runs_without_privileges("koinon_probe_module")
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=False)


def test_signals_reach_the_sandboxed_command_and_sigkill_takes_everything_inside_with_it() -> None:
    netns = f"ksbx-{secrets.token_hex(3)}"
    create_netns(netns)
    try:
        # SIGTERM goes on to the command; the exit status is the command's.
        sandboxed = ["ip", "netns", "exec", netns, sys.executable, "-m", "koinon_dev.volunteer_sandbox", "--"]
        trapping = subprocess.Popen([*sandboxed, "sh", "-c", "trap 'exit 7' TERM; sleep 60 & wait"])
        inside = wait_for_pids(netns, 3)  # init, sh, sleep
        trapping.send_signal(signal.SIGTERM)
        assert trapping.wait(timeout=20) == 7
        # The command's children went with the namespace's init.
        wait_gone(inside)
        # SIGKILL cannot be passed on: the init dies with the outside process, and the kernel
        # kills everything inside (a Ray node left behind would hold the namespace).
        killed = subprocess.Popen([*sandboxed, "sh", "-c", "sleep 60 & wait"])
        inside = wait_for_pids(netns, 3)
        killed.kill()
        killed.wait(timeout=20)
        for _ in range(100):
            if not subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split():
                break
            time.sleep(0.1)
        else:
            raise AssertionError("processes still run in the namespace after SIGKILL")
        wait_gone(inside)
    finally:
        delete_netns(netns)


def wait_for_pids(netns: str, count: int) -> list[str]:
    for _ in range(200):
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
        if len(pids) >= count + 1:  # the outside process runs in the namespace too
            return pids
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} processes in {netns}")


def wait_gone(pids: list[str]) -> None:
    for _ in range(100):
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return
        time.sleep(0.05)
    raise AssertionError(f"still running: {[pid for pid in pids if Path(f'/proc/{pid}').exists()]}")


COUNT_SIGTERMS = r"""
import signal, sys, time
seen = []
signal.signal(signal.SIGTERM, lambda *_: seen.append(1))
open(sys.argv[1], "w").write("ready")
deadline = time.monotonic() + 30
while time.monotonic() < deadline and not seen:
    time.sleep(0.01)
time.sleep(1.0)  # room for copies of the signal to arrive
sys.exit(10 + len(seen))
"""


def test_a_signal_to_the_whole_process_group_reaches_the_command_once(tmp_path: Path) -> None:
    # The agent reads a second SIGTERM as "stop Ray now, skip the drain": a supervisor's killpg
    # (or Ctrl-C at a terminal) must not deliver it once per process between it and the command.
    netns = f"ksbx-{secrets.token_hex(3)}"
    create_netns(netns)
    ready = tmp_path / "ready"
    try:
        volunteer = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "koinon_dev.volunteer_sandbox",
             f"--expose={tmp_path}", "--", sys.executable, "-c", COUNT_SIGTERMS, str(ready)],
            start_new_session=True,
        )  # fmt: skip
        for _ in range(400):
            if ready.exists():
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the sandboxed command did not start")
        os.killpg(volunteer.pid, signal.SIGTERM)
        assert volunteer.wait(timeout=30) == 11, "SIGTERM seen a different number of times than once"
    finally:
        delete_netns(netns)


def test_a_signal_sent_while_the_sandbox_starts_is_not_lost() -> None:
    # Until the namespace's init has a handler, the kernel drops a SIGTERM it gets from outside
    # (PID 1 has no default action): one sent during start-up left the volunteer running for good.
    netns = f"ksbx-{secrets.token_hex(3)}"
    create_netns(netns)
    try:
        for delay_ms in range(24):  # the gap lasted some 5-12 ms here: try each moment across it
            volunteer = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-m", "koinon_dev.volunteer_sandbox",
                 "--", "sleep", "60"],
            )  # fmt: skip
            # From the moment the init exists, while it sets up (mounts /proc, starts the command).
            children = Path(f"/proc/{volunteer.pid}/task/{volunteer.pid}/children")
            while volunteer.poll() is None and not children.read_text().split():
                pass
            time.sleep(delay_ms / 1000)
            volunteer.send_signal(signal.SIGTERM)
            try:
                volunteer.wait(timeout=15)
            except subprocess.TimeoutExpired:
                volunteer.kill()
                volunteer.wait()
                raise AssertionError(f"a SIGTERM sent {delay_ms} ms into the init's start was lost") from None
    finally:
        delete_netns(netns)


def signal_mask(field: str, status: str) -> int:
    return int(next(line for line in status.splitlines() if line.startswith(f"{field}:")).split()[1], 16)


def run_sandboxed(*command: str, **popen: Any) -> subprocess.CompletedProcess[str]:
    """``command`` in the sandbox, in a network namespace of its own made for it."""
    netns = f"ksbx-{secrets.token_hex(3)}"
    create_netns(netns)
    try:
        return subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "koinon_dev.volunteer_sandbox", "--", *command],
            capture_output=True, text=True, timeout=60, **popen,
        )  # fmt: skip
    finally:
        delete_netns(netns)


def test_the_command_starts_with_no_signal_ignored_or_blocked_by_the_sandbox() -> None:
    # Python ignores SIGPIPE and SIGXFSZ and the sandbox blocks signals while it starts; both would
    # pass through exec into the agent and Ray (a dead pipe would then fail writes instead of killing).
    # What the caller itself ignores passes through, as it would through a shell.
    python_only = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
    inherited = signal_mask("SigIgn", Path("/proc/self/status").read_text()) & ~python_only
    completed = run_sandboxed("grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status")
    assert completed.returncode == 0, completed.stderr
    assert signal_mask("SigIgn", completed.stdout) == inherited
    assert signal_mask("SigBlk", completed.stdout) == 0


def test_signals_the_caller_ignores_stay_ignored_in_the_command() -> None:
    # Under nohup (SIGHUP ignored) or a non-interactive shell's background job (SIGINT, SIGQUIT),
    # the command ignores them too, as through a shell: the sandbox reset every forwarded signal.
    hup_quit = (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGQUIT - 1))
    completed = run_sandboxed(
        "grep",
        "-E",
        "^SigIgn",
        "/proc/self/status",
        preexec_fn=lambda: [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGHUP, signal.SIGQUIT)],
    )
    assert completed.returncode == 0, completed.stderr
    assert signal_mask("SigIgn", completed.stdout) & hup_quit == hup_quit


def test_a_job_may_write_more_than_a_token_amount_to_tmp() -> None:
    # A job's Python tempfiles land in the sandbox's /tmp: 64 MiB (its former size) failed real work.
    completed = run_sandboxed("sh", "-c", "head -c 200M /dev/zero > /tmp/big && stat -c %s /tmp/big")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == str(200 << 20)


def test_code_under_tmp_on_the_python_path_stays_visible_and_read_only() -> None:
    # A checkout (and its venv) under /tmp, as a CI clone may be: covering /tmp hid the agent's own
    # code, and every sandboxed volunteer failed to start.
    work = Path("/tmp") / f"koinon-sbx-{secrets.token_hex(3)}"
    netns = f"ksbx-{secrets.token_hex(3)}"
    try:
        (work / "lib").mkdir(parents=True)
        (work / "lib" / "probe_module.py").write_text("ANSWER = 42\n")
        (work / "elsewhere.txt").write_text("not for the volunteer")
        create_netns(netns)
        probe = (
            "import os, probe_module\n"
            "print(probe_module.ANSWER, os.path.exists({!r}))\n"
            "try:\n    open({!r}, 'w')\nexcept OSError as exc:\n    print(type(exc).__name__)\n"
        ).format(str(work / "elsewhere.txt"), str(work / "lib" / "planted.py"))
        completed = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "koinon_dev.volunteer_sandbox",
             "--", sys.executable, "-c", probe],
            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(work / "lib")},
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.split() == ["42", "False", "OSError"]
        assert not (work / "lib" / "planted.py").exists()
    finally:
        delete_netns(netns)
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_the_software_kept_visible_is_the_environment_and_the_projects_packages() -> None:
    import koinon_agent
    import koinon_gateway
    from koinon_dev.volunteer_sandbox import software_paths

    kept = software_paths(under=Path("/"))
    assert Path(sys.prefix).resolve() in kept
    for package in (koinon_agent, koinon_gateway):
        assert Path(package.__file__).resolve().parent in kept  # type: ignore[arg-type]
    assert [len(p.parts) for p in kept] == sorted(len(p.parts) for p in kept)  # parents first


def test_mount_points_with_escaped_names_or_covered_by_others_do_not_stop_the_sandbox() -> None:
    """mountinfo escapes a space as \\040 (a USB drive's label), and a mount covered by a later
    one cannot be reached: neither may stop every volunteer from starting."""
    base = Path("/var/tmp") / f"koinon-mnt-{secrets.token_hex(3)}"
    spaced, covered = base / "USB DRIVE", base / "cover" / "inner"
    for directory in (spaced, covered):
        directory.mkdir(parents=True)
    mounted: list[Path] = []
    netns = f"kmnt-{secrets.token_hex(3)}"
    try:
        for target in (spaced, covered, covered.parent):  # the last one covers "inner"
            subprocess.run(["mount", "-t", "tmpfs", "koinon-test", str(target)], check=True)
            mounted.append(target)
        create_netns(netns)
        probe = "import sys; open(sys.argv[1] + '/x', 'w')"
        completed = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "koinon_dev.volunteer_sandbox",
             "--", sys.executable, "-c", probe, str(spaced)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "Read-only file system" in completed.stderr, completed.stderr  # it started, and that mount is ro
        assert "volunteer sandbox:" not in completed.stderr
    finally:
        delete_netns(netns)
        for target in reversed(mounted):
            subprocess.run(["umount", str(target)], check=False)
        subprocess.run(["rm", "-rf", str(base)], check=False)
