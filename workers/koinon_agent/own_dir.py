"""The agent's scratch dirs where job code can write: Ray's temp dir and the health report's dir.

The chart puts both in the pod's /tmp, an emptyDir that outlives container restarts, and Ray's job
code runs as the agent's user with full access there. Whatever it leaves at such a path (a file, a
symlink, a dir the agent cannot read) must not keep the agent from using it for good: every
restarted container would meet it again. So the agent opens the dir itself, never through a
symlink, and replaces anything else found there before it uses the dir.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Job code that replaces the dir again and again between the agent's steps delays its use (the
# caller retries later); a one-off plant is gone after the first round.
_ATTEMPTS = 5

# What the agent needs of its own dir: list, create and remove entries in it.
_OWNER_RWX = stat.S_IRWXU


def open_own_dir(path: Path, mode: int) -> int:
    """A descriptor of ``path``, a real directory (opened without following a symlink at it),
    created with ``mode`` if missing; see open_own_dir_at. The dirs above it are the operator's
    (``/tmp``, ``$HOME``): created if missing, followed as they are."""
    # Not abspath: it drops "a/.." by name, where the kernel (and Ray, given the same path) goes
    # through a symlink at "a" first; the dir opened here must be the one the path names to them.
    path = Path(path).absolute()
    if path == path.parent or path.name == "..":
        # "/", or "a/..": no name of its own in a parent to check; the operator's, as it is.
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    os.makedirs(path.parent, exist_ok=True)
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_own_dir_at(parent_fd, path.name, mode, path)
    finally:
        os.close(parent_fd)


def open_own_dir_at(parent_fd: int, name: str, mode: int, shown: Path) -> int:
    """A descriptor of the directory ``name`` in the dir ``parent_fd`` (``shown``: its path, for
    logs and errors), made usable to the agent whatever job code of its user left there.

    Every step is relative to ``parent_fd`` and none follows a symlink at ``name``: a symlink
    (to the state dir, say) is removed, never written, chmodded or emptied through. A file, symlink,
    FIFO or socket there is removed, a directory the agent cannot open is moved aside (renamed
    next to it: it may hold what someone wants back), and a directory of the agent's user that
    lost the owner's rwx gets it back (fchmod on the opened dir). Only what belongs to the agent's
    user is removed or moved: job code, which runs as that user, cannot have made anything else;
    a directory of another user is used as it is, even one the agent may write in but not list
    (root's drop box, mode 1733): its descriptor is then an O_PATH one, which serves as the
    ``dir_fd`` of every ``*at`` call (the dir's own permissions are checked by each) but cannot be
    read or fchmodded. OSError when it cannot be made usable, or when it is replaced again on
    every attempt.
    """
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except FileNotFoundError:
            # Made meanwhile (FileExistsError): checked on the next round like anything found there.
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, mode, dir_fd=parent_fd)
            continue
        except OSError as exc:
            # ELOOP: a symlink (O_NOFOLLOW); ENOTDIR: a file, FIFO, socket, device; EACCES: a dir
            # without the read bit, which the agent cannot list (an agent run as root never sees it).
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EACCES):
                raise
            if exc.errno == errno.EACCES:
                fd = _open_others_dir(parent_fd, name)
                if fd >= 0:
                    return fd
            _move_away(parent_fd, name, shown)
            continue
        try:
            info = os.fstat(fd)
            if info.st_uid == os.geteuid() and info.st_mode & _OWNER_RWX != _OWNER_RWX:
                # The fd is the dir itself, opened without following a symlink: nothing else is changed.
                os.fchmod(fd, stat.S_IMODE(info.st_mode) | _OWNER_RWX)
                log.warning("%s had lost its owner's access; restored it", shown)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise OSError(errno.EAGAIN, "replaced by something else again and again; trying again later", str(shown))


def _open_others_dir(parent_fd: int, name: str) -> int:
    """An O_PATH descriptor of ``name`` when it is a directory of another user (the operator's,
    which job code cannot have made), opened without following a symlink; -1 for anything else
    (gone or replaced meanwhile too: the caller's next round looks again)."""
    try:
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except OSError:
        return -1
    info = os.fstat(fd)
    # S_ISDIR as well: O_PATH with O_NOFOLLOW would open a symlink itself where O_DIRECTORY let it.
    if stat.S_ISDIR(info.st_mode) and info.st_uid != os.geteuid():
        return fd
    os.close(fd)  # the agent's own (job code's doing: moved aside by the caller), or not a dir
    return -1


def _move_away(parent_fd: int, name: str, shown: Path) -> None:
    """Removes what is at ``name`` (a directory: renamed next to it), without following a symlink."""
    try:
        info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return  # gone meanwhile
    if info.st_uid != os.geteuid():
        # Not job code's (it runs as the agent's user): the operator's or another user's, which the
        # agent leaves alone.
        raise OSError(
            errno.EEXIST,
            f"{_kind(info.st_mode)} of uid {info.st_uid} is there, not a directory the agent can use: "
            "remove it or choose another path",
            str(shown),
        )
    if stat.S_ISDIR(info.st_mode):
        aside = f"{name}.moved-{time.time_ns()}"
        os.rename(name, aside, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        log.warning("%s was a directory the agent cannot use; moved it aside to %s", shown, shown.with_name(aside))
        return
    try:
        # unlink(2) removes the name itself: a symlink goes, what it points to stays untouched.
        os.unlink(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    except IsADirectoryError:
        return  # replaced by a directory meanwhile: the next round looks at it
    log.warning("%s was %s, not a directory; removed it", shown, _kind(info.st_mode))


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISREG(mode):
        return "a file"
    return "a special file"
