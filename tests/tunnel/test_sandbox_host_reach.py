"""What job code on a sandboxed volunteer can reach of the host, started as LocalAgent starts it
(ip netns exec NETNS python -m koinon_dev.volunteer_sandbox --expose-ro=<gateway socket dir>
--expose-ro=<ca> --expose=<agent dir> --expose=<ray dir> --hide=<state dir> -- COMMAND).

Uid 0 without capabilities still passed owner permission checks on the host's kernel settings
(/proc/sys, sysfs) and devices (/dev): a core_pattern of "|<script in the agent dir>" then ran the
script as full root in the host's namespaces. Nothing here changes the host's settings: a write
is tried by opening for writing, and nothing is written."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from koinon_dev.tunnel_plane import create_netns, delete_netns, netns_available
from koinon_dev.volunteer_sandbox import software_paths

pytestmark = pytest.mark.skipif(not netns_available(), reason="needs root and ip netns")

SANDBOX = [sys.executable, "-m", "koinon_dev.volunteer_sandbox"]


def pythonpath(*first: str) -> dict[str, str]:
    """The environment with ``first`` and then this run's PYTHONPATH, made absolute: the sandbox
    itself is started from another directory in some tests here."""
    inherited = [os.path.abspath(e) for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*first, *inherited])}


PROBE = r"""
import errno, json, os, socket, subprocess, sys
args = json.loads(sys.argv[1])
out = {}
def attempt(name, fn):
    try:
        out[name] = ["ok", fn()]
    except BaseException as exc:
        out[name] = [type(exc).__name__, str(exc)[:120]]
def tcp(host, port):
    s = socket.create_connection((host, port), timeout=2); s.close(); return "connected"
def unix(path):
    s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(path); s.close(); return "connected"
def open_for_writing(path):
    # Opening is where permission and read-only mounts are checked; nothing is written.
    os.close(os.open(path, os.O_WRONLY))
    return "writable"
attempt("tcp-host-loopback", lambda: tcp("127.0.0.1", args["tcp_port"]))
attempt("abstract-unix", lambda: unix("\0" + args["abstract"]))
attempt("gateway-socket", lambda: unix(args["gw_sock"]))
attempt("state-socket", lambda: unix(args["state_sock"]))
attempt("read-kubeconfig", lambda: open(args["kubeconfig"]).read())
attempt("read-ca", lambda: open(args["ca"]).read())
attempt("write-own-dir", lambda: open(args["own_dir"] + "/identity.json", "w").write("mine"))
attempt("write-ray-dir", lambda: os.mkdir(args["ray_dir"] + "/session"))
attempt("write-tmp", lambda: open("/tmp/scratch", "w").write("x"))
attempt("write-shm", lambda: open("/dev/shm/plasma", "w").write("x"))
attempt("write-home", lambda: open(os.environ["HOME"] + "/.probe", "w").write("x"))
attempt("write-var-tmp", lambda: open(args["var_tmp_file"], "w").write("x"))
attempt("write-etc", lambda: open("/etc/koinon-probe", "w").write("x"))
attempt("write-gateway-dir", lambda: open(args["gw_dir"] + "/planted", "w").write("x"))
attempt("read-etc-shadow", lambda: open("/etc/shadow").read()[:10])
attempt("read-private-dir", lambda: os.listdir(args["private_dir"]))
attempt("list-root-home", lambda: os.listdir("/root"))
status = dict(l.split(":", 1) for l in open("/proc/self/status"))
out["Uid"] = status["Uid"].split()
out["Gid"] = status["Gid"].split()
out["Groups"] = status["Groups"].split()
out["CapEff"] = status["CapEff"].strip()
out["CapBnd"] = status["CapBnd"].strip()
out["NoNewPrivs"] = status["NoNewPrivs"].strip()
out["cwd"] = os.getcwd()
out["dev"] = sorted(os.listdir("/dev"))
attempt("kill-host-pid", lambda: os.kill(args["host_pid"], 0))
attempt("signal-init", lambda: os.kill(1, 0))
def mount():
    subprocess.run(["mount", "-t", "tmpfs", "x", "/mnt"], check=True, capture_output=True)
    return "mounted"
