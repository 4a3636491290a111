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


def test_the_declared_grpcio_and_protobuf_can_load_the_generated_code() -> None:
    """The generated code refuses a runtime older than the one that generated it: a dependency
    range reaching below it let `pip install .` pick a protobuf or grpcio the gateway and the agent
    then failed to import with."""
    import re
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    generated = REPO / "proto" / "koinon_proto" / "tunnel" / "v1"
    protobuf = re.search(r"# Protobuf Python Version: (\S+)", (generated / "tunnel_pb2.py").read_text())
    grpc = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", (generated / "tunnel_pb2_grpc.py").read_text())
    assert protobuf and grpc
    needed = {"protobuf": Version(protobuf.group(1)), "grpcio": Version(grpc.group(1))}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {r.name: r.specifier for r in map(Requirement, project["dependencies"]) if r.name in needed}
    assert set(declared) == set(needed)
    for name, specifier in declared.items():
        lowest = [Version(s.version) for s in specifier if s.operator in (">=", "==", "~=")]
        assert lowest and min(lowest) >= needed[name], f"{name}{specifier} allows versions below {needed[name]}"
