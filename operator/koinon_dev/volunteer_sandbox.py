"""Gives a volunteer a machine of its own, as far as it can tell: its own /tmp and its own processes.

A network namespace cuts a volunteer off from the head's TCP ports, but two things still cross it
when everything runs on one host:

* Unix sockets: a socket path is reachable from every network namespace. The head's raylet,
  plasma store and dashboard modules listen on sockets under its temp dir, and the dashboard's
  module sockets take requests without Ray's token, so a volunteer that can see those paths can
  submit a job to the head without the tunnel. It could also read other volunteers' credentials.
* Processes: a Ray driver finds "its" raylet by scanning the host's processes and prefers the
  head's, so a job's driver on a volunteer attached itself to the head's raylet socket.

Run inside ``ip netns exec``, this first enters a mount namespace of its own whose mounts are
private to it (nothing propagates out, and host mounts made later do not propagate in). It then
replaces ``/dev`` with a small tmpfs holding only null, zero, full, random, urandom, tty, a devpts
of its own and an empty ``/dev/shm`` (where Ray keeps object store files); replaces ``/tmp`` with
an empty tmpfs holding only the paths passed with ``--expose`` (bind-mounted at the same place:
the volunteer's own state and Ray directories, made the volunteer's user's) and ``--expose-ro``
(the same, read-only: the gateway's socket directory and the CA, which every volunteer uses and
none may replace); puts empty tmpfs over ``/run`` (the host's services' sockets) and each
``--hide`` directory (the control plane's state dir); makes every other mount, ``/sys`` included,
read-only; and runs the command in ``/``, in new PID and IPC namespaces with its own /proc
(``/proc/sys``, ``/proc/sysrq-trigger`` and the like read-only), as an unprivileged user
(``VOLUNTEER_UID``: nobody) without any capability (see drop_privileges).

    python -m koinon_dev.volunteer_sandbox --expose PATH... --expose-ro PATH... --hide DIR... -- COMMAND...

What running the project takes stays visible, read-only, when it lies under /tmp (a checkout
or CI clone there): the Python environment, the project's package directories and PYTHONPATH.
Where it lies below a directory nobody cannot enter (a Python that pyenv installed in /root, a
checkout in a 0750 home), that directory is covered as /tmp is, holding only those paths: the
rest of it (root's home) stays out of sight. The command starts in ``/``, not in the caller's
directory (a checkout under /tmp holding the control plane's state in .koinon/dev): paths in it
must be absolute (the program's path and PYTHONPATH are made so).

Expose a socket's directory rather than the socket: a bind mount holds on to the file it was
made from, and a restarted server makes a new one. The volunteer's user must be able to connect
to it and read the CA (the dev plane makes both so).

Processes: this process stays outside and passes signals on; the first process inside (the PID
namespace's init) reaps orphans, passes signals on to the command and exits with it, and the
kernel then kills whatever is left inside (Ray's helpers with it). The init dies with this
process, so SIGKILL here still kills the volunteer, as it would kill a plain agent.

``--processes-only`` (for a volunteer that runs as a plain process, without a network namespace:
not root, or ``--no-netns``) keeps only the second part: its own PID and IPC namespaces and
``/proc``, in a mount namespace of its own (made through a user namespace mapping the caller's uid
and gid to themselves when not root: no privilege beyond the caller's, and none left once the
command is exec'd), with /tmp, /dev, the user and the working directory as they were. Ray's
driver then finds only its own volunteer's raylet, as a volunteer on a machine of its own would.
``processes_of_their_own()`` says whether this works here (unprivileged user namespaces can be
turned off).

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
import pwd
import select
import signal
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from koinon_agent import mountinfo

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
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
# Where the new /dev and then the new /tmp are built before they are moved into place: a mount
# point that always exists, and is the sandbox's own /dev/shm once /dev is replaced.
STAGE = Path("/dev/shm")
DEV = Path("/dev")
# What of the host's /dev a volunteer keeps, as Docker gives a container: the host's devtmpfs
# holds its disks (and uid 0 could create files there), none of which a volunteer needs.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}  # fmt: skip
# Host-wide kernel state in the sandbox's own /proc, bind-mounted read-only over it (Docker's
# list): sysctls (a core_pattern of "|/a/script" would run the script as full root on the host),
# the SysRq trigger, IRQ affinities, bus and filesystem settings.
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
# Who the command runs as: nobody/nogroup. Not root, even without capabilities: uid 0 still
# passes owner permission checks on root's files, and the host's sysctls, sysfs and devices are
# root's. Every volunteer of the host runs as this user; each sees only its own files and
# processes (its own /tmp, PID and IPC namespaces).
VOLUNTEER_UID = 65534
VOLUNTEER_GID = 65534
# The command's HOME: root's is unreadable to the volunteer's user; the sandbox's /tmp is its own.
VOLUNTEER_HOME = "/tmp"
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
    PYTHONPATH entries reached through a symlink under ``under`` (/tmp, or a directory covered as
    out of reach; a .venv that is a link, say): the sandbox recreates the link, so that path works
    there too. A second bind mount instead would
    be a second name for the directory that ``--hide`` does not cover."""
    named = [Path(sys.prefix), *(Path(e) for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e)]
    aliases = {}
    for path in named:
        given = path.absolute()
        if given.is_relative_to(under) and given.is_dir() and given != given.resolve():
            aliases[given] = given.resolve()
    return sorted(aliases.items(), key=lambda item: len(item[0].parts))


