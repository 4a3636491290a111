"""Files the emulator writes that hold credentials or Secrets."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` readable by its owner only (0600), atomically: readers never see
    a half-written file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # one left by a killed writer may have other bits
        out.write(text)
    temporary.replace(path)
