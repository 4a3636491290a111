"""A Python environment reached through a symlink under /tmp (a checkout in /tmp whose .venv is a
link, as `ln -s /elsewhere/.venv .venv`): only the link's target was exposed in the volunteer
sandbox, so the agent's exec failed there ("volunteer sandbox: init failed: FileNotFoundError")
and `koinon dev up` timed out with no volunteer."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)"
)


def test_a_symlinked_venv_under_tmp_runs_inside_the_sandbox() -> None:
    link = Path("/tmp") / f"koinon-venv-link-{secrets.token_hex(3)}"
    link.symlink_to(Path(sys.prefix).resolve())
    try:
        python = str(link / "bin" / "python")
        completed = subprocess.run(
            ["unshare", "-m", "--propagation", "slave", python, "-m", "koinon_dev.volunteer_sandbox",
             "--", python, "-c", "import sys; print('inside', sys.prefix)"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        assert f"inside {link}" in completed.stdout
    finally:
        link.unlink()
