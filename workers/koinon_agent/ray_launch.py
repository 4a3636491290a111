"""Starts ``ray start`` so that Ray, and the job code it runs, cannot touch the agent's state dir,
and so that Ray goes when the agent does.

Ray runs as the agent's user, and so does every job placed on this node: without this, job code
could read ``identity.json`` (the node credential) and act as this volunteer. Landlock (an
unprivileged Linux LSM; it binds root too) confines this process and everything it starts. It only
allows, so the rules grant full file access beneath every entry of every directory above the state
dir except the one leading to it, and beneath Ray's temp dir; the state dir is left with no rule.

The agent runs this file by path, with its own interpreter, between fork and ``ray start``::

    python -I ray_launch.py --parent-pid PID --protect STATE_DIR --allow-fd FD -- ray start ...

so it uses the standard library only. Where Landlock is missing it warns and starts Ray anyway.

FD is a descriptor, inherited from the agent, of Ray's temp dir as the agent checked it. The temp
dir is granted by that descriptor, never by its path: job code that outlived its Ray can replace
the path (the chart's /tmp/ray) at any moment, and a grant looked up by name could land on what
the name leads to then (the credential, through a symlink swapped in between two lookups).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import signal
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

# The Landlock syscalls have the same numbers on every architecture but alpha (x86_64, aarch64 and
# riscv64 alike: the unified table from 424 on).
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

# <linux/landlock.h>
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
LANDLOCK_SCOPE_SIGNAL = 1 << 1  # ABI 6
# The rights a rule on a non-directory may grant (others give EINVAL).
FILE_RIGHTS = FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE

# Reading and writing the credential, and also creating, removing or renaming entries in the state
# dir: a job that could plant a symlink there would have the agent write through it. Directory
# listing (READ_DIR) and exec are left alone: exec needs READ_FILE anyway, and denying listings
# of /, $HOME, ... would break ordinary programs for no gain.
ABI1_RIGHTS = (
    FS_READ_FILE
    | FS_WRITE_FILE
    | FS_REMOVE_FILE
    | FS_REMOVE_DIR
    | FS_MAKE_REG
    | FS_MAKE_DIR
    | FS_MAKE_SYM
    | FS_MAKE_SOCK
    | FS_MAKE_FIFO
    | FS_MAKE_CHAR
    | FS_MAKE_BLOCK
)


class Unconfined(Exception):
    """Confinement cannot be applied; nothing was restricted."""


class KernelCannotConfine(Unconfined):
    """This kernel offers no Landlock that can confine Ray (none, or ABI 1): Ray runs unconfined,
    with a warning. Any other failure, with Landlock there, is someone's doing: Ray is not started."""


# The launcher's exit status when it refuses to start Ray unconfined on a kernel that could confine it.
EXIT_CANNOT_CONFINE = 78  # EX_CONFIG


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # struct landlock_path_beneath_attr is __attribute__((packed))
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _call(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _syscall(number: int, *args: int | ctypes.c_void_p) -> int:
    # Every argument as a machine word: syscall(2) is variadic and reads each one as a long.
    words = [arg if isinstance(arg, ctypes.c_void_p) else ctypes.c_long(arg) for arg in args]
    return _call(_libc().syscall(ctypes.c_long(number), *words))


def _pointer(value: ctypes.Structure | ctypes.c_uint64) -> ctypes.c_void_p:
    return ctypes.c_void_p(ctypes.addressof(value))  # the caller keeps ``value`` alive


def _prctl(option: int, value: int) -> None:
    _call(_libc().prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)))


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (not Linux, kernel before 5.13,
    Landlock not among the enabled LSMs, or its syscalls filtered out by seccomp)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        return _syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.c_void_p(None), 0, LANDLOCK_CREATE_RULESET_VERSION)
    except (OSError, AttributeError):  # ENOSYS, EOPNOTSUPP, EPERM (seccomp); no syscall() in libc
        return 0


