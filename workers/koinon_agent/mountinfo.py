"""This process's mounts, as /proc/self/mountinfo lists them (the agent's state-dir check and the
dev plane's volunteer sandbox read them)."""

from __future__ import annotations

import re
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


def mounts() -> list[tuple[str, str]]:
    """(source root, mount point) of every mount, in mount order: mountinfo's fields 4 and 5.
    OSError when it cannot be read."""
    found: list[tuple[str, str]] = []
    for line in MOUNTINFO.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            found.append((unescape(fields[3]), unescape(fields[4])))
    return found


def unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline and backslash in a path as \\040, \\011, \\012, \\134."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), field)
