"""Files the gateway keeps its state in (``--store file``), replaced atomically and durably."""

from __future__ import annotations

import os
from pathlib import Path


def write_durably(path: Path, text: str) -> None:
    """Replaces ``path`` with ``text`` atomically and durably. The new file's data reaches the disk
    before the rename and the rename before this returns: after a power loss a rename of unsynced
    data can leave an empty file (read as no token counts, a one-use token usable again; or as no
    VolunteerNodes, their addresses handed out again)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
