"""`volunteer_sandbox --processes-only`: a volunteer that runs as a plain process (no network
namespace: not root, or `--no-netns`) still gets processes of its own. A Ray driver picks its node
among the raylets whose processes it sees, the head's first: on a plain volunteer it attached to
the head's raylet (test_dev_plain_processes runs a job end to end)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from koinon_dev.volunteer_sandbox import absolute_pythonpath, processes_of_their_own

WHY_NOT = processes_of_their_own()
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=f"no PID namespace for this user here: {WHY_NOT}")

PROBE = """
import json, os, sys
print(json.dumps({
    "processes": sorted(p for p in os.listdir("/proc") if p.isdigit()),
    "uid": os.getuid(), "cwd": os.getcwd(), "seen": open(sys.argv[1]).read(),
    "capabilities": [l.split()[1] for l in open("/proc/self/status") if l.startswith(("CapEff", "CapPrm"))],
}))
sys.exit(3)
"""


def test_the_command_sees_only_its_own_processes_and_everything_else_as_it_was(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    mark.write_text("host's /tmp")
    ran = subprocess.run(
        [sys.executable, "-m", "koinon_dev.volunteer_sandbox", "--processes-only", "--",
         sys.executable, "-c", PROBE, str(mark)],
        # PYTHONPATH made absolute: this checkout's package, whatever the working directory.
        cwd=tmp_path, env={**os.environ, **absolute_pythonpath()}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 3, ran.stderr  # the command's exit status
    seen = json.loads(ran.stdout)
    # Its init and itself: not the head's raylet, nor anything else of the host.
    assert seen["processes"] == ["1", "2"]
    # Otherwise a plain process as before: the same user, directory and files.
    assert seen["uid"] == os.getuid() and seen["cwd"] == str(tmp_path) and seen["seen"] == "host's /tmp"
    if os.geteuid() != 0:  # the user namespace's capabilities are not the command's
        assert seen["capabilities"] == ["0000000000000000", "0000000000000000"]