attempt("mount", mount)
for name, path in args["kernel_settings"].items():
    attempt(name, lambda path=path: open_for_writing(path))
attempt("create-file-in-dev", lambda: open(args["dev_file"], "w").write("planted in /dev"))
attempt("host-disk-visible", lambda: os.stat(args["disk"]) and "visible")
print(json.dumps(out))
"""

REFUSED = {"PermissionError", "OSError"}  # EACCES/EPERM, EROFS


def root_block_device() -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return line.split(" - ")[1].split()[1]
    raise AssertionError("no / mount")


def kernel_settings() -> dict[str, str]:
    """Host-wide settings uid 0 may write by file mode alone: each a way to root on the host or to
    disturb it (core_pattern and uevent_helper name programs the kernel runs as full root)."""
    candidates = {
        "sysctl-core_pattern": "/proc/sys/kernel/core_pattern",
        "sysctl-drop_caches": "/proc/sys/vm/drop_caches",
        "sysrq-trigger": "/proc/sysrq-trigger",
        "sysfs-uevent_helper": "/sys/kernel/uevent_helper",
        "sysfs-thp": "/sys/kernel/mm/transparent_hugepage/defrag",
    }
    return {name: path for name, path in candidates.items() if Path(path).exists()}


def test_a_job_in_the_sandbox_runs_as_nobody_and_reaches_no_host_setting_or_device() -> None:
    tag = secrets.token_hex(3)
    work = Path("/tmp") / f"koinon-prb-{tag}"
    state = Path("/var/tmp") / f"koinon-prb-state-{tag}"  # stands for .koinon/dev, hidden
    netns = f"kprb-{tag}"
    dev_file = Path("/dev") / f"koinon-probe-{tag}"
    private = Path("/var/tmp") / f"koinon-prb-private-{tag}"  # root's and 0700, as /root usually is
    listeners: list[socket.socket] = []
    try:
        for d in (work / "gateway-socket", state):
            d.mkdir(parents=True)
        private.mkdir(mode=0o700)
        (private / "id_ed25519").write_text("root's key")
        # As LocalAgent makes them: root's, 0700. The sandbox hands them to the volunteer's user.
        for d in (work / "agent-me", work / "ray-me"):
            d.mkdir(mode=0o700)
        (work / "agent-me" / "left-by-an-earlier-run").write_text("root's")
        (work / "ca.pem").write_text("CA")
        (work / "ca.pem").chmod(0o644)
        kubeconfig = state / "kubeconfig"
        kubeconfig.write_text("token: the-bearer-token")
        kubeconfig.chmod(0o600)
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        listeners.append(tcp)
        abstract = f"koinon-probe-{tag}"
        ab = socket.socket(socket.AF_UNIX)
        ab.bind("\0" + abstract)
        ab.listen()
        listeners.append(ab)
        for path in (work / "gateway-socket" / "gw.sock", state / "emulator.sock"):
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(path))
            s.listen()
            listeners.append(s)
        (work / "gateway-socket" / "gw.sock").chmod(0o666)  # as the gateway makes it
        create_netns(netns)
        args = {
            "tcp_port": tcp.getsockname()[1], "abstract": abstract,
            "gw_sock": str(work / "gateway-socket" / "gw.sock"), "gw_dir": str(work / "gateway-socket"),
            "ca": str(work / "ca.pem"), "own_dir": str(work / "agent-me"), "ray_dir": str(work / "ray-me"),
            "state_sock": str(state / "emulator.sock"), "kubeconfig": str(kubeconfig),
            "var_tmp_file": str(state.parent / f"koinon-prb-planted-{tag}"), "host_pid": os.getpid(),
            "dev_file": str(dev_file), "disk": root_block_device(), "kernel_settings": kernel_settings(),
            "private_dir": str(private),
        }  # fmt: skip
        completed = subprocess.run(
            ["ip", "netns", "exec", netns, *SANDBOX,
             f"--expose-ro={work}/gateway-socket", f"--expose-ro={work}/ca.pem",
             f"--expose={work}/agent-me", f"--expose={work}/ray-me", f"--hide={state}",
             "--", sys.executable, "-c", PROBE, json.dumps(args)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        seen = json.loads(completed.stdout)
        print(json.dumps(seen, indent=1))
        # What it needs: the gateway, the CA, its own directories, /tmp, /dev/shm and HOME.
        for name in ("gateway-socket", "read-ca", "write-own-dir", "write-ray-dir", "write-tmp", "write-shm"):
            assert seen[name][0] == "ok", (name, seen[name])
        assert seen["write-home"][0] == "ok", seen["write-home"]
        # Who it is: nobody, without capabilities, in /.
        assert seen["Uid"] == ["65534"] * 4 and seen["Gid"] == ["65534"] * 4 and seen["Groups"] == []
        assert seen["CapEff"] == "0000000000000000" and seen["CapBnd"] == "0000000000000000"
        assert seen["NoNewPrivs"] == "1"
        assert seen["cwd"] == "/"
        # What it must not reach.
        for name in (
            "tcp-host-loopback", "abstract-unix", "state-socket", "read-kubeconfig", "write-var-tmp",
            "write-etc", "write-gateway-dir", "read-etc-shadow", "read-private-dir", "kill-host-pid",
            "signal-init", "mount", "create-file-in-dev", "host-disk-visible",
        ):  # fmt: skip
            assert seen[name][0] != "ok", (name, seen[name])
        # root's home: out of reach, or (a Python installed there) covered, holding only that.
        kept = {path.relative_to("/root").parts[0] for path in software_paths(Path("/root"))}
        assert seen["list-root-home"][0] != "ok" or set(seen["list-root-home"][1]) <= kept, seen["list-root-home"]
        writable = {name: seen[name] for name in kernel_settings() if seen[name][0] not in REFUSED}
        assert not writable, f"job code may write the host's kernel settings: {writable}"
        # Its /dev is its own: harmless devices, no disks, an empty shm of its own.
        assert seen["dev"] == sorted(
            ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom",
             "zero"]
        )  # fmt: skip
        assert not dev_file.exists()
        # What it wrote in its own directory is there, and the volunteer's user's.
        assert (work / "agent-me" / "identity.json").read_text() == "mine"
        assert (work / "agent-me" / "identity.json").stat().st_uid == 65534
        assert (work / "agent-me" / "left-by-an-earlier-run").stat().st_uid == 65534
    finally:
        delete_netns(netns)
        for s in listeners:
            s.close()
        dev_file.unlink(missing_ok=True)
        subprocess.run(["rm", "-rf", str(work), str(state), str(private)], check=False)


CORE_PATTERN_ESCAPE = r"""
import os, sys
script = sys.argv[1]
# The job can write a helper into its own directory (the same path on the host) ...
open(script, "w").write("#!/bin/sh\nid > /tmp/escaped\n")
os.chmod(script, 0o755)
# ... but not name it in core_pattern: the kernel would run it as full root on the host. Only
# opened for writing, never written: the host's setting stays what it is.
try:
    os.close(os.open("/proc/sys/kernel/core_pattern", os.O_WRONLY))
    print("core_pattern writable")
