"""software_paths() resolved symlinks, so a Python reached through a symlink under /tmp
(a checkout in /tmp whose .venv is a link, as `ln -s /elsewhere/.venv .venv`) was not exposed in the
volunteer sandbox: the agent's exec failed ("volunteer sandbox: init failed: FileNotFoundError") and
`koinon dev up` timed out after 90 s with 0 volunteers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_symlinked_venv_under_tmp_is_exposed(tmp_path: Path) -> None:
    link = tmp_path / "venv-link"
    link.symlink_to(Path(sys.prefix).resolve())
    python = link / "bin" / "python"
    code = (
        "import sys, json; from koinon_dev.volunteer_sandbox import software_paths;"
        "print(json.dumps([str(p) for p in software_paths()]))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env={**os.environ}, check=True)
    exposed = [Path(p) for p in json.loads(out.stdout)]
    # The agent is exec'd as <link>/bin/koinon-agent (tunnel_plane._bin uses sys.executable's dir).
    assert any((link / "bin").is_relative_to(p) for p in exposed), exposed