def handled_rights(abi: int) -> int:
    rights = ABI1_RIGHTS
    if abi >= 2:
        # Handled (and granted by every rule) so that renames and links across directories keep
        # working where access is granted: a ruleset without it refuses every one with EXDEV.
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE  # else truncate(2) could still empty identity.json
    return rights


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _siblings(protected: str) -> Iterator[str]:
    """Every entry of every directory above ``protected`` but the one on the way to it."""
    parts = Path(protected).parts
    for depth in range(1, len(parts)):
        directory = os.path.join(*parts[:depth])
        try:
            names = os.listdir(directory)
        except OSError:
            continue  # nothing granted in it: fails closed (job code may chmod an ancestor it owns)
        for name in names:
            if name != parts[depth]:
                yield os.path.join(directory, name)


def _opened(fd: int) -> str:
    """What ``fd`` was opened on (the kernel's path of it), not what any name leads to now."""
    return os.readlink(f"/proc/self/fd/{fd}")


def _landlock_add(ruleset: int, fd: int, rights: int) -> None:
    attr = _PathBeneathAttr(rights, fd)
    try:
        _syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, _pointer(attr), 0)
    except OSError as exc:
        if exc.errno != errno.EBADFD:  # EBADFD: a filesystem Landlock takes no rules for (nsfs, ...)
            raise


