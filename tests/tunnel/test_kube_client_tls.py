"""KubeClient's TLS against an API server that, like kube-apiserver, takes a caller without a client
certificate for system:anonymous."""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from koinon_gateway.kube_client import KubeClient, KubeConfig


def certificate(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Name] | None = None
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key, issuer_name = issuer or (key, subject)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Pki:
    def __init__(self) -> None:
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = certificate("ca", self.ca_key)
        issuer = (self.ca_key, self.ca.subject)
        self.server_key, self.client_key = (
            ec.generate_private_key(ec.SECP256R1()),
            ec.generate_private_key(ec.SECP256R1()),
        )
        self.server = certificate("localhost", self.server_key, issuer)
        self.client = certificate("admin", self.client_key, issuer)


@pytest.fixture
async def api_server(tmp_path: Path) -> AsyncIterator[tuple[Pki, int]]:
    pki = Pki()
    for name, data in (
        ("ca.pem", cert_pem(pki.ca)),
        ("srv.pem", cert_pem(pki.server)),
        ("srv.key", key_pem(pki.server_key)),
    ):
        (tmp_path / name).write_bytes(data)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.pem"))
    context.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    context.verify_mode = ssl.CERT_OPTIONAL

    async def handler(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        if not peer:
            body = {"kind": "Status", "reason": "Forbidden", "code": 403, "message": 'User "system:anonymous"'}
            return web.json_response(body, status=403)
        return web.json_response({"kind": "Secret", "metadata": {"name": "x"}})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    assert site._server is not None
    try:
        yield pki, site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("skip_verify", [False, True])
async def test_the_client_certificate_is_presented_with_or_without_server_verification(
    api_server: tuple[Pki, int], skip_verify: bool
) -> None:
    """insecure-skip-tls-verify skips checking the server, as kubectl does; it still authenticates."""
    pki, port = api_server
    config = KubeConfig(
        server=f"https://localhost:{port}",
        ca_pem=None if skip_verify else cert_pem(pki.ca),
        insecure_skip_tls_verify=skip_verify,
        client_cert_pem=cert_pem(pki.client),
        client_key_pem=key_pem(pki.client_key),
    )
    client = KubeClient(config)
    try:
        assert (await client.get("/api/v1/namespaces/x/secrets/x"))["metadata"]["name"] == "x"
    finally:
        await client.close()