def software_out_of_reach() -> dict[Path, list[Path]]:
    """What running the project takes (software_paths) outside /tmp, below a directory the
    volunteer's user cannot enter, by that directory (the highest such): the Python that pyenv
    installed in /root, a checkout in a 0750 home. The sandbox covers that directory as it covers
    /tmp, keeping only these paths (read-only): the rest of it stays out of reach."""
    found: dict[Path, list[Path]] = {}
    for path in software_paths(under=Path("/")):
        if path.is_relative_to(COVERED):
            continue
        for ancestor in reversed(path.parents):  # / first
            if not _enterable(ancestor):
                found.setdefault(ancestor, []).append(path)  # parents first, as software_paths gives them
                break
    return found


def _enterable(directory: Path) -> bool:
    """Whether the volunteer's user may pass through ``directory``, by its mode bits."""
    info = directory.stat()
    if info.st_uid == VOLUNTEER_UID:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == VOLUNTEER_GID:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def isolate(
    expose: list[Path],
    hide: list[Path],
    read_only: Sequence[Path] = (),
    aliases: Sequence[tuple[Path, Path]] = (),
    out_of_reach: Mapping[Path, Sequence[Path]] | None = None,
) -> None:
    """Gives this process a mount namespace of its own and builds the volunteer's view there:
    its own /dev (own_dev), /tmp holding only ``expose`` and ``read_only`` (cover), each
    ``out_of_reach`` directory holding only the software below it, empty /run and ``hide``
    directories, everything else read-only (read_only_elsewhere). ``read_only`` paths cannot be
    written (the volunteer runs the project's code, it must not change what the head runs);
    ``expose`` paths become the volunteer's user's."""
    for path in [*expose, *read_only]:
        if path == COVERED or not path.is_relative_to(COVERED) or not path.exists():
            raise SystemExit(f"volunteer sandbox: --expose {path}: must exist under {COVERED}")
    # A mount namespace of its own, whatever started this (`ip netns exec` makes one, a plain
    # shell would not: every mount below would then change the host's), its mounts private to
    # it: `ip netns exec` leaves them slaves of the host's, so a filesystem the host mounts later
    # (a USB drive, a container's rootfs) would appear here, writable, after read_only_elsewhere.
    _libc_call("unshare", CLONE_NEWNS)
    _mount("--make-rprivate", "/")
    own_dev()
    for path in expose:
        give_to_volunteer(path)
    # No size of its own: /tmp on a volunteer's machine holds what a job writes there (Python's
    # tempfile, downloads), and tmpfs takes memory only for what is written (at most half of it).
    cover(COVERED, "1777", [*((p, False) for p in read_only), *((p, True) for p in expose)], aliases)
    for directory, paths in (out_of_reach or {}).items():
        cover(directory, "755", [(p, False) for p in paths], software_aliases(under=directory))
    visible = [*expose, *read_only]
    for directory in [*HOST_SOCKET_DIRS, *hide]:
        if directory.is_relative_to(COVERED) and not any(directory.is_relative_to(path) for path in visible):
            continue  # gone with the rest of /tmp
        if not directory.is_dir():
            continue  # gone with the rest of a directory covered above, or not there at all
        _mount("-t", "tmpfs", "-o", "mode=1777", "koinon-hidden", str(directory))
    read_only_elsewhere()


