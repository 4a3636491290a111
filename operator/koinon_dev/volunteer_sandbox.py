"""Gives a volunteer a machine of its own, as far as it can tell: its own /tmp and its own processes.

A network namespace cuts a volunteer off from the head's TCP ports, but two things still cross it
when everything runs on one host:

* Unix sockets: a socket path is reachable from every network namespace. The head's raylet,
  plasma store and dashboard modules listen on sockets under its temp dir, and the dashboard's
  module sockets take requests without Ray's token, so a volunteer that can see those paths can
  submit a job to the head without the tunnel. It could also read other volunteers' credentials.
* Processes: a Ray driver finds "its" raylet by scanning the host's processes and prefers the
  head's, so a job's driver on a volunteer attached itself to the head's raylet socket.

Run inside ``ip netns exec`` (which already gives the process its own mount namespace, with the
host's mounts propagating in but none going back out), this replaces ``/tmp`` with an empty
tmpfs holding only the paths passed with ``--expose`` (bind-mounted at the same place: the
volunteer's own state and Ray directories) and ``--expose-ro`` (the same, read-only: the gateway's
socket directory and the CA, which every volunteer uses and none may replace), puts empty tmpfs
over ``/dev/shm`` (where Ray keeps object store files), ``/run`` (the host's services' sockets) and
each ``--hide`` directory (the control plane's state dir), and runs the command in a new PID
namespace with its own /proc, without any capability (see drop_privileges).

    python -m koinon_dev.volunteer_sandbox --expose PATH... --expose-ro PATH... --hide DIR... -- COMMAND...

What running the project takes stays visible, read-only, when it lies under /tmp (a checkout
or CI clone there): the Python environment, the project's package directories and PYTHONPATH.

Expose a socket's directory rather than the socket: a bind mount holds on to the file it was
made from, and a restarted server makes a new one.

Processes: this process stays outside and passes signals on; the first process inside (the PID
namespace's init) reaps orphans, passes signals on to the command and exits with it, and the
kernel then kills whatever is left inside (Ray's helpers with it). The init dies with this
process, so SIGKILL here still kills the volunteer, as it would kill a plain agent.

Each signal reaches the command once: the init starts a session of its own, so a signal sent to
this process's group (a supervisor's killpg, Ctrl-C at a terminal) reaches only this process, which
passes it on (the agent reads a second SIGTERM as "stop now"). Signals stay blocked from the start
until each process has its handler in place, so one sent during start-up is delivered late, not
lost (PID 1 of a namespace drops signals it has no handler for).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import importlib.util
import os
import select
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from koinon_agent import mountinfo

CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# Forwarded signals the caller had ignored (main() notes them before installing its handlers).
_IGNORED_BY_CALLER: set[int] = set()
COVERED = Path("/tmp")
STAGE = Path("/dev/shm")
# Where the host's services keep their unix sockets (a database's, a container engine's, D-Bus):
# covered too, as socket paths cross network namespaces. /var/run is a link to /run.
HOST_SOCKET_DIRS = (Path("/run"),)


def _mount(*args: str) -> None:
    completed = subprocess.run(["mount", *args], capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"volunteer sandbox: mount {' '.join(args)} failed: {completed.stderr.strip()}")


def software_paths(under: Path = COVERED) -> list[Path]:
    """What running anything of the project takes, where it lies under /tmp (a checkout or a CI
    clone there): the Python environment, this project's package directories (an editable install
    imports them from the checkout) and the directories on PYTHONPATH. Parents come first."""
    paths = {Path(sys.prefix), Path(sys.base_prefix)}
    paths.update(Path(entry) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry)
    # This package's own name: __name__ is "__main__" when run with -m.
    distributions_of = importlib.metadata.packages_distributions()  # scans every installed one
    ours = set(distributions_of.get(Path(__file__).parent.name, []))
    for name, distributions in distributions_of.items():
        if ours & set(distributions):
            spec = importlib.util.find_spec(name)
            locations = (spec.submodule_search_locations or []) if spec is not None else []
            paths.update(Path(location) for location in locations)
    found = {path.resolve() for path in paths if path.is_dir()}
    return sorted((path for path in found if path.is_relative_to(under)), key=lambda path: len(path.parts))


def software_aliases(under: Path = COVERED) -> list[tuple[Path, Path]]:
    """(the path as the command line names it, where it leads) for the Python environment and
    PYTHONPATH entries reached through a symlink under /tmp (a .venv that is a link, say): the
    sandbox recreates the link, so that path works there too. A second bind mount instead would
    be a second name for the directory that ``--hide`` does not cover."""
    named = [Path(sys.prefix), *(Path(e) for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e)]
    aliases = {}
    for path in named:
        given = path.absolute()
        if given.is_relative_to(under) and given.is_dir() and given != given.resolve():
            aliases[given] = given.resolve()
    return sorted(aliases.items(), key=lambda item: len(item[0].parts))


def isolate(
    expose: list[Path],
    hide: list[Path],
    read_only: Sequence[Path] = (),
    aliases: Sequence[tuple[Path, Path]] = (),
) -> None:
    """Builds the view on a staging tmpfs, then moves it over /tmp in one step (a path exposed is
    bind-mounted while the original is still visible). The staging mount point is /dev/shm, which
    always exists and is covered afterwards anyway, so nothing is left on the host. ``read_only``
    paths are exposed too, but cannot be written (the volunteer runs the project's code, it must
    not change what the head runs)."""
    for path in [*expose, *read_only]:
        if not path.is_relative_to(COVERED) or not path.exists():
            raise SystemExit(f"volunteer sandbox: --expose {path}: must exist under {COVERED}")
    # No size of its own: /tmp on a volunteer's machine holds what a job writes there (Python's
    # tempfile, downloads), and tmpfs takes memory only for what is written (at most half of it).
    _mount("-t", "tmpfs", "-o", "mode=1777", "koinon-sandbox", str(STAGE))
    for path, writable in [*((p, False) for p in read_only), *((p, True) for p in expose)]:
        inside = STAGE / path.relative_to(COVERED)
        if not inside.exists():  # else inside one exposed already (a venv inside the checkout)
            inside.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                inside.mkdir()
            else:
                inside.touch()
        _mount("--bind", str(path), str(inside))
        if not writable:
            _mount("-o", "remount,bind,ro", str(inside))
    for alias, target in aliases:
        inside = STAGE / alias.relative_to(COVERED)
        if inside.exists() or inside.is_symlink():
            continue  # within something exposed already: the link came with it
        inside.parent.mkdir(parents=True, exist_ok=True)
        inside.symlink_to(target)  # resolves, inside the sandbox, to what is exposed (or hidden) there
    _mount("--rbind", str(STAGE), str(COVERED))
    if subprocess.run(["umount", "--lazy", str(STAGE)], capture_output=True).returncode != 0:
        raise SystemExit(f"volunteer sandbox: could not unmount the staging tmpfs at {STAGE}")
    visible = [*expose, *read_only]
    for directory in [STAGE, *HOST_SOCKET_DIRS, *hide]:
        if (
            directory != STAGE
            and directory.is_relative_to(COVERED)
            and not any(directory.is_relative_to(path) for path in visible)
        ):
            continue  # gone with the rest of /tmp
        if not directory.is_dir():
            continue
        _mount("-t", "tmpfs", "-o", "mode=1777", "koinon-hidden", str(directory))
    read_only_elsewhere()


def read_only_elsewhere() -> None:
    """Makes every mount outside the sandbox's own trees read-only, in this mount namespace only.

    The volunteer keeps uid 0 (the files it runs are root's), and owner permissions still apply
    without capabilities: it could otherwise rewrite root-owned files of the host (/etc, the
    project's environment the head runs from). What it may write is under /tmp (its own
    directories), /dev/shm and, with no host files in them, /dev, /proc, /sys and /run.
    """
    writable_trees = (COVERED, Path("/dev"), Path("/proc"), Path("/sys"), *HOST_SOCKET_DIRS)
    mount_points = [Path(mount_point) for _, mount_point in mountinfo.mounts()]
    for mount_point in dict.fromkeys(mount_points):  # in mount order, each once
        if any(mount_point.is_relative_to(tree) for tree in writable_trees):
            continue
        if not os.path.ismount(mount_point):
            continue  # covered by a later mount: out of reach already
        _mount("-o", "remount,bind,ro", str(mount_point))


def _libc_call(name: str, *args: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise SystemExit(f"volunteer sandbox: {name} failed: {os.strerror(errno)}")


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


def _forward_signals_to(pid: int) -> None:
    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)  # held back until now


def runs_without_privileges(module: str = "koinon_agent.cli") -> str:
    """ "" when this Python and ``module`` load without capabilities (as the volunteer will run),
    else why not: a checkout in a home directory that is 0750 and not root's cannot be read."""
    completed = subprocess.run(
        [sys.executable, "-c", f"import {module}"], preexec_fn=drop_privileges, capture_output=True, text=True
    )
    return "" if completed.returncode == 0 else (completed.stderr.strip().splitlines() or ["failed"])[-1]


def drop_privileges() -> None:
    """Leaves this process, and all it will run, without any capability and unable to gain one.

    The sandbox needs root to build its mounts and namespaces; the volunteer must not keep it: with
    CAP_SYS_ADMIN a job could unmount the covering /tmp or /proc and see the host's (the head's
    sockets, other volunteers' credentials) or setns() into the host's network; with
    CAP_SYS_PTRACE read the agent's token from its memory. The uid stays 0 (files here are root's),
    but root without capabilities is an ordinary user: after exec it gets only what its bounding
    and inheritable sets allow, and both are empty.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last_cap + 1):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise SystemExit(f"volunteer sandbox: dropping capability {cap} failed: {os.strerror(ctypes.get_errno())}")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL on kernels without ambient sets
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    no_capabilities = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable; two 32-bit words
    if libc.capset(header, no_capabilities) != 0:
        raise SystemExit(f"volunteer sandbox: capset failed: {os.strerror(ctypes.get_errno())}")
    _libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid or file capabilities either


def _exec_command(command: list[str]) -> None:
    """Becomes the command, without privileges (drop_privileges), with the signal state a shell
    would give it: Python ignores SIGPIPE and SIGXFSZ, an ignored signal stays ignored across exec,
    and so does a blocked one."""
    drop_privileges()
    for signum in (signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED_SIGNALS):
        # The forwarded ones carry this process tree's handlers by now: back to what the caller
        # gave (ignored under nohup, say), the rest to their default.
        ignored = signum in _IGNORED_BY_CALLER
        signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    os.execvp(command[0], command)


def _run_init(command: list[str], outside_alive: int) -> None:
    """PID 1 of the new namespace: starts the command, reaps every orphan, exits with the command.

    ``outside_alive`` is the read end of a pipe whose write end only the outside process holds:
    it reads as EOF once that process is gone (its pid means nothing in here; getppid() is 0).
    """
    _libc_call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([outside_alive], [], [], 0)[0]:
        os._exit(1)  # the outside process died before the line above took effect
    os.close(outside_alive)
    try:
        _mount("-t", "proc", "proc", "/proc")  # the new namespace's processes only
        os.setsid()  # out of the outside process's group: group signals reach the command via it only
        sys.stdout.flush()
        child = os.fork()
        if child == 0:
            _exec_command(command)
        _forward_signals_to(child)
        while True:
            pid, status = os.wait()
            if pid == child:
                os._exit(_exit_code(status))
    except BaseException as exc:  # never return into the caller's code as a second copy of it
        print(f"volunteer sandbox: init failed: {exc!r}", file=sys.stderr, flush=True)
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m koinon_dev.volunteer_sandbox")
    parser.add_argument("--expose", action="append", type=Path, default=[], help="a path under /tmp to keep")
    parser.add_argument(
        "--expose-ro", action="append", type=Path, default=[], help="a path under /tmp to keep, read-only"
    )
    parser.add_argument("--hide", action="append", type=Path, default=[], help="a directory to cover")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    # Before any handler of ours replaces them: what the caller ignores, the command ignores too.
    _IGNORED_BY_CALLER.update(s for s in FORWARDED_SIGNALS if signal.getsignal(s) == signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)  # until the handlers are in place
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    read_only = [*software_paths(), *(p.resolve() for p in args.expose_ro)]
    isolate([p.resolve() for p in args.expose], [p.resolve() for p in args.hide], read_only, software_aliases())
    _libc_call("unshare", CLONE_NEWPID)  # for the children: the next one forked is PID 1 there
    outside_alive, held_outside = os.pipe()
    sys.stdout.flush()
    init = os.fork()
    if init == 0:
        os.close(held_outside)
        _run_init(command, outside_alive)
    os.close(outside_alive)
    _forward_signals_to(init)
    while True:
        pid, status = os.wait()
        if pid == init:
            sys.exit(_exit_code(status))


if __name__ == "__main__":
    main()
