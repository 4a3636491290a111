"""The gateway's CA and server certificate over time and as hand-edited Secrets bring them: an
expired CA is refused at start, the server certificate never outlives its CA and is renewed while
the gateway runs, CA material the gateway cannot sign with is refused by name; node credentials
cannot register as another node; concurrent joins on a one-use token make one node; no secret
reaches the logs."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from koinon_gateway.config import GatewayConfig
from koinon_gateway.kube_ca import bundle_from_secret, ca_secret
from koinon_gateway.pki import CABundle, InMemoryCAStore, create_ca, issue_server_cert
from koinon_gateway.rpc import tunnel_stub
from koinon_gateway.server import Gateway
from koinon_gateway.tokens import InMemoryTokenStore
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import channel_for, cluster, control_call, gateway_channel, random_port_base


def _ca(not_before: dt.datetime, not_after: dt.datetime, key: object | None = None, is_ca: bool = True) -> CABundle:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "koinon-gateway-ca")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return CABundle(cert.public_bytes(serialization.Encoding.PEM), key_pem, b"c" * 32)


def _config(**overrides: object) -> GatewayConfig:
    config = GatewayConfig(
        listen="127.0.0.1:0",
        head_address="127.0.0.1",
        head_gcs_port=6399,
        vip_cidr="127.0.20.0/28",
        port_base=random_port_base(),
        port_block_size=16,
        verify_ray_nodes=False,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


async def _join_over_tls(gateway: Gateway, token: str) -> grpc.aio.AioRpcError | pb.JoinResponse:
    async with gateway_channel(gateway) as channel:
        try:
            response: pb.JoinResponse = await tunnel_stub(channel).Join(
                pb.JoinRequest(token=token, name_hint="x"), timeout=5
            )
            return response
        except grpc.aio.AioRpcError as exc:
            return exc


# ---- CA lifetime ----


async def test_a_gateway_with_an_expired_ca_refuses_to_start_instead_of_serving_it() -> None:
    """A stored CA past its notAfter is loaded and served as is: the gateway starts, logs that it
    serves agents, and every handshake then fails (agents see UNAVAILABLE and retry forever)."""
    now = dt.datetime.now(dt.UTC)
    store = InMemoryCAStore()
    store.bundle = _ca(now - dt.timedelta(days=400), now - dt.timedelta(days=1))
    tokens = InMemoryTokenStore()
    gateway = Gateway(_config(), tokens=tokens, ca_store=store)
    try:
        with pytest.raises(ValueError, match="expire"):
            await gateway.start()
    finally:
        # What happens today: it started, and no agent can talk to it.
        if gateway._server is not None:
            result = await _join_over_tls(gateway, tokens.add(owner="alice"))
            await gateway.stop(0)
            print("join against the gateway serving an expired CA:", result)


def test_the_server_certificate_never_outlives_the_ca_that_signs_it() -> None:
    """A CA with 30 days left signs a 365-day server certificate: from day 31 every agent's
    handshake fails, with nothing logged beforehand."""
    now = dt.datetime.now(dt.UTC)
    bundle = _ca(now - dt.timedelta(days=3620), now + dt.timedelta(days=30))
    chain, _ = issue_server_cert(bundle, ["localhost"])
    server, ca = x509.load_pem_x509_certificates(chain)
    assert server.not_valid_after_utc <= ca.not_valid_after_utc


async def test_the_server_certificate_is_renewed_while_the_gateway_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server certificate is issued once, in start(): a gateway that runs past its lifetime
    (365 days) serves an expired certificate to every agent. Shrunk here to 3 seconds."""
    real = issue_server_cert

    def short_lived(bundle: CABundle, hostnames: list[str], days: float = 365) -> tuple[bytes, bytes]:
        return real(bundle, hostnames, days=3 / 86400)

    monkeypatch.setattr("koinon_gateway.server.issue_server_cert", short_lived)
    tokens = InMemoryTokenStore()
    gateway = Gateway(_config(), tokens=tokens)
    await gateway.start()
    try:
        first = await _join_over_tls(gateway, tokens.add(owner="alice"))
        assert isinstance(first, pb.JoinResponse)
        await asyncio.sleep(4)
        later = await _join_over_tls(gateway, tokens.add(owner="alice"))
        assert isinstance(later, pb.JoinResponse), f"after the server certificate's lifetime: {later}"
    finally:
        await gateway.stop(0)


# ---- CA material the gateway cannot use ----


def _secret_of(bundle: CABundle) -> dict[str, object]:
    return ca_secret("koinon-system", bundle)