def _add_rule(ruleset: int, path: str, rights: int, protected: str) -> None:
    """Grants ``rights`` beneath ``path``, an entry beside the state dir or one of its parents,
    unless, followed through symlinks, it reaches the protected dir, one of its parents or
    something in it."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)  # one at a time: there may be thousands
    except OSError:
        return  # gone since it was listed, or a dangling symlink: nothing there to grant
    try:
        try:
            target = _opened(fd)  # checked and granted alike by this descriptor
        except OSError:
            target = os.path.realpath(path)
        if _within(protected, target) or _within(target, protected):
            return
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        _landlock_add(ruleset, fd, rights)
    finally:
        os.close(fd)


def _allow(ruleset: int, fd: int, rights: int, protected: str) -> None:
    """Grants ``rights`` beneath the directory ``fd`` (the agent's descriptor of Ray's temp dir:
    the very inode it checked, whatever its path leads to now). It may lie in the protected dir
    (the default ``<state dir>/ray``). A dir that holds the protected dir is refused, and so is
    anything but a directory: only a path swapped by job code leads to a file where a temp dir
    should be, and that file may be the credential itself."""
    info = os.fstat(fd)
    if not stat.S_ISDIR(info.st_mode):
        raise Unconfined(f"the allowed descriptor {fd} is not a directory")
    try:
        target = _opened(fd)
    except OSError as exc:
        # No /proc: nothing says where the dir lies, so nothing is granted on a guess.
        raise Unconfined(f"cannot tell where the allowed descriptor {fd} lies ({exc.strerror})") from exc
    if _within(protected, target):
        raise Unconfined(f"{target} contains the protected dir {protected}")
    _landlock_add(ruleset, fd, rights)


def confine(protected: str, allowed: Sequence[int]) -> None:
    """Restricts this process and all it will start: no file access in ``protected`` except beneath
    the ``allowed`` dirs, given as descriptors (see _allow). Raises Unconfined, with nothing
    restricted, where that cannot be done."""
    abi = landlock_abi()
    if abi == 0:
        raise KernelCannotConfine("this kernel has no Landlock (Linux 5.13 or later with Landlock among its LSMs)")
    if abi == 1:
        # Without the REFER right (ABI 2, Linux 5.19) every rename or link across directories
        # fails with EXDEV, everywhere: pip, caches and checkpoints that move files would break.
        raise KernelCannotConfine("this kernel's Landlock (ABI 1, Linux before 5.19) would break renames")
    rights = handled_rights(abi)
    protected = os.path.realpath(protected)
    try:
        # struct landlock_ruleset_attr: handled_access_fs, handled_access_net (ABI 4), scoped (ABI 6).
        # LANDLOCK_SCOPE_SIGNAL: job code cannot SIGSTOP or SIGKILL the agent (its uid is the same).
        handled = (ctypes.c_uint64 * 3)(rights, 0, LANDLOCK_SCOPE_SIGNAL) if abi >= 6 else (ctypes.c_uint64 * 1)(rights)
        ruleset = _syscall(
            SYS_LANDLOCK_CREATE_RULESET, ctypes.c_void_p(ctypes.addressof(handled)), ctypes.sizeof(handled), 0
        )
    except OSError as exc:
        raise Unconfined(f"landlock_create_ruleset: {exc.strerror}") from exc
    try:
        for path in _siblings(protected):
            _add_rule(ruleset, path, rights, protected)
        for fd in allowed:
            _allow(ruleset, fd, rights, protected)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)  # landlock_restrict_self requires it of a process without CAP_SYS_ADMIN
        _syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0)
    except OSError as exc:
        raise Unconfined(f"{exc.strerror} ({exc.filename or 'landlock'})") from exc
    finally:
        os.close(ruleset)


def launcher_command(
    parent_pid: int, command: Sequence[str], protected: Path | None = None, allowed_fd: int | None = None
) -> list[str]:
    """The command line that runs ``command`` through this launcher. ``allowed_fd``: a descriptor
    of the dir Ray and its jobs may use in ``protected`` (Ray's temp dir), which the launcher must
    inherit (``pass_fds``)."""
    options = ["--parent-pid", str(parent_pid)]
    if protected is not None:
        options += ["--protect", str(protected)]
    if allowed_fd is not None:
        options += ["--allow-fd", str(allowed_fd)]
    # -I: neither PYTHONPATH nor this file's directory (the agent's package) on sys.path.
    return [sys.executable, "-I", os.path.abspath(__file__), *options, "--", *command]


def warning(protected: str, why: object) -> str:
    return f"WARNING: Ray is not confined ({why}): job code on this node can read the node credential in {protected}"


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="ray_launch.py", usage="%(prog)s [options] -- COMMAND ...")
    parser.add_argument("--parent-pid", type=int, default=0, help="the agent: exit if it is no longer our parent")
    parser.add_argument("--protect", default="", help="the dir Ray and its jobs must not reach")
    parser.add_argument(
        "--allow-fd",
        type=int,
        action="append",
        default=[],
        help="an inherited descriptor of a dir they may use, in it or not (repeatable)",
    )
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    command = list(argv[split + 1 :])
    if not command:
        parser.error("no command after --")
    with contextlib.suppress(OSError, AttributeError):  # not Linux: Ray outlives a killed agent, as before
        # SIGTERM (which stops `ray start --block` and its raylet cleanly) when the agent dies, even
        # by SIGKILL. It survives exec; it fires when the agent's thread that started us ends.
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if args.parent_pid and os.getppid() != args.parent_pid:
        print("ray_launch.py: the agent is gone; not starting Ray", file=sys.stderr)
        return 1  # it died before the death signal was set: nothing would ever stop this Ray
    if args.protect:
        try:
            confine(args.protect, args.allow_fd)
        except KernelCannotConfine as why:
            print(warning(args.protect, why), file=sys.stderr, flush=True)
        except Unconfined as why:
            # Landlock is there: a failure is someone's doing (job code can chmod a dir above the
            # state dir, or repoint Ray's temp dir), so Ray is not started unconfined.
            print(f"ray_launch.py: not starting Ray: cannot confine it ({why})", file=sys.stderr)
            return EXIT_CANNOT_CONFINE
    for fd in args.allow_fd:
        with contextlib.suppress(OSError):
            os.close(fd)  # granted (or not) by now: Ray needs no descriptor of the agent's
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"ray_launch.py: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
