"""The state dir lock on filesystems without flock, on a full state volume, and in a state dir
others can write (refused; a symlink planted as the lock is never followed)."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
from pathlib import Path

import pytest
from koinon_agent import cli, mountinfo, state
from koinon_agent.agent import Agent


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_state_dir_whose_filesystem_cannot_lock_still_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, code: int
) -> None:
    """exclusive() skips the lock where the lock file cannot be opened (read-only dir) but lets
    every other flock error through: on an NFS PVC without lockd (ENOLCK) or a FUSE/CSI volume
    without flock (EOPNOTSUPP/ENOSYS) the agent, which ran before this change, now dies with an
    OSError traceback at start (not a ValueError: the CLI does not turn it into a one-liner)."""

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(code, "no locks here")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with state.exclusive(tmp_path):
        pass


def test_a_full_state_volume_does_not_stop_the_agent_starting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The chart keeps the health file off the state volume so that a full state volume does not
    take a working agent down; exclusive() now writes the pid into agent.lock after truncating it,
    and ENOSPC from that write escapes as an OSError: the agent cannot start at all."""
    import os

    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(state.LOCK_FILE):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with state.exclusive(tmp_path):
        pass


def test_a_state_dir_every_user_can_write_is_refused_and_a_planted_lock_is_not_followed(tmp_path: Path) -> None:
    """`--state-dir /tmp/koinon-agent` that another local user made first (mode 0777): the agent
    used it without a word. Whoever can write there can plant agent.lock as a symlink, and
    exclusive() opened it with O_CREAT and no O_NOFOLLOW, truncated the target and wrote its pid
    into it: any file the volunteer can write (here a stand-in for ~/.bashrc)."""
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH=$HOME/bin:$PATH\n")
    shared = tmp_path / "koinon-agent"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "agent.lock").symlink_to(victim)
    refusal = rf"state_dir {re.escape(str(shared))}: writable by every user \(mode 0777\)"
    with pytest.raises(state.StateError, match=refusal), state.exclusive(shared):
        pass
    assert victim.read_text() == "export PATH=$HOME/bin:$PATH\n"


def test_a_symlink_in_place_of_the_lock_is_refused_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "bashrc"
    victim.write_text("keep me\n")
    own = tmp_path / "state"
    own.mkdir(mode=0o700)
    (own / "agent.lock").symlink_to(victim)
    with pytest.raises(state.StateError, match=r"agent\.lock: is a symlink"), state.exclusive(own):
        pass
    assert victim.read_text() == "keep me\n"


def test_the_cli_refuses_a_shared_state_dir_with_exit_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_gateway(self: Agent) -> None:  # the state dir is checked before: never reached
        return None

    monkeypatch.setattr(Agent, "_run", no_gateway)
    monkeypatch.setenv("KOINON_TOKEN", "abcdef.0123456789abcdef")
    shared = tmp_path / "koinon-agent"
    shared.mkdir()
    shared.chmod(0o777)
    argv = ["join", "--gateway", "127.0.0.1:1", "--insecure", "--simulate-gpus", "0", "--state-dir", str(shared)]
    assert cli.main(argv) == 2
    assert f"state_dir {shared}: writable by every user" in capsys.readouterr().err
    assert not (shared / "agent.lock").exists()


AGENT_UID, AGENT_GID, FS_GROUP, OTHER = 10001, 10001, 10002, 4242


def dir_stat(mode: int, uid: int, gid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 1, 1, 2, uid, gid, 4096, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "mount_point", "problem"),
    [
        (0o700, AGENT_UID, AGENT_GID, False, ""),  # made by the agent (or `install -d -m 0700`)
        (0o755, AGENT_UID, AGENT_GID, False, ""),  # mkdir under umask 022
        (0o775, AGENT_UID, AGENT_GID, False, ""),  # umask 002 with a group of the agent's own
        (0o2775, 0, FS_GROUP, True, ""),  # a PVC's root with fsGroup (root-owned, setgid, g+w)
        (0o2777, 0, FS_GROUP, True, ""),  # an emptyDir with fsGroup (the chart's default)
        (0o777, 0, 0, True, ""),  # an emptyDir without fsGroup, a local-path PV (0777)
        (0o700, OTHER, OTHER, False, "owned by uid 4242"),  # another user's dir
        (0o700, OTHER, OTHER, True, "owned by uid 4242"),
        (0o775, AGENT_UID, OTHER, False, "writable by group 4242"),  # a group the agent is not in
        (0o775, 0, 0, True, ""),  # a volume as root mounted it
        (0o777, AGENT_UID, AGENT_GID, False, "writable by every user"),
        (0o777, 0, 0, False, "writable by every user"),
        (0o1777, 0, 0, True, "writable by every user"),  # a shared scratch space (/tmp as a tmpfs)
    ],
)
def test_a_state_dir_is_refused_when_others_can_change_it_not_in_kubernetes_volumes(
    mode: int, uid: int, gid: int, mount_point: bool, problem: str
) -> None:
    """Like ssh's StrictModes, but what Kubernetes makes of the chart's volumes is taken: root
    owns them, fsGroup (a group of the agent's) can write them, an emptyDir is 0777 (2777), and
    only root (the kubelet) can mount one there."""
    why = state.not_private(dir_stat(mode, uid, gid), AGENT_UID, {AGENT_GID, FS_GROUP}, lambda: mount_point)
    assert why.startswith(problem) if problem else why == ""


def test_a_mount_point_is_found_also_as_a_bind_mount_of_the_same_filesystem(tmp_path: Path) -> None:
    assert state._is_mount_point(Path("/proc"))
    assert not state._is_mount_point(tmp_path)
    assert mountinfo.unescape(r"/var/lib/my\040state") == "/var/lib/my state"


@pytest.mark.parametrize(
    ("mode", "gid", "roots", "warned"),
    [
        (0o777, 0, ["/srv/koinon-agent"], True),  # a host dir made 0777 for a hostPath / docker -v
        (0o777, 0, ["/var/lib/kubelet/pods/p/volumes/kubernetes.io~empty-dir/state"], False),
        (0o2777, "own", ["/"], False),  # an emptyDir with fsGroup: setgid, a group of the agent's
        (0o2775, "own", ["/"], False),  # not writable by every user at all
    ],
)
def test_a_volume_every_host_user_can_write_is_taken_with_a_warning_unless_the_kubelet_made_it(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    mode: int,
    gid: int | str,
    roots: list[str],
    warned: bool,
) -> None:
    """A bind mount of a host dir every host user can write passes the mount-point rule (only root
    mounts), yet any user of that host can plant an identity there: the agent says so. Not when
    the kubelet's marks show (its fsGroup, or a source under a pod's volumes dir)."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    if os.geteuid() == 0:  # as another user the dir is of its own group, which is no mark without setgid
        os.chown(state_dir, 0, os.getegid() if gid == "own" else int(gid))
    state_dir.chmod(mode)
    monkeypatch.setattr(state, "_mount_roots", lambda path: roots)
    monkeypatch.setattr(os.path, "ismount", lambda path: True)
    with caplog.at_level(logging.WARNING, logger="koinon_agent.state"):
        state.check_private(state_dir)  # taken in every case
    assert ("writable by every user of the machine" in caplog.text) is warned
