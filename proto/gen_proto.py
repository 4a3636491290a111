"""Regenerate the Python code for the tunnel protocol (``make gen-proto`` calls this).

Sources live in ``proto/koinon/tunnel/v1``; code goes to ``proto/koinon_proto/tunnel/v1`` so that it
imports as ``koinon_proto.tunnel.v1``. The source tree is mapped onto that import path with protoc's
``-I<virtual>=<physical>`` form instead of moving the .proto files.

Usage: python proto/gen_proto.py [--out DIR]   (DIR defaults to proto/, the checked-in location)
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
VERSIONS = ("v1",)


def generate(out_dir: Path) -> None:
    include = str(resources.files("grpc_tools") / "_proto")
    for version in VERSIONS:
        src = PROTO_ROOT / "koinon" / "tunnel" / version
        target = out_dir / "koinon_proto" / "tunnel" / version
        target.mkdir(parents=True, exist_ok=True)
        for package_dir in (out_dir / "koinon_proto" / "tunnel", target):
            (package_dir / "__init__.py").touch()
        for proto in sorted(src.glob("*.proto")):
            virtual = f"koinon_proto/tunnel/{version}"
            args = [
                "grpc_tools.protoc",
                f"-I{virtual}={src}",
                f"-I{include}",
                f"--python_out={out_dir}",
                f"--pyi_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                f"{virtual}/{proto.name}",
            ]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed for {proto}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    generate(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
