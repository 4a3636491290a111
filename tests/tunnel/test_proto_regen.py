"""Regenerating the protocol code from proto/ must reproduce the checked-in files exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def generated_files(root: Path) -> list[Path]:
    """The protoc outputs under ``root`` (not the bytecode Python caches beside them)."""
    return sorted(p.relative_to(root) for p in (root / "koinon_proto").rglob("*_pb2*") if p.suffix in (".py", ".pyi"))


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "proto" / "gen_proto.py"), "--out", str(tmp_path)], check=True)
    generated = generated_files(tmp_path)
    assert generated, "nothing generated"
    for relative in generated:
        checked_in = REPO / "proto" / relative
        assert checked_in.exists(), f"{relative} is generated but not checked in"
        assert checked_in.read_bytes() == (tmp_path / relative).read_bytes(), f"{relative} is stale: run gen-proto"
    checked = generated_files(REPO / "proto")
    assert checked == generated, "checked-in generated files without a source"
