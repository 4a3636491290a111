"""The node's identity on disk, so a restarted agent reconnects instead of joining again."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from . import mountinfo

log = logging.getLogger(__name__)


class StateError(ValueError):
    """The state dir or the identity in it cannot be used; the message names the path and what to do.
    A ValueError: the CLI reports it as bad configuration (exit 2)."""


@dataclass(frozen=True)
class StoredIdentity:
    gateway: str
    node_name: str
    address: str
    credential: str
    expires_at: int = 0  # Unix seconds the gateway stops accepting the credential (0: not known)
    # What the agent trusted as the gateway's CA when it joined (agent.trust_fingerprint: a CA's
    # hash, "system" or "insecure"): its credential is shown only to a gateway trusted the same way,
    # and at another address never through the system's trust store. "": stored before trust was
    # recorded (so also by an older agent that used the system's trust store).
    trusted_ca: str = ""

    def expired(self, now: float) -> bool:
        return 0 < self.expires_at <= now


LOCK_FILE = "agent.lock"


def check_private(state_dir: Path) -> None:
    """Refuses (StateError) a state dir that someone else can change: the node credential lives
    there, and whoever can write the dir can plant names the agent then uses (agent.lock as a
    symlink, an identity.json of theirs, Ray's temp dir) or remove the agent's. Like ssh's
    StrictModes, checked on the dir itself:

    * its owner must be the agent's user or root (root can do anything anyway; Kubernetes volumes,
      emptyDir and PVCs alike, belong to root). A dir another user made first (a --state-dir under
      /tmp) is theirs to change.
    * group-writable only for a group the agent is in: its own, or a supplementary one such as the
      pod's fsGroup (the chart's PVC and emptyDir are group 10001, g+w, setgid), whose members are
      the pod's own processes.
    * writable by others (or a group the agent is not in) only where it is a mount point without
      the sticky bit: a volume, as root mounted it (Kubernetes mounts an emptyDir 0777, 2777 with
      fsGroup). Another unprivileged user cannot mount anything in the agent's mount namespace;
      a shared scratch space (/tmp, /dev/shm: sticky) is never taken.

    A dir that cannot be looked at is not refused here: ensure_writable says why before a join."""
    try:
        info = os.stat(state_dir)
    except OSError:
        return
    groups = {os.getegid(), *os.getgroups()}
    why = not_private(info, os.geteuid(), groups, lambda: _is_mount_point(state_dir))
    if why:
        raise StateError(
            f"state_dir {state_dir}: {why} (mode {stat.S_IMODE(info.st_mode):04o}); whoever can write "
            "there can replace the node credential or files the agent opens; use a dir of the agent's "
            "own user, not writable by others (e.g. chmod 0700), or another --state-dir"
        )
    if info.st_mode & stat.S_IWOTH and not _made_by_kubelet(info, groups, state_dir):
        # Taken (a mount point: a volume), but nothing shows the kubelet made it so: a host dir
        # someone made 0777 for a hostPath or `docker run -v` (or a local-path PV, which the
        # provisioner makes 0777), which every user of that host can write. Said, not refused:
        # refusing would stop the volumes of common single-node setups (k3s's local-path).
        log.warning(
            "state_dir %s: writable by every user of the machine it lives on (mode %04o): any of them "
            "could replace the node credential; make it owned by uid %d and mode 0700",
            state_dir, stat.S_IMODE(info.st_mode), os.geteuid(),
        )  # fmt: skip


def not_private(info: os.stat_result, uid: int, gids: Collection[int], mount_point: Callable[[], bool]) -> str:
    """Why a state dir with ``info`` is one others can change (check_private) for an agent running
    as ``uid`` in groups ``gids``; "" when it is not. ``mount_point``: whether the dir is one."""
    if not stat.S_ISDIR(info.st_mode):
        return ""  # ensure_writable says why
    if info.st_uid not in (uid, 0):
        return f"owned by uid {info.st_uid}, not by this agent's user (uid {uid}) or root"
    everyone = info.st_mode & stat.S_IWOTH
    group = info.st_mode & stat.S_IWGRP and info.st_gid not in gids
    if not (everyone or group):
        return ""
    if not info.st_mode & stat.S_ISVTX and mount_point():
        return ""  # a volume, whose root is as root mounted it (an emptyDir: 0777)
    return "writable by every user" if everyone else f"writable by group {info.st_gid}, which this agent is not in"


def _made_by_kubelet(info: os.stat_result, groups: Collection[int], path: Path) -> bool:
    """Whether a world-writable volume root bears the kubelet's marks: its fsGroup (setgid, a group
    of the agent's) or a mount whose source lies under a pod's volumes dir (kubernetes.io~...)."""
    if info.st_mode & stat.S_ISGID and info.st_gid in groups:
        return True
    return any("/volumes/kubernetes.io~" in root for root in _mount_roots(path))


def _mount_roots(path: Path) -> list[str]:
    """The source paths (mountinfo's field 4) of the mounts at ``path`` in this mount namespace."""
    target = os.path.realpath(path)
    try:
        return [root for root, mount_point in mountinfo.mounts() if mount_point == target]
    except OSError:
        return []


def _is_mount_point(path: Path) -> bool:
    """A mount point of this process's mount namespace (a bind mount of the same filesystem too)."""
    return os.path.ismount(path) or bool(_mount_roots(path))


@contextlib.contextmanager
def exclusive(state_dir: Path) -> Iterator[None]:
    """Holds the state dir's lock while the agent runs; StateError when another agent holds it, or
    when the state dir is one others can change (check_private).

    A state dir that cannot be written is not refused here: ensure_writable says why, before a
    join needs it (an identity already there may still be usable)."""
    restore_state_dir_modes(state_dir)  # dirs of the agent's own that job code chmodded
    check_private(state_dir)
    try:
        # O_NOFOLLOW: a symlink planted in its place would have the pid written over (truncating)
        # whatever it points at. O_CLOEXEC: Ray's processes must not keep the lock held (os.open's
        # descriptors are not inherited anyway; said here for whoever changes this).
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError(
                f"{state_dir / LOCK_FILE}: is a symlink; the agent made a plain file there, so someone "
                "else put it in its place: remove it, and check who else can write the state dir"
            ) from None
        log.debug("%s: no lock (%s)", state_dir, exc.strerror)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise StateError(
                f"{state_dir}: another koinon-agent (pid {holder}) is using this state dir; stop it, "
                "or give this one its own --state-dir (KOINON_STATE_DIR)"
            ) from None
        except OSError as exc:  # a filesystem without flock (some NFS, FUSE/CSI volumes)
            log.warning(
                "%s: cannot lock the state dir (%s); one agent per state dir is not enforced", state_dir, exc.strerror
            )
        else:
            with contextlib.suppress(OSError):  # a full state volume must not stop the agent
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def restore_mode(path: Path, mode_of: Callable[[int], int]) -> None:
    """Sets ``path``'s permission bits to ``mode_of(current bits)`` when this user owns it and they
    differ: Ray's job code runs as the agent's user, and Landlock, which keeps it from reading the
    state dir, has no right for chmod, so a job could `chmod 0` the credential (or the dirs of the
    agent's own that lead to it) and keep every later start of the agent out, or `chmod 0644` it
    for every user of the machine to read. Never follows a symlink at ``path``; leaves alone what
    another user owns, and anything missing."""
    if os.geteuid() == 0:
        # Root reads and writes whatever the modes say (and owns "/", /tmp, /home: a root agent
        # given --state-dir /tmp would otherwise take others' write from it).
        return
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        info = os.fstat(fd)
        current = stat.S_IMODE(info.st_mode)
        wanted = mode_of(current)
        if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid() or wanted == current:
            return
        # chmod through the descriptor's /proc link: the inode opened above, whatever the name leads
        # to now (fchmod takes no O_PATH descriptor).
        os.chmod(f"/proc/self/fd/{fd}", wanted)
        log.warning("%s: mode %04o changed behind the agent's back; set back to %04o", path, current, wanted)
    except OSError as exc:
        log.warning("%s: cannot set its mode back (%s)", path, exc.strerror)
    finally:
        os.close(fd)


def _private_file(current: int) -> int:
    return 0o600  # as the agent writes them (_write_private_json)


def _own_dir_mode(current: int) -> int:
    # The owner's rwx back, and no write for others, which check_private would refuse for good (a
    # group's write it takes for the agent's own groups, the only ones job code can chgrp to).
    if current & stat.S_ISVTX:
        return current  # a shared scratch dir (check_private refuses it as a state dir): not ours to change
    return (current | stat.S_IRWXU) & ~stat.S_IWOTH


def restore_state_dir_modes(state_dir: Path) -> None:
    """The state dir (as it resolves: a symlink to it is the operator's) and the dirs above it that
    the agent's user owns (``~/.koinon``, ``~`` for the default) get their owner's access back, and
    the state dir loses others' write (check_private would refuse it for good). Top down: a dir
    above that lost its owner's search bit hides the ones below it until it has it back."""
    resolved = Path(os.path.realpath(state_dir))  # a component it cannot reach is kept as written
    for directory in (*reversed(resolved.parents), resolved):
        restore_mode(directory, _own_dir_mode if directory == resolved else _searchable_dir_mode)


def _searchable_dir_mode(current: int) -> int:
    return current | stat.S_IRWXU


def _path(state_dir: Path) -> Path:
    return state_dir / "identity.json"


def _pending_join_path(state_dir: Path) -> Path:
    return state_dir / "pending-join.json"


def load(state_dir: Path, can_rejoin: bool = False) -> StoredIdentity | None:
    """The stored identity, or None. Also one stored under another gateway address than the one
    configured now: the caller decides what to do with it (Agent._ensure_identity). An unreadable
    one (a disk that lost the last write) is set aside when the agent can join again
    (``can_rejoin``: it has a token), else refused with the path and what to do."""
    path = _path(state_dir)
    restore_mode(path, _private_file)
    try:
        for leftover in state_dir.glob(".identity-*.tmp"):  # a save cut short: it holds a credential
            leftover.unlink(missing_ok=True)
        if not path.exists():
            return None
        text = path.read_text()
    except OSError as exc:  # not corruption: permissions, a read-only or failing disk
        raise StateError(
            f"{path}: cannot read the stored identity ({exc.strerror}); fix its permissions or disk"
        ) from exc
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        # Fields this version does not know (a later agent's, after a rollback) are left out: the
        # identity they came with is still this node's.
        known = {field.name for field in fields(StoredIdentity)}
        identity = StoredIdentity(**{name: value for name, value in data.items() if name in known})
        _check_types(identity)
    except (OSError, ValueError, TypeError) as exc:
        if not can_rejoin:
            raise StateError(
                f"{path}: unreadable stored identity ({exc}); restore it, or remove it and set a join token"
            ) from exc
        aside = path.with_name("identity.json.corrupt")
        try:
            os.replace(path, aside)
        except OSError as err:
            raise StateError(
                f"{path}: unreadable stored identity ({exc}) that cannot be set aside ({err.strerror}); remove it"
            ) from err
        log.warning("%s: unreadable stored identity (%s); moved to %s, joining again", path, exc, aside.name)
        return None
    return identity


def _check_types(identity: StoredIdentity) -> None:
    """JSON that parses may still hold the wrong kinds of values (a hand edit, another version)."""
    for name in ("gateway", "node_name", "address", "credential", "trusted_ca"):
        if not isinstance(getattr(identity, name), str):
            raise TypeError(f"{name}: expected a string")
    if not isinstance(identity.expires_at, int) or isinstance(identity.expires_at, bool):
        raise TypeError("expires_at: expected whole Unix seconds")


def ensure_writable(state_dir: Path) -> None:
    """Checks before a join that the credential it brings can be kept: a join whose credential is
    lost costs a token use and leaves a VolunteerNode nobody can use."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=state_dir, prefix=".write-check-")
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise StateError(
            f"state_dir {state_dir}: not writable ({exc.strerror}); the agent keeps its credential there"
        ) from exc


def save(state_dir: Path, identity: StoredIdentity) -> None:
    """Writes the identity atomically and durably, readable by this user only (it holds a credential)."""
    _write_private_json(_path(state_dir), asdict(identity))


def pending_join_id(state_dir: Path, gateway: str) -> str:
    """The id of this agent's join to ``gateway`` that has not stored its credential yet, or a new
    one, on disk before the first try is sent. Every retry, also after a restart, sends the same id,
    so a join whose reply was lost gets its node back instead of a second node and token use."""
    path = _pending_join_path(state_dir)
    restore_mode(path, _private_file)
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("gateway") == gateway and _is_join_id(data.get("join_id")):
            return str(data["join_id"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); starting a new join", path, exc)
    join_id = secrets.token_hex(16)
    try:
        _write_private_json(path, {"gateway": gateway, "join_id": join_id})
    except OSError as exc:  # still good for this process's retries
        log.warning("%s: could not keep the join id (%s); a restart now starts a new join", path, exc.strerror)
    return join_id


def finish_join(state_dir: Path) -> None:
    """The join's credential is stored: the next join is a new one. Should the id stay behind, the
    gateway sees that its node has had a session and makes that next join a new one anyway."""
    try:
        _pending_join_path(state_dir).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("%s: could not remove (%s)", _pending_join_path(state_dir), exc.strerror)


def _is_join_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _write_private_json(path: Path, data: dict[str, object]) -> None:
    """Atomically and durably, readable by this user only. A fresh temporary file each time: an
    existing one's mode or a symlink in its place cannot leak what it holds."""
    state_dir = path.parent
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".identity-", suffix=".tmp")  # mode 0600, O_EXCL
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)


def forget(state_dir: Path) -> None:
    _path(state_dir).unlink(missing_ok=True)
