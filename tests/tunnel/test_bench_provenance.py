"""Benchmark JSON names the code that produced it, and the README cites only commits that exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from bench import provenance

REPO = Path(__file__).resolve().parents[2]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_provenance_names_the_commit_and_whether_the_tree_had_changes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "one")
    monkeypatch.setattr(provenance, "REPO", tmp_path)
    clean = provenance.provenance("2026-12-07T00:00:00+00:00")
    assert clean["commit"] == _git(tmp_path, "rev-parse", "HEAD") and clean["dirty"] is False
    assert clean["started_utc"] == "2026-12-07T00:00:00+00:00" and clean["finished_utc"] >= clean["started_utc"]
    (tmp_path / "code.py").write_text("x = 2\n")  # the run measured code no commit holds
    assert provenance.provenance("2026-12-07T00:00:00+00:00")["dirty"] is True


def test_provenance_is_dirty_when_the_run_imported_a_python_file_no_commit_holds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("import helper\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "one")
    (tmp_path / "notes.txt").write_text("not code\n")  # an untracked file that is no code stays clean
    (tmp_path / ".venv").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setattr(provenance, "REPO", tmp_path)
    assert provenance.provenance(provenance.utc_now())["dirty"] is False
    (tmp_path / "helper.py").write_text("FAST = True\n")  # not added: the commit alone misses it
    assert provenance.provenance(provenance.utc_now())["dirty"] is True


def test_provenance_outside_a_checkout_says_it_does_not_know(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(provenance, "REPO", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    found = provenance.provenance(provenance.utc_now())
    assert found["commit"] is None and found["dirty"] is None


def _benchmarks_section() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index("## Benchmarks") : text.index("## Limits")]


@pytest.mark.skipif(
    subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    != "false",
    reason="needs the whole history (a shallow or no checkout)",
)
def test_every_commit_the_benchmark_figures_cite_exists() -> None:
    # A hash cited for a run whose commit a rewrite dropped names no code; the README says so there.
    cited = set(re.findall(r"\b(?:code|code of|at) `?([0-9a-f]{7})\b", _benchmarks_section()))
    lost = {"08b9646"}  # named in the README as a commit id the history no longer holds
    assert len(cited) >= 10, cited  # the pattern still finds what the section cites
    missing = sorted(
        c
        for c in cited - lost
        if subprocess.run(["git", "cat-file", "-e", f"{c}^{{commit}}"], cwd=REPO, capture_output=True).returncode
    )
    assert not missing, f"the README's benchmark figures cite commits the repository does not hold: {missing}"