def cover(
    directory: Path, mode: str, kept: Sequence[tuple[Path, bool]], aliases: Sequence[tuple[Path, Path]] = ()
) -> None:
    """Replaces ``directory`` with a tmpfs holding only the ``kept`` paths below it (bind-mounted
    at the same place, writable or not; parents first) and ``aliases`` (symlinks). Built on a
    staging tmpfs, then moved over ``directory`` in one step (a path kept is bind-mounted while
    the original is still visible). The staging mount point is /dev/shm, the sandbox's own (see
    own_dev) and empty again afterwards."""
    # The directories made here lead to what is kept: the volunteer's user must pass through
    # them, whatever the caller's umask.
    umask = os.umask(0o022)
    try:
        _mount("-t", "tmpfs", "-o", f"mode={mode}", "koinon-sandbox", str(STAGE))
        for path, writable in kept:
            inside = STAGE / path.relative_to(directory)
            if not inside.exists():  # else inside one kept already (a venv inside the checkout)
                inside.parent.mkdir(parents=True, exist_ok=True)
                if path.is_dir():
                    inside.mkdir()
                else:
                    inside.touch()
            _mount("--bind", str(path), str(inside))
            if not writable:
                _mount("-o", "remount,bind,ro", str(inside))
        for alias, target in aliases:
            inside = STAGE / alias.relative_to(directory)
            if inside.exists() or inside.is_symlink():
                continue  # within something kept already: the link came with it
            inside.parent.mkdir(parents=True, exist_ok=True)
            inside.symlink_to(target)  # resolves, inside the sandbox, to what is kept (or hidden) there
    finally:
        os.umask(umask)
    _mount("--rbind", str(STAGE), str(directory))
    if subprocess.run(["umount", "--lazy", str(STAGE)], capture_output=True).returncode != 0:
        raise SystemExit(f"volunteer sandbox: could not unmount the staging tmpfs at {STAGE}")


def own_dev() -> None:
    """Replaces /dev with a tmpfs holding only harmless devices (bind-mounted from the host's),
    a devpts instance of its own and an empty /dev/shm (Ray's object store files). The host's
    /dev is a devtmpfs: root-owned files could be created there (or /dev/null removed), and its
    disks hold every file the sandbox hides."""
    _mount("-t", "tmpfs", "-o", "mode=755,nosuid,noexec", "koinon-dev", str(STAGE))
    for name in DEVICES:
        if (DEV / name).exists():
            (STAGE / name).touch()
            _mount("--bind", str(DEV / name), str(STAGE / name))
    (STAGE / "shm").mkdir()
    _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "koinon-shm", str(STAGE / "shm"))
    (STAGE / "pts").mkdir()
    _mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec", "devpts",
           str(STAGE / "pts"))  # fmt: skip
    for name, target in DEV_LINKS.items():
        (STAGE / name).symlink_to(target)
    _mount("--move", str(STAGE), str(DEV))


def give_to_volunteer(path: Path) -> None:
    """Makes ``path`` (an ``--expose``d directory or file) and all in it the volunteer's user's:
    the command writes there, and it is not root. What a previous run left stays usable. Walked
    without following symlinks (os.fwalk, by directory descriptor): a link the volunteer left in
    its own directory must not hand it a file of the host."""
    os.chown(path, VOLUNTEER_UID, VOLUNTEER_GID, follow_symlinks=False)
    if path.is_symlink() or not path.is_dir():
        return
    for _directory, dirs, files, directory_fd in os.fwalk(path, follow_symlinks=False):
        for name in [*dirs, *files]:
            os.chown(name, VOLUNTEER_UID, VOLUNTEER_GID, dir_fd=directory_fd, follow_symlinks=False)


def read_only_elsewhere() -> None:
    """Makes every mount outside the sandbox's own trees read-only, in this mount namespace only.

    The volunteer runs as nobody, but whatever a mount lets it write (files of nobody's, or
    world-writable, on the host) it must not change. What it may write is under /tmp (its own
    directories), /dev (the sandbox's own: see own_dev), /run (an empty tmpfs) and /proc (the PID
    namespace's own; what of it is host-wide is made read-only in _mount_proc). /sys is the host's
    (or its network namespace's) and read-only here: uid 0 could rewrite kernel settings there.
    """
    writable_trees = (COVERED, DEV, Path("/proc"), *HOST_SOCKET_DIRS)
    ids_at: dict[Path, set[int]] = {}
    for line in mountinfo.MOUNTINFO.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        ids_at.setdefault(Path(mountinfo.unescape(fields[4])), set()).add(int(fields[0]))
    for mount_point, ids in ids_at.items():  # in mount order, each once
        if any(mount_point.is_relative_to(tree) for tree in writable_trees):
            continue
        if _mount_id_at(mount_point) not in ids:
            continue  # covered by a later mount: out of reach already
        _mount("-o", "remount,bind,ro", str(mount_point))


