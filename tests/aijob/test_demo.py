"""`make demo` runs `koinon demo`: it must work end to end and leave no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _processes_mentioning(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(entry.name)
        except OSError:
            continue
    return found


def test_demo_runs_a_job_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    bin_dir = Path(sys.executable).parent
    completed = subprocess.run(
        [str(bin_dir / "koinon"), "--state-dir", str(state_dir), "demo", "--example", "examples/numeric-job.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )  # fmt: skip
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    assert "KOINON_RESULT" in output and '"pi": 3.1' in output
    assert "monte-carlo-pi   Succeeded" in output
    for reason in ("Scheduled", "Running", "Completed"):
        assert reason in output
    assert "stopped: operator" in output
    assert not (state_dir / "cluster.json").exists()
    assert _processes_mentioning(str(state_dir)) == []
