"""``--store file`` keeps the gateway's CA and credential key in files: they are written whole and
private, and files that hold no usable CA stop the gateway instead of signing with them."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import threading
from pathlib import Path

import pytest
from koinon_gateway import credentials, pki
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
    forged = credentials.issue(b"", "volunteer-abc123", "127.0.20.1", 3600, uid="u").token
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


def test_saved_keys_are_private_and_a_save_never_writes_over_another_ca(tmp_path: Path) -> None:
    stored(tmp_path / "ca")
    for name in ("ca.key", "credential.key"):
        assert stat.S_IMODE(os.stat(tmp_path / "ca" / name).st_mode) == 0o600, name
    first = asyncio.run(FileCAStore(tmp_path / "ca").load())
    asyncio.run(FileCAStore(tmp_path / "ca").save(create_ca()))  # a later save keeps the CA there
    assert asyncio.run(FileCAStore(tmp_path / "ca").load()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca"]  # no staging directory left


def test_a_short_credential_key_in_the_kube_secret_is_refused() -> None:
    bundle = create_ca()
    data = {
        "tls.crt": base64.b64encode(bundle.cert_pem).decode(),
        "tls.key": base64.b64encode(bundle.key_pem).decode(),
        CREDENTIAL_KEY: base64.b64encode(b"x").decode(),
    }
    with pytest.raises(ValueError, match=r"credential\.key holds 1 bytes"):
        bundle_from_secret({"data": data})


def test_a_ca_key_that_is_not_the_certificates_is_refused(tmp_path: Path) -> None:
    stored(tmp_path)
    tmp_path.joinpath("ca.key").write_bytes(create_ca().key_pem)  # another CA's key
    with pytest.raises(ValueError, match=r"ca\.key is not the key of ca\.crt"):
        asyncio.run(FileCAStore(tmp_path).load())


async def test_two_gateways_creating_the_ca_at_once_both_end_with_the_same_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second gateway saves its CA while the first is between writing and renaming: with one
    temporary name per file they deleted each other's files (FileNotFoundError), or mixed a
    certificate of one with the key of the other."""
    first, second = FileCAStore(tmp_path / "ca"), FileCAStore(tmp_path / "ca")
    real_fsync = os.fsync
    interleaved = False

    def fsync(fd: int) -> None:
        nonlocal interleaved
        real_fsync(fd)
        if not interleaved:
            interleaved = True
            other = threading.Thread(target=asyncio.run, args=(second.save(create_ca()),))  # another gateway
            other.start()
            other.join()

    monkeypatch.setattr(os, "fsync", fsync)
    bundle = await load_or_create_ca(first)
    assert interleaved and pki.bundle_problem(bundle) is None
    assert await FileCAStore(tmp_path / "ca").load() == bundle  # the one that got there first, for both
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca"]  # no staging directory left
