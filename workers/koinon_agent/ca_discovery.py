"""Trusting the gateway from a pinned CA hash instead of a CA file (kubeadm's discovery by hash).

The agent opens one TLS connection without verifying it, only to read the certificate chain the
gateway presents, and keeps the CA certificate in it whose public-key hash equals the pin. Every
call after that verifies the gateway against that CA as usual; a gateway that does not present
the pinned CA is refused before a token or credential is sent anywhere.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from koinon_gateway.pki import ca_cert_hash


class CADiscoveryError(Exception):
    """The gateway's certificates do not include the pinned CA (or the configured CA is another)."""


class GatewayUnreachable(CADiscoveryError):
    """No TLS handshake with the gateway (yet): worth trying again later."""


async def _open(gateway: str, context: ssl.SSLContext, server_name: str) -> asyncio.StreamWriter:
    if gateway.startswith("unix:"):
        _, writer = await asyncio.open_unix_connection(
            gateway[len("unix:") :], ssl=context, server_hostname=server_name
        )
    else:
        host, _, port = gateway.rpartition(":")
        _, writer = await asyncio.open_connection(host.strip("[]"), int(port), ssl=context, server_hostname=server_name)
    return writer


def _unverified_chain(tls: Any) -> list[Any]:
    # Public from Python 3.13; the same method on the underlying object before that.
    method = getattr(tls, "get_unverified_chain", None) or getattr(getattr(tls, "_sslobj"), "get_unverified_chain")  # noqa: B009
    return list(method() or [])


async def presented_chain(gateway: str, server_name: str, timeout: float = 10.0) -> list[x509.Certificate]:
    """The certificates the gateway sends in its TLS handshake, unverified.

    On the event loop, not in a thread: a SIGTERM while a silent gateway holds the handshake
    cancels it and closes the socket at once (a thread could not be stopped before its timeout)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only reading the chain; nothing is sent over this connection
    context.set_alpn_protocols(["h2"])
    try:
        async with asyncio.timeout(timeout):
            writer = await _open(gateway, context, server_name)
        try:
            chain = _unverified_chain(writer.get_extra_info("ssl_object"))
            # Certificate.public_bytes() gives PEM text by default.
            return [x509.load_pem_x509_certificate(cert.public_bytes().encode()) for cert in chain]
        finally:
            writer.transport.abort()  # nothing to say to it; no TLS close to wait for
    except (OSError, ValueError, TimeoutError) as exc:
        raise GatewayUnreachable(f"ca_cert_hash: could not read the gateway's certificates: {exc!r}") from exc


async def discover_ca(gateway: str, pin: str, server_name: str, timeout: float = 10.0) -> bytes:
    """PEM of the CA certificate in the gateway's chain whose hash is ``pin``."""
    seen = []
    for cert in await presented_chain(gateway, server_name, timeout):
        pem = cert.public_bytes(serialization.Encoding.PEM)
        digest = ca_cert_hash(pem)
        seen.append(digest)
        if digest == pin and _is_ca(cert):
            return pem
    raise CADiscoveryError(
        f"ca_cert_hash: the gateway presented no CA certificate with hash {pin} (it presented {', '.join(seen)})"
    )


def check_pin(ca_pem: bytes, pin: str) -> None:
    """A CA given as a file or PEM must be the pinned one too, when both are configured, and
    nothing else: the channel trusts every certificate the PEM holds, so a bundle of the pinned CA
    and another would let the other one in."""
    try:
        certificates = x509.load_pem_x509_certificates(ca_pem)
        digest = ca_cert_hash(ca_pem)
    except ValueError as exc:
        raise CADiscoveryError(f"ca: not a PEM certificate: {exc}") from exc
    if len(certificates) != 1:
        raise CADiscoveryError(
            f"ca_cert_hash: the configured CA holds {len(certificates)} certificates; with a pin it must "
            "hold the pinned CA alone"
        )
    if digest != pin:
        raise CADiscoveryError(f"ca_cert_hash: the configured CA has hash {digest}, not {pin}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