def _mount_id_at(path: Path) -> int | None:
    """The id of the mount ``path`` leads to (None when it leads nowhere now). Not
    os.path.ismount: that compares devices, and misses a bind mount within one filesystem, which
    then stayed writable."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    except OSError:
        return None  # gone: a later mount covers a directory above it
    try:
        fdinfo = Path(f"/proc/self/fdinfo/{fd}").read_text()
    finally:
        os.close(fd)
    return next((int(line.split()[1]) for line in fdinfo.splitlines() if line.startswith("mnt_id:")), None)


def _mount_proc() -> None:
    """The PID namespace's own /proc (run by its init), with what in it is host-wide read-only."""
    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", "/proc")  # the new namespace's processes only
    for name in PROC_READ_ONLY:
        path = Path("/proc") / name
        if path.exists():
            _mount("--bind", str(path), str(path))
            _mount("-o", "remount,bind,ro", str(path))


def _libc_call(name: str, *args: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise SystemExit(f"volunteer sandbox: {name} failed: {os.strerror(errno)}")


def _sys_mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    """mount(2) itself: mount(8) refuses a caller whose uid is not 0, as in a user namespace that
    maps the caller's own uid (it has the capability there, not the uid)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fs = fstype.encode() if fstype is not None else None
    if libc.mount(source.encode(), target.encode(), fs, ctypes.c_ulong(flags), None) != 0:
        raise SystemExit(f"volunteer sandbox: mounting {target} failed: {os.strerror(ctypes.get_errno())}")


def own_mount_namespace() -> None:
    """A mount namespace of its own, its mounts private to it (the /proc mounted later must not
    reach the host's). Without root, through a user namespace in which the caller's uid and gid
    map to themselves: the process has capabilities over that namespace only, and the command
    exec'd later, not uid 0 there, keeps none."""
    if os.geteuid() == 0:
        _libc_call("unshare", CLONE_NEWNS)
    else:
        uid, gid = os.geteuid(), os.getegid()
        _libc_call("unshare", CLONE_NEWUSER | CLONE_NEWNS)
        Path("/proc/self/setgroups").write_text("deny")  # required before an unprivileged gid_map
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1\n")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1\n")
    _sys_mount("none", "/", None, MS_REC | MS_PRIVATE)


def processes_of_their_own() -> str:
    """ "" when ``--processes-only`` works here, else why not (a kernel or AppArmor policy that
    denies unprivileged user namespaces, a container whose /proc is partly masked)."""
    completed = subprocess.run(
        [sys.executable, "-m", "koinon_dev.volunteer_sandbox", "--processes-only", "--", sys.executable, "-c", ""],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "" if completed.returncode == 0 else (completed.stderr.strip().splitlines() or ["failed"])[-1]


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
    """ "" when this Python and ``module`` load in the sandbox (as nobody, without capabilities,
    from /, with what it keeps visible), else why not: a checkout in a 0750 home whose files are
    not readable by others. Runs the sandbox itself (root only: it makes a mount namespace of its
    own, and changes nothing outside it)."""
    completed = subprocess.run(
        [sys.executable, "-m", "koinon_dev.volunteer_sandbox", "--", sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return "" if completed.returncode == 0 else (completed.stderr.strip().splitlines() or ["failed"])[-1]


def absolute_pythonpath() -> dict[str, str]:
    """PYTHONPATH (when set) with its relative entries made absolute: the command starts in /, and
    they name directories relative to the caller's working directory."""
    entries = os.environ.get("PYTHONPATH")
    if entries is None:
        return {}
    return {"PYTHONPATH": os.pathsep.join(os.path.abspath(e) if e else e for e in entries.split(os.pathsep))}


def drop_privileges(uid: int = VOLUNTEER_UID, gid: int = VOLUNTEER_GID) -> None:
    """Leaves this process, and all it will run, as ``uid``/``gid`` (no supplementary groups),
    without any capability and unable to gain one.

    The sandbox needs root to build its mounts and namespaces; the volunteer must not keep it: with
    CAP_SYS_ADMIN a job could unmount the covering /tmp or /proc and see the host's (the head's
    sockets, other volunteers' credentials) or setns() into the host's network; with
    CAP_SYS_PTRACE read the agent's token from its memory. Nor may it stay uid 0 without
    capabilities: owner permission checks still pass for root's files, and the kernel's settings
    (/proc/sys: a core_pattern of "|/path" runs that program as full root on the host), sysfs
    and the host's devices are root's.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last_cap + 1):  # while CAP_SETPCAP is still there
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise SystemExit(f"volunteer sandbox: dropping capability {cap} failed: {os.strerror(ctypes.get_errno())}")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL on kernels without ambient sets
    # Groups first, while CAP_SETGID is there; leaving uid 0 for good then clears the permitted
    # and effective sets (no SECBIT_KEEP_CAPS here); capset below clears the inheritable one too.
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    no_capabilities = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable; two 32-bit words
    if libc.capset(header, no_capabilities) != 0:
        raise SystemExit(f"volunteer sandbox: capset failed: {os.strerror(ctypes.get_errno())}")
    _libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid or file capabilities either


def _exec_command(command: list[str], confined: bool = True) -> None:
    """Becomes the command, without privileges (drop_privileges) when ``confined``, with the signal
    state a shell would give it: Python ignores SIGPIPE and SIGXFSZ, an ignored signal stays
    ignored across exec, and so does a blocked one."""
    if confined:
        drop_privileges()
        # root's HOME is not the volunteer's user's to read or write; USER and LOGNAME say who it is.
        os.environ.update(HOME=VOLUNTEER_HOME, USER=_user_name(), LOGNAME=_user_name())
    for signum in (signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED_SIGNALS):
        # The forwarded ones carry this process tree's handlers by now: back to what the caller
        # gave (ignored under nohup, say), the rest to their default.
        ignored = signum in _IGNORED_BY_CALLER
        signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    os.execvp(command[0], command)


def _user_name() -> str:
    try:
        return pwd.getpwuid(VOLUNTEER_UID).pw_name
    except KeyError:
        return str(VOLUNTEER_UID)


def _run_init(command: list[str], outside_alive: int, confined: bool = True) -> None:
    """PID 1 of the new namespace: starts the command, reaps every orphan, exits with the command.

    ``outside_alive`` is the read end of a pipe whose write end only the outside process holds:
    it reads as EOF once that process is gone (its pid means nothing in here; getppid() is 0).
    """
    _libc_call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([outside_alive], [], [], 0)[0]:
        os._exit(1)  # the outside process died before the line above took effect
    os.close(outside_alive)
    try:
        if confined:
            _mount_proc()
        else:  # the new namespace's processes only; mount(2): mount(8) wants uid 0 (_sys_mount)
            _sys_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        os.setsid()  # out of the outside process's group: group signals reach the command via it only
        sys.stdout.flush()
        child = os.fork()
        if child == 0:
            _exec_command(command, confined)
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
    parser.add_argument("--processes-only", action="store_true", help="only its own PID and IPC namespaces and /proc")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    # Before any handler of ours replaces them: what the caller ignores, the command ignores too.
    _IGNORED_BY_CALLER.update(s for s in FORWARDED_SIGNALS if signal.getsignal(s) == signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)  # until the handlers are in place
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    confined = not args.processes_only
    if confined:
        read_only = [*software_paths(), *(p.resolve() for p in args.expose_ro)]
        isolate(
            [p.resolve() for p in args.expose],
            [p.resolve() for p in args.hide],
            read_only,
            software_aliases(),
            software_out_of_reach(),
        )
        # Out of the caller's working directory before anything runs inside: mounting over /tmp
        # does not move it, so a volunteer started from a checkout under /tmp would still reach the
        # hidden state dir there (.koinon/dev) through its cwd or /proc/<pid>/cwd. What was relative
        # to it (the program's path, PYTHONPATH) is made absolute first.
        if os.sep in command[0]:
            command[0] = os.path.abspath(command[0])
        os.environ.update(absolute_pythonpath())
        os.chdir("/")
    else:
        own_mount_namespace()
    # PID: for the children (the next one forked is PID 1 there). IPC: System V objects and POSIX
    # message queues are per IPC namespace, not per network or mount namespace: the host's (and
    # other volunteers') would be reachable, and volunteers share a uid.
    _libc_call("unshare", CLONE_NEWPID | CLONE_NEWIPC)
    outside_alive, held_outside = os.pipe()
    sys.stdout.flush()
    init = os.fork()
    if init == 0:
        os.close(held_outside)
        _run_init(command, outside_alive, confined)
    os.close(outside_alive)
    _forward_signals_to(init)
    while True:
        pid, status = os.wait()
        if pid == init:
            sys.exit(_exit_code(status))


if __name__ == "__main__":
    main()
