"""The gateway publishes its CA's certificate, and only that, in ConfigMap ``koinon-gateway-ca-cert``;
``koinon-gateway token ca-hash`` and the hint after ``token create`` read it there.

Before 2026-12-07 both read the Secret ``koinon-gateway-ca``, which also holds the CA's private key
and the HMAC key that signs every node credential: whoever was given what these commands need (to
hand volunteers ``--ca-cert-hash``) could forge any node's credential and pose as the gateway,
since RBAC grants a Secret whole.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from koinon_gateway import token_cli
from koinon_gateway.kube_ca import (
    CA_CERT_CONFIGMAP_NAME,
    CA_SECRET_NAME,
    KubeCAStore,
    StalePin,
    ca_secret,
    publish_ca_cert,
)
from koinon_gateway.kube_client import JSON, KubeApiError, KubeClient
from koinon_gateway.kube_tokens import KubeTokenStore
from koinon_gateway.pki import ca_cert_hash, create_ca, load_or_create_ca

from . import test_kube_stores
from .test_kube_stores import NAMESPACE, Kube

kube = test_kube_stores.kube  # the fixture: the API emulator, a kubeconfig and a client for it


def configmap(kube: Kube) -> JSON:
    return kube.emulator.get("v1", "ConfigMap", CA_CERT_CONFIGMAP_NAME, NAMESPACE)


def plant_immutable(kube: Kube, cert_pem: str, finalizers: list[str] | None = None) -> None:
    """koinon-gateway-ca-cert as someone allowed to create ConfigMaps (not Secrets) could make it
    first: immutable, holding their own CA's certificate."""
    metadata: JSON = {"name": CA_CERT_CONFIGMAP_NAME, "namespace": NAMESPACE}
    if finalizers:
        metadata["finalizers"] = finalizers
    kube.emulator.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "immutable": True, "data": {"ca.crt": cert_pem}}
    )


