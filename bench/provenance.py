"""What produced a benchmark's JSON: the code (commit, and whether the tree had uncommitted
changes), when the run started and ended, and the units of its memory figures. The README cites
figures by commit and time; these fields let anyone check that against the file itself."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance(started_utc: str) -> dict[str, Any]:
    """The ``provenance`` entry of a benchmark's JSON, written when the run ends. ``commit`` is
    None outside a git checkout; ``dirty``: files differed from that commit (then the commit alone
    does not name the code that ran)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    # Python files no commit holds (and .gitignore does not name) count too: a run may import a
    # module not yet added. Other untracked files (a .venv symlink, notes) name no code that ran.
    untracked_code = _git("ls-files", "--others", "--exclude-standard", "--", "*.py")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None or untracked_code is None else bool(status or untracked_code),
        "started_utc": started_utc,
        "finished_utc": utc_now(),
        # Every *_mb / *_mib figure these benchmarks write is in MiB (2**20 bytes) since 2026-12-06;
        # files kept from before may hold MB (the README names them).
        "memory_unit": "MiB",
    }
