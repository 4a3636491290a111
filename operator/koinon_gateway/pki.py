"""The gateway's certificate authority and the secret that signs node credentials.

Created once and kept in a ``CAStore`` (a Kubernetes Secret in production, a directory or memory in
tests) so that a restarted gateway keeps serving the CA agents already trust and accepts the
credentials it issued before.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import ipaddress
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEFAULT_SERVER_NAME = "koinon-gateway"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CABundle:
    cert_pem: bytes
    key_pem: bytes
    # HMAC key for node credentials (credentials.py).
    credential_key: bytes


class CAStore(Protocol):
    async def load(self) -> CABundle | None: ...

    async def save(self, bundle: CABundle) -> None:
        """Stores a new CA; a shared store may keep a concurrent creator's instead (load reads it)."""
        ...


class InMemoryCAStore:
    def __init__(self) -> None:
        self.bundle: CABundle | None = None

    async def load(self) -> CABundle | None:
        return self.bundle

    async def save(self, bundle: CABundle) -> None:
        self.bundle = bundle


class FileCAStore:
    """ca.crt, ca.key and credential.key in one directory (key files mode 0600)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def load(self) -> CABundle | None:
        """The stored CA, or None when none was stored; ValueError for files that hold no usable
        one. An empty credential.key (a save cut short) was taken, and every credential signed
        with it could be forged by anyone."""
        paths = [self.directory / n for n in ("ca.crt", "ca.key", "credential.key")]
        if not any(p.exists() for p in paths):
            return None
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise ValueError(f"CA directory {self.directory}: {', '.join(missing)} missing beside the others")
        bundle = CABundle(paths[0].read_bytes(), paths[1].read_bytes(), paths[2].read_bytes())
        problem = bundle_problem(bundle)
        if problem is not None:
            raise ValueError(f"CA directory {self.directory}: {problem}")
        return bundle

    async def save(self, bundle: CABundle) -> None:
        """Stores a new CA all or nothing: the three files are written (0600, synced) into a
        directory of their own, which is then renamed into place. Only onto no directory or an
        empty one: where another gateway's CA got there first, that one stays (the caller reads it
        back), rather than the two writing over each other's files and leaving a mixed CA."""
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}-", dir=self.directory.parent))
        try:
            for name, data in (
                ("ca.crt", bundle.cert_pem),
                ("ca.key", bundle.key_pem),
                ("credential.key", bundle.credential_key),
            ):
                fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            try:
                os.rename(staging, self.directory)
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


MIN_CREDENTIAL_KEY_BYTES = 32


def bundle_problem(bundle: CABundle) -> str | None:
    """Why ``bundle`` cannot serve as the gateway's CA (None: it can)."""
    if len(bundle.credential_key) < MIN_CREDENTIAL_KEY_BYTES:
        return f"credential.key holds {len(bundle.credential_key)} bytes, fewer than {MIN_CREDENTIAL_KEY_BYTES}"
    try:
        cert = x509.load_pem_x509_certificate(bundle.cert_pem)
        key = serialization.load_pem_private_key(bundle.key_pem, password=None)
    except (ValueError, TypeError) as error:  # TypeError: an encrypted key
        return f"ca.crt or ca.key unreadable: {error}"
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ca.key is a {type(key).__name__}, not an EC key (the gateway signs with ECDSA)"
    if cert.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        return (
            f"ca.crt expired at {cert.not_valid_after_utc.isoformat()}; replace the CA (agents must trust the new one)"
        )
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return "ca.key is not the key of ca.crt"
    return None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_ca(common_name: str = "koinon-gateway-ca", days: int = 3650) -> CABundle:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CABundle(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), secrets.token_bytes(32))


CA_EXPIRY_WARNING = dt.timedelta(days=365)


async def load_or_create_ca(store: CAStore) -> CABundle:
    bundle = await store.load()
    if bundle is None:
        await store.save(create_ca())
        # Read back: a store shared by several gateways keeps the first CA saved, not necessarily ours.
        bundle = await store.load()
        if bundle is None:
            raise RuntimeError("CA store: saved a CA but cannot load it back")
    problem = bundle_problem(bundle)
    if problem is not None:
        raise ValueError(f"CA store: {problem}")
    expires = x509.load_pem_x509_certificate(bundle.cert_pem).not_valid_after_utc
    if expires - dt.datetime.now(dt.UTC) < CA_EXPIRY_WARNING:
        # Server certificates end with it: agents must be given a new CA before that day.
        log.warning("the gateway's CA expires at %s; replace it and hand agents the new one", expires.isoformat())
    return bundle


def issue_server_cert(bundle: CABundle, hostnames: list[str], days: float = 365) -> tuple[bytes, bytes]:
    """Returns (cert chain PEM, key PEM) for the gateway's gRPC port, valid for ``hostnames``."""
    ca_cert = x509.load_pem_x509_certificate(bundle.cert_pem)
    ca_key = serialization.load_pem_private_key(bundle.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([DEFAULT_SERVER_NAME, *hostnames]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEFAULT_SERVER_NAME)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM) + bundle.cert_pem, _key_pem(key)


def ca_cert_hash(cert_pem: bytes) -> str:
    """``sha256:<hex>`` of the certificate's SubjectPublicKeyInfo, the form kubeadm's
    ``--discovery-token-ca-cert-hash`` uses: a volunteer can pin the gateway's CA with this short
    string instead of carrying the PEM (koinon-agent --ca-cert-hash)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()