except OSError as exc:
    print("refused", exc.errno)
"""


def test_job_code_cannot_point_core_pattern_at_a_program_of_its_own() -> None:
    before = Path("/proc/sys/kernel/core_pattern").read_text()
    tag = secrets.token_hex(3)
    work = Path("/tmp") / f"koinon-esc2-{tag}"
    netns = f"kesc2-{tag}"
    try:
        (work / "agent-me").mkdir(parents=True)
        create_netns(netns)
        completed = subprocess.run(
            ["ip", "netns", "exec", netns, *SANDBOX, f"--expose={work}/agent-me",
             "--", sys.executable, "-c", CORE_PATTERN_ESCAPE, str(work / "agent-me" / "h.sh")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        import errno

        assert completed.stdout.split() in (["refused", str(errno.EROFS)], ["refused", str(errno.EACCES)]), (
            completed.stdout
        )
    finally:
        delete_netns(netns)
        subprocess.run(["rm", "-rf", str(work)], check=False)
        assert Path("/proc/sys/kernel/core_pattern").read_text() == before


LATE_MOUNT = r"""
import os, sys, time
ready, go, target, marker = sys.argv[1:5]
open(ready, "w").write("ready")
while not os.path.exists(go):
    time.sleep(0.05)
print("sees-the-late-mount" if os.path.exists(marker) else "does-not-see-it")
try:
    open(target, "w").write("written by job code")
    print("written")