@contextlib.contextmanager
def forbidden(monkeypatch: pytest.MonkeyPatch, denied: Callable[[str, str], bool]) -> Iterator[list[str]]:
    """Answers 403, as the API server does for a caller whose RBAC lacks it, every request for
    which ``denied(method, path)`` holds; yields the paths refused."""
    refused: list[str] = []
    real = KubeClient.request

    async def request(self: KubeClient, method: str, path: str, *args: Any, **kwargs: Any) -> JSON:
        if denied(method, path):
            refused.append(path)
            raise KubeApiError(403, "Forbidden", f"{method} {path} is forbidden")
        return await real(self, method, path, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(KubeClient, "request", request)
        yield refused


def cli(kube: Kube, *args: str) -> int:
    # In this process (so the patches above apply), in a thread: the emulator serves from this loop.
    return token_cli.main([f"--kubeconfig={kube.kubeconfig}", f"--namespace={NAMESPACE}", *args])


def any_secret(method: str, path: str) -> bool:
    return "/secrets" in path


def issuer(method: str, path: str) -> bool:
    """What the Role koinon-gateway-token-issuer refuses: any Secret request but a create."""
    return "/secrets" in path and method != "POST"


async def test_ca_hash_needs_no_access_to_the_ca_private_key(
    kube: Kube, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The review's repro: ca-hash read the Secret with tls.key and credential.key. Now it reads
    nothing with them, and works for a caller refused every Secret."""
    bundle = await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    read: list[tuple[str, list[str]]] = []
    real_get = KubeClient.get_or_none

    async def recording_get(self: KubeClient, path: str) -> Any:
        result = await real_get(self, path)
        if result is not None:
            read.append((path, sorted((result.get("data") or {}).keys())))
        return result

    monkeypatch.setattr(KubeClient, "get_or_none", recording_get)
    with forbidden(monkeypatch, any_secret) as refused:
        assert await asyncio.to_thread(cli, kube, "ca-hash") == 0
    assert capsys.readouterr().out.strip() == ca_cert_hash(bundle.cert_pem)
    private = [(path, keys) for path, keys in read if "tls.key" in keys or "credential.key" in keys]
    assert not private, f"ca-hash read the CA signing key and credential HMAC key: {private} ({CA_SECRET_NAME})"
    assert not refused  # it did not even try


async def test_token_create_prints_the_hint_for_a_caller_refused_the_ca_secret(
    kube: Kube, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    # What the Role koinon-gateway-token-issuer allows: create Secrets, read nothing of them.
    with forbidden(monkeypatch, issuer) as refused:
        assert await asyncio.to_thread(cli, kube, "create", "--owner=bob") == 0
    out, err = capsys.readouterr()
    assert f"agents trust the gateway with: --ca-cert-hash {ca_cert_hash(bundle.cert_pem)}" in err
    assert out.strip().split(".")[1] not in err and not refused
    assert [t.owner for t in await KubeTokenStore(kube.client, NAMESPACE).list()] == ["bob"]


async def test_the_gateway_publishes_the_certificate_alone_and_keeps_it_current(kube: Kube) -> None:
    stores = [KubeCAStore(kube.client, NAMESPACE) for _ in range(4)]
    bundles = await asyncio.gather(*(load_or_create_ca(s) for s in stores))  # replicas starting at once
    published = configmap(kube)
    assert published["data"] == {"ca.crt": bundles[0].cert_pem.decode()}
    assert "binaryData" not in published
    assert published["metadata"]["labels"]["app.kubernetes.io/part-of"] == "koinon"
    # Another certificate there (written by hand, or a CA since replaced) is brought back to the
    # CA the gateway serves at its next start: volunteers must not be told to pin the wrong one.
    other = create_ca()
    edited = {"data": {"ca.crt": other.cert_pem.decode()}}
    kube.emulator.patch("v1", "ConfigMap", CA_CERT_CONFIGMAP_NAME, edited, NAMESPACE)
    await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    assert configmap(kube)["data"] == {"ca.crt": bundles[0].cert_pem.decode()}
    version = configmap(kube)["metadata"]["resourceVersion"]
    await publish_ca_cert(kube.client, NAMESPACE, bundles[0].cert_pem)  # unchanged: no write
    assert configmap(kube)["metadata"]["resourceVersion"] == version


async def test_a_gateway_not_allowed_to_publish_still_serves_its_ca(
    kube: Kube, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An image upgraded without applying the new RBAC: the gateway warns and starts."""
    with (
        forbidden(monkeypatch, lambda method, path: "/configmaps" in path),
        caplog.at_level(logging.WARNING, logger="koinon_gateway.kube_ca"),
    ):
        bundle = await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    assert bundle.cert_pem and "cannot publish the CA certificate" in caplog.text
    assert not kube.emulator.list_objects("v1", "ConfigMap", NAMESPACE)


async def test_ca_hash_falls_back_to_the_secret_only_until_the_gateway_publishes(
    kube: Kube, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway of an earlier version has not published the ConfigMap: a caller allowed to read
    the CA Secret still gets the hash, told why it came from there; one who is not is told that
    the gateway has not published it."""
    bundle = await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    kube.emulator.delete("v1", "ConfigMap", CA_CERT_CONFIGMAP_NAME, NAMESPACE)
    assert await asyncio.to_thread(cli, kube, "ca-hash") == 0
    out, err = capsys.readouterr()
    assert out.strip() == ca_cert_hash(bundle.cert_pem)
    assert f"read from Secret {CA_SECRET_NAME}" in err and "has not published" in err
    with forbidden(monkeypatch, issuer):
        assert await asyncio.to_thread(cli, kube, "ca-hash") == 2
        assert await asyncio.to_thread(cli, kube, "create", "--owner=bob") == 0  # the token is made anyway
    out, err = capsys.readouterr()
    assert "has not published ConfigMap koinon-gateway-ca-cert" in err and "could not be read" in err
    assert out.count(".") == 1  # the token, printed once; no hash


@pytest.mark.parametrize("broken", ["no-ca.crt", "not-pem"])
async def test_a_broken_published_certificate_is_named(
    kube: Kube, broken: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    data: dict[str, str | None] = {"ca.crt": None} if broken == "no-ca.crt" else {"ca.crt": "not a certificate"}
    kube.emulator.patch("v1", "ConfigMap", CA_CERT_CONFIGMAP_NAME, {"data": data}, NAMESPACE)
    assert await asyncio.to_thread(cli, kube, "ca-hash") == 2
    assert f"ConfigMap {NAMESPACE}/{CA_CERT_CONFIGMAP_NAME}" in capsys.readouterr().err
    # The CA Secret itself is untouched and still served.
    assert base64.b64decode(kube.emulator.get("v1", "Secret", CA_SECRET_NAME, NAMESPACE)["data"]["tls.key"])


async def test_a_configmap_planted_immutable_is_deleted_and_created_with_the_served_ca(
    kube: Kube, capsys: pytest.CaptureFixture[str]
) -> None:
    """Anyone allowed to create ConfigMaps in koinon-system (not Secrets) could plant
    koinon-gateway-ca-cert, immutable, holding their own CA: the update was refused (422), the
    gateway only warned, and `token ca-hash` handed out the planted CA's pin from then on."""
    planted = create_ca()
    plant_immutable(kube, planted.cert_pem.decode())
    planted_uid = configmap(kube)["metadata"]["uid"]
    bundle = await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    published = configmap(kube)
    assert published["metadata"]["uid"] != planted_uid and not published.get("immutable")
    assert published["data"] == {"ca.crt": bundle.cert_pem.decode()}
    assert await asyncio.to_thread(cli, kube, "ca-hash") == 0
    assert capsys.readouterr().out.strip() == ca_cert_hash(bundle.cert_pem) != ca_cert_hash(planted.cert_pem)


async def test_a_configmap_whose_update_is_refused_as_invalid_is_created_again(
    kube: Kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made immutable between the gateway's read and its update: the PUT answers 422."""
    bundle = await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    kube.emulator.patch("v1", "ConfigMap", CA_CERT_CONFIGMAP_NAME, {"data": {"ca.crt": "edited"}}, NAMESPACE)
    edited_uid = configmap(kube)["metadata"]["uid"]
    real = KubeClient.request

    async def request(self: KubeClient, method: str, path: str, *args: Any, **kwargs: Any) -> JSON:
        if method == "PUT" and "/configmaps/" in path:
            raise KubeApiError(422, "Invalid", "data: Forbidden: field is immutable when `immutable` is set")
        return await real(self, method, path, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(KubeClient, "request", request)
        await publish_ca_cert(kube.client, NAMESPACE, bundle.cert_pem)
    assert configmap(kube)["metadata"]["uid"] != edited_uid
    assert configmap(kube)["data"] == {"ca.crt": bundle.cert_pem.decode()}


@pytest.mark.parametrize(
    "error",
    [TimeoutError(), aiohttp.ClientConnectionError("connection dropped"), ConnectionResetError("reset")],
    ids=["timeout", "client-error", "os-error"],
)
async def test_a_configmap_request_that_gets_no_answer_does_not_stop_the_gateway(
    kube: Kube, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: BaseException
) -> None:
    """Publishing is best effort, yet only KubeApiError was caught: a ConfigMap request that timed
    out (30 s) or whose connection dropped failed the CA's load, and with it the gateway's start."""
    real = KubeClient.request

    async def request(self: KubeClient, method: str, path: str, *args: Any, **kwargs: Any) -> JSON:
        if "/configmaps" in path:
            raise error
        return await real(self, method, path, *args, **kwargs)

    monkeypatch.setattr(KubeClient, "request", request)
    with caplog.at_level(logging.WARNING, logger="koinon_gateway.kube_ca"):
        bundle = await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    assert bundle.cert_pem and "cannot publish the CA certificate" in caplog.text
    assert type(error).__name__ in caplog.text and "Bearer" not in caplog.text


async def test_a_ca_certificate_with_a_byte_order_mark_is_served_and_published_as_plain_pem(
    kube: Kube, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tls.crt with a UTF-8 byte-order mark (or text around the PEM, as `openssl x509 -text`
    writes), which the gateway served before the ConfigMap: publishing it raised UnicodeDecodeError
    at every start."""
    served = create_ca()
    kube.emulator.create(ca_secret(NAMESPACE, dataclasses.replace(served, cert_pem=b"\xef\xbb\xbf" + served.cert_pem)))
    bundle = await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    assert ca_cert_hash(bundle.cert_pem) == ca_cert_hash(served.cert_pem)
    assert configmap(kube)["data"] == {"ca.crt": served.cert_pem.decode()}
    assert await asyncio.to_thread(cli, kube, "ca-hash") == 0
    assert capsys.readouterr().out.strip() == ca_cert_hash(served.cert_pem)


def configmaps_only(method: str, path: str) -> bool:
    return "/configmaps" in path


async def test_ca_hash_for_a_caller_refused_the_configmap_reads_the_secret_or_names_both_refusals(
    kube: Kube, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the ConfigMap, `token ca-hash` needed get on Secret koinon-gateway-ca; a caller granted
    just that got 403 on the ConfigMap and no hash (the Secret was read on 404 only)."""
    bundle = await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    with forbidden(monkeypatch, configmaps_only):
        assert await asyncio.to_thread(cli, kube, "ca-hash") == 0
    out, err = capsys.readouterr()
    assert out.strip() == ca_cert_hash(bundle.cert_pem)
    assert f"read from Secret {CA_SECRET_NAME}" in err and f"reading ConfigMap {NAMESPACE}/" in err
    with forbidden(monkeypatch, lambda method, path: configmaps_only(method, path) or any_secret(method, path)):
        assert await asyncio.to_thread(cli, kube, "ca-hash") == 2
    out, err = capsys.readouterr()
    assert not out and f"reading ConfigMap {NAMESPACE}/{CA_CERT_CONFIGMAP_NAME} was refused" in err
    assert f"and so was Secret {CA_SECRET_NAME}" in err and "koinon-gateway-token-issuer" in err


@pytest.mark.parametrize("error", [TimeoutError(), aiohttp.ClientConnectionError("reset")])
async def test_a_gateway_that_cannot_replace_a_rotated_cas_certificate_does_not_start(
    kube: Kube, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception
) -> None:
    """A CA rotation (the Secret deleted, the gateway restarted) whose ConfigMap update got no
    answer: the gateway served the new CA while `token ca-hash` printed the old one's pin, with no
    note. The start fails instead (as before publishing was best effort), and the next one retries."""
    old = await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    kube.emulator.delete("v1", "Secret", CA_SECRET_NAME, NAMESPACE)  # rotate
    real = KubeClient.request

    async def request(self: KubeClient, method: str, path: str, *args: Any, **kwargs: Any) -> JSON:
        if method == "PUT" and "/configmaps/" in path:
            raise error
        return await real(self, method, path, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(KubeClient, "request", request)
        with pytest.raises(StalePin, match="another CA's certificate"):
            await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    new = await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))  # the restart, answered
    assert ca_cert_hash(new.cert_pem) != ca_cert_hash(old.cert_pem)
    capsys.readouterr()
    assert await asyncio.to_thread(cli, kube, "ca-hash") == 0
    assert capsys.readouterr().out.strip() == ca_cert_hash(new.cert_pem)


async def test_a_stale_configmap_deleted_between_read_and_update_is_created(
    kube: Kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a rotation the ConfigMap holds the old CA; someone (kubectl delete, to fix it) deletes it
    between the gateway's GET and its PUT: the PUT answers 404. The ConfigMap is merely absent: it
    is created, and the start goes on."""
    bundle = await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    kube.emulator.patch(
        "v1", "ConfigMap", CA_CERT_CONFIGMAP_NAME, {"data": {"ca.crt": create_ca().cert_pem.decode()}}, NAMESPACE
    )
    real = KubeClient.request

    async def request(self: KubeClient, method: str, path: str, *args: Any, **kwargs: Any) -> JSON:
        if method == "PUT" and "/configmaps/" in path:
            kube.emulator.delete("v1", "ConfigMap", CA_CERT_CONFIGMAP_NAME, NAMESPACE)
        return await real(self, method, path, *args, **kwargs)

    monkeypatch.setattr(KubeClient, "request", request)
    await publish_ca_cert(kube.client, NAMESPACE, bundle.cert_pem)
    assert configmap(kube)["data"] == {"ca.crt": bundle.cert_pem.decode()}


async def test_a_failed_create_after_the_stale_configmaps_delete_does_not_fail_the_start(
    kube: Kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planted immutable ConfigMap is deleted; the create that follows answers 500 (or times out).
    Nothing stale is left (ca-hash falls back to the Secret, with its note): the start goes on."""
    bundle = create_ca()
    plant_immutable(kube, create_ca().cert_pem.decode())
    real = KubeClient.request

    async def request(self: KubeClient, method: str, path: str, *args: Any, **kwargs: Any) -> JSON:
        if method == "POST" and path.endswith("/configmaps"):
            raise KubeApiError(500, "InternalError", "etcdserver: request timed out")
        return await real(self, method, path, *args, **kwargs)

    monkeypatch.setattr(KubeClient, "request", request)
    await publish_ca_cert(kube.client, NAMESPACE, bundle.cert_pem)
    assert not kube.emulator.list_objects("v1", "ConfigMap", NAMESPACE)


async def test_a_planted_configmap_a_finalizer_holds_does_not_keep_the_gateway_down(
    kube: Kube, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone allowed to create ConfigMaps in koinon-system plants koinon-gateway-ca-cert immutable
    with a finalizer: the gateway's delete only marks it, 5 attempts later StalePin, and every
    restart did the same: the gateway (every volunteer's tunnel) never came back. It serves, with
    an error saying the pin is wrong until someone fixes the ConfigMap."""
    plant_immutable(kube, create_ca().cert_pem.decode(), finalizers=["evil.example/hold"])
    for _restart in range(3):
        with caplog.at_level(logging.ERROR, logger="koinon_gateway.kube_ca"):
            await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))  # serves
        assert "gives volunteers a pin this gateway does not serve" in caplog.text
        caplog.clear()