@pytest.mark.parametrize("case", ["rsa-ca", "not-a-ca", "encrypted-key"])
async def test_ca_material_the_gateway_cannot_use_is_refused_by_name(case: str) -> None:
    """bundle_problem checks only that the key matches the certificate. A CA Secret edited to hold
    an RSA CA crashes start() with a bare AssertionError; an encrypted key escapes as TypeError
    (main() reports only ValueError cleanly); a leaf certificate (CA:FALSE) is accepted and signs
    a server certificate no agent will verify."""
    now = dt.datetime.now(dt.UTC)
    if case == "rsa-ca":
        bundle = _ca(
            now - dt.timedelta(minutes=5), now + dt.timedelta(days=3650), rsa.generate_private_key(65537, 2048)
        )
    elif case == "not-a-ca":
        bundle = _ca(now - dt.timedelta(minutes=5), now + dt.timedelta(days=3650), is_ca=False)
    else:
        good = create_ca()
        key = serialization.load_pem_private_key(good.key_pem, None)
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
        bundle = CABundle(good.cert_pem, encrypted, good.credential_key)
    try:
        bundle_from_secret(_secret_of(bundle))
    except ValueError:
        return  # refused by name: fine
    # Accepted: then the gateway must be able to serve it.
    store = InMemoryCAStore()
    store.bundle = bundle
    tokens = InMemoryTokenStore()
    gateway = Gateway(_config(), tokens=tokens, ca_store=store)
    try:
        await gateway.start()
        result = await _join_over_tls(gateway, tokens.add(owner="alice"))
        assert isinstance(result, pb.JoinResponse), result
    finally:
        await gateway.stop(0)


# ---- credentials and tokens against the real gateway ----


async def test_two_concurrent_joins_on_a_one_use_token_get_one_node(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        token = c.tokens.add(owner="alice", usage_limit=1)
        async with channel_for(c) as channel:
            stub = tunnel_stub(channel)

            async def join(hint: str) -> object:
                try:
                    return await stub.Join(pb.JoinRequest(token=token, name_hint=hint), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    return exc

            results = await asyncio.gather(*(join(f"n{i}") for i in range(8)))
        ok = [r for r in results if isinstance(r, pb.JoinResponse)]
        assert len(ok) == 1 and len(c.registry.objects) == 1


async def test_a_credential_of_one_node_never_registers_or_dials_as_another(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        async with channel_for(c) as channel:
            stub = tunnel_stub(channel)
            a = await stub.Join(pb.JoinRequest(token=c.tokens.add(owner="alice"), name_hint="a"))
            b = await stub.Join(pb.JoinRequest(token=c.tokens.add(owner="bob"), name_hint="b"))
        b_reg = pb.Register(node_name=b.assignment.node_name, address=b.assignment.address)
        refused = await control_call(c, a.credential, b_reg)
        assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == grpc.StatusCode.PERMISSION_DENIED
        mixed = pb.Register(node_name=a.assignment.node_name, address=b.assignment.address)
        refused = await control_call(c, a.credential, mixed)
        assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == grpc.StatusCode.PERMISSION_DENIED
        # A deleted node's still-valid credential is refused.
        await c.registry.delete(a.assignment.node_name)
        a_reg = pb.Register(node_name=a.assignment.node_name, address=a.assignment.address)
        refused = await control_call(c, a.credential, a_reg)
        assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_logs_hold_no_token_secret_or_credential(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets_seen: list[str] = []
    async with cluster(tmp_path, credential_lifetime_s=1.0, heartbeat_interval_s=0.2) as c:
        token = c.tokens.add(owner="alice", usage_limit=1)
        secrets_seen.append(token.split(".")[1])
        agent = await c.start_agent("alpha", token=token)
        assert agent.identity is not None
        first = agent.identity.credential
        await asyncio.sleep(1.5)  # renewals, then the first credential expires
        secrets_seen += [first, agent.identity.credential]
        async with channel_for(c) as channel:
            stub = tunnel_stub(channel)
            for bad in (token, token[:7] + "0" * 16, token.upper(), "zzzzzz." + token[7:]):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Join(pb.JoinRequest(token=bad, name_hint="x"), timeout=5)
        reg = pb.Register(node_name=agent.identity.node_name, address=agent.identity.address)
        await control_call(c, first, reg)
    text = caplog.text
    for secret in secrets_seen:
        for piece in {secret, secret.upper(), *secret.split(".")[1:]}:
            assert piece not in text, f"log holds a secret piece {piece[:8]}..."