except OSError as exc:
    print(type(exc).__name__)
"""


def test_a_filesystem_the_host_mounts_after_the_volunteer_started_does_not_appear_writable_there() -> None:
    """read_only_elsewhere() remounts what is mounted when the sandbox starts; `ip netns exec`
    makes / a slave, so a host mount made later (a USB drive, a container's rootfs, an NFS share)
    propagated in, writable. And the directory it lands on, a bind mount within one filesystem,
    stayed writable: os.path.ismount() did not see it as a mount point."""
    tag = secrets.token_hex(3)
    work = Path("/tmp") / f"koinon-late-{tag}"
    base = Path("/var/tmp") / f"koinon-late-{tag}"
    netns = f"klate-{tag}"
    mounted = shared = False
    try:
        (work / "agent-me").mkdir(parents=True)
        (base / "mnt").mkdir(parents=True)
        (base / "mnt").chmod(0o777)  # nobody could write there if it were writable
        # As on a systemd host, where / is a shared mount: here only this directory is made one.
        subprocess.run(["mount", "--bind", str(base), str(base)], check=True)
        subprocess.run(["mount", "--make-shared", str(base)], check=True)
        shared = True
        create_netns(netns)
        ready, go = work / "agent-me" / "ready", work / "agent-me" / "go"
        volunteer = subprocess.Popen(
            ["ip", "netns", "exec", netns, *SANDBOX, f"--expose={work}/agent-me",
             "--", sys.executable, "-c", LATE_MOUNT, str(ready), str(go), str(base / "mnt" / "planted"),
             str(base / "mnt" / "marker")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for _ in range(400):
            if ready.exists():
                break
            time.sleep(0.05)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "koinon-late", str(base / "mnt")], check=True)
        mounted = True
        (base / "mnt" / "marker").write_text("on the late mount")
        go.write_text("go")
        out, err = volunteer.communicate(timeout=30)
        assert volunteer.returncode == 0, err
        # Neither the mount made later (its mounts are its own) nor the directory beneath it
        # (a bind mount within one filesystem, read-only like every other host mount).
        assert out.split() == ["does-not-see-it", "OSError"], out
    finally:
        if mounted:
            subprocess.run(["umount", str(base / "mnt")], check=False)
        if shared:
            subprocess.run(["umount", str(base)], check=False)
        delete_netns(netns)
        subprocess.run(["rm", "-rf", str(work), str(base)], check=False)


CWD_PROBE = r"""
import os, subprocess
print("cwd", os.getcwd())
# What a Ray worker reads through its agent's cwd: /proc/<agent>/cwd.
agent = subprocess.Popen(["sleep", "30"])  # stands for the agent: started in the cwd it was given
agent_cwd = f"/proc/{agent.pid}/cwd"
os.chdir("/tmp")  # the job's own cwd does not matter
for rel in (".koinon/dev/kubeconfig", ".koinon/dev/ray-auth-token"):
    try:
        print(rel, open(f"{agent_cwd}/{rel}").read().strip())
    except OSError as exc:
        print(rel, type(exc).__name__)
agent.kill()
"""


def test_the_control_plane_state_is_hidden_when_up_runs_from_a_checkout_under_tmp() -> None:
    """`make up` in a CI clone under /tmp: the default state dir is <cwd>/.koinon/dev, and every
    volunteer inherited that cwd. Mounting over /tmp does not move a process's cwd: relative paths
    still resolved in the host's /tmp/<checkout>."""
    tag = secrets.token_hex(3)
    checkout = Path("/tmp") / f"koinon-cwd-{tag}"
    state = checkout / ".koinon" / "dev"
    netns = f"kcwd-{tag}"
    try:
        state.mkdir(parents=True)
        (state / "kubeconfig").write_text("token: the-bearer-token-of-the-api")
        (state / "ray-auth-token").write_text("the-ray-token")
        for path in (checkout, checkout / ".koinon", state, state / "kubeconfig", state / "ray-auth-token"):
            path.chmod(0o777 if path.is_dir() else 0o666)  # readable by any uid: only hiding protects it
        (checkout / "agent-me").mkdir()
        create_netns(netns)
        completed = subprocess.run(
            ["ip", "netns", "exec", netns, *SANDBOX,
             f"--expose={checkout}/agent-me", f"--hide={state}", "--", sys.executable, "-c", CWD_PROBE],
            capture_output=True, text=True, timeout=60, cwd=checkout, env=pythonpath(),
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        print(completed.stdout)
        assert completed.stdout.splitlines()[0] == "cwd /"
        assert "bearer" not in completed.stdout, completed.stdout
        assert "the-ray-token" not in completed.stdout, completed.stdout
    finally:
        delete_netns(netns)
        subprocess.run(["rm", "-rf", str(checkout)], check=False)


def test_a_relative_program_path_and_pythonpath_still_work_from_slash(tmp_path: Path) -> None:
    """The command starts in /: what the caller gave relative to its own cwd is made absolute."""
    netns = f"krel-{secrets.token_hex(3)}"
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "koinon_rel_probe.py").write_text("ANSWER = 42\n")
    for path in (tmp_path, lib):
        path.chmod(0o755)
    probe = "import koinon_rel_probe as m; print(m.ANSWER)"
    (tmp_path / "run.sh").write_text(f"#!/bin/sh\nexec {sys.executable} -c '{probe}'\n")
    (tmp_path / "run.sh").chmod(0o755)
    create_netns(netns)
    try:
        completed = subprocess.run(
            ["ip", "netns", "exec", netns, *SANDBOX, f"--expose-ro={tmp_path}", "--", "./run.sh"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env=pythonpath("lib"),
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.strip() == "42"
    finally:
        delete_netns(netns)


def test_software_below_a_directory_nobody_cannot_enter_is_kept_and_the_rest_of_it_hidden() -> None:
    """A Python that pyenv installed in /root (0700), a checkout in a 0750 home: the volunteer's
    user could not reach them. The sandbox covers that directory, keeping only the software."""
    home = Path("/var/tmp") / f"koinon-home-{secrets.token_hex(3)}"
    netns = f"khome-{secrets.token_hex(3)}"
    try:
        (home / "checkout" / "lib").mkdir(parents=True)
        home.chmod(0o700)  # root's, as /root is
        for path in (home / "checkout", home / "checkout" / "lib"):
            path.chmod(0o755)
        (home / "checkout" / "lib" / "koinon_home_probe.py").write_text("ANSWER = 42\n")
        (home / ".ssh").mkdir()
        (home / ".ssh" / "id_ed25519").write_text("root's key")
        (home / ".ssh" / "id_ed25519").chmod(0o644)  # readable by anyone who can reach it
        probe = (
            "import os, koinon_home_probe\n"
            "print(koinon_home_probe.ANSWER, sorted(os.listdir({home!r})), os.path.exists({key!r}))\n"
        ).format(home=str(home), key=str(home / ".ssh" / "id_ed25519"))
        create_netns(netns)
        completed = subprocess.run(
            ["ip", "netns", "exec", netns, *SANDBOX, "--", sys.executable, "-c", probe],
            capture_output=True, text=True, timeout=60, env=pythonpath(str(home / "checkout" / "lib")),
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.split(maxsplit=1) == ["42", "['checkout'] False\n"], completed.stdout
    finally:
        delete_netns(netns)
        subprocess.run(["rm", "-rf", str(home)], check=False)
