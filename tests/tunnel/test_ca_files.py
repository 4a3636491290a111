"""``--store file`` keeps the gateway's CA and credential key in files: they are written whole and
private, and files that hold no usable CA stop the gateway instead of signing with them."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from pathlib import Path

import pytest
from koinon_gateway import credentials
from koinon_gateway.kube_ca import CREDENTIAL_KEY, bundle_from_secret
from koinon_gateway.pki import FileCAStore, create_ca, load_or_create_ca


def stored(directory: Path, credential_key: bytes | None = None) -> None:
    bundle = create_ca()
    asyncio.run(FileCAStore(directory).save(bundle))
    if credential_key is not None:
        (directory / "credential.key").write_bytes(credential_key)


def test_an_empty_credential_key_is_refused_not_signed_with(tmp_path: Path) -> None:
    """A save cut short left credential.key empty; the gateway signed with the empty key, and anyone
    could make a credential for any node (here: checked with the empty key, it verifies)."""
    stored(tmp_path, credential_key=b"")
    forged = credentials.issue(b"", "volunteer-abc123", "127.0.20.1", 3600).token
    assert credentials.verify(b"", forged) is not None  # what signing with it allowed
    with pytest.raises(ValueError, match=r"credential\.key holds 0 bytes"):
        asyncio.run(FileCAStore(tmp_path).load())


def test_a_partial_or_broken_ca_directory_is_refused_naming_it(tmp_path: Path) -> None:
    stored(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(ValueError, match=r"ca\.crt or ca\.key unreadable"):
        asyncio.run(load_or_create_ca(FileCAStore(tmp_path / "ca")))
    stored(tmp_path / "half")
    (tmp_path / "half" / "credential.key").unlink()
    with pytest.raises(ValueError, match=r"credential\.key missing beside the others"):
        asyncio.run(FileCAStore(tmp_path / "half").load())


def test_a_saved_key_is_private_even_over_a_file_that_was_not(tmp_path: Path) -> None:
    tmp_path.joinpath("ca.key").write_bytes(b"stale")
    os.chmod(tmp_path / "ca.key", 0o644)
    stored(tmp_path)
    for name in ("ca.key", "credential.key"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key", "credential.key"]  # no leftovers
    assert asyncio.run(FileCAStore(tmp_path).load()) is not None


def test_a_short_credential_key_in_the_kube_secret_is_refused() -> None:
    bundle = create_ca()
    data = {
        "tls.crt": base64.b64encode(bundle.cert_pem).decode(),
        "tls.key": base64.b64encode(bundle.key_pem).decode(),
        CREDENTIAL_KEY: base64.b64encode(b"x").decode(),
    }
    with pytest.raises(ValueError, match=r"credential\.key holds 1 bytes"):
        bundle_from_secret({"data": data})
