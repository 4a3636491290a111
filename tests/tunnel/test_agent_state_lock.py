"""The state dir lock on filesystems without flock, and on a full state volume."""

from __future__ import annotations

import errno
import fcntl
from pathlib import Path

import pytest
from koinon_agent import state


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
