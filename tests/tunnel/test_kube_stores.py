"""The gateway's Kubernetes-API stores (join-token Secrets, CA Secret, VolunteerNodes) against the
project's API emulator over HTTP, and a real TLS gRPC gateway using them, checked with kubectl."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from koinon_agent.agent import Agent, JoinRefused
from koinon_agent.config import AgentConfig
from koinon_dev.binaries import ensure_binaries
from koinon_emulator.kubeconfig import write_kubeconfig
from koinon_emulator.server import KubeEmulator
from koinon_gateway import service
from koinon_gateway.config import GatewayConfig
from koinon_gateway.kube_ca import CA_CERT_CONFIGMAP_NAME, CA_SECRET_NAME, KubeCAStore
from koinon_gateway.kube_client import JSON, KubeApiError, KubeClient, b64, load_incluster_config, load_kubeconfig
from koinon_gateway.kube_registry import KubeNodeRegistry
from koinon_gateway.kube_tokens import KubeTokenStore, secret_name
from koinon_gateway.pki import ca_cert_hash, load_or_create_ca
from koinon_gateway.registry import JOIN_TOKEN_LABEL, NodeRegistry
from koinon_gateway.rpc import tunnel_stub
from koinon_gateway.server import Gateway
from koinon_gateway.service import JOIN_KEY_LABEL, join_key
from koinon_gateway.token_cli import parse_ttl, print_table
from koinon_gateway.tokens import JoinGrant, TokenError, TokenStore, hash_secret
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from .helpers import echo_server, gateway_channel, random_port_base

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "koinon-system"


@dataclass
class Kube:
    emulator: KubeEmulator
    kubeconfig: Path
    client: KubeClient

    def kubectl(self, *args: str) -> str:
        completed = subprocess.run(
            [str(ensure_binaries().kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        return completed.stdout

    async def akubectl(self, *args: str) -> str:
        # kubectl blocks; the emulator serves from this event loop, so run it in a thread.
        return await asyncio.to_thread(self.kubectl, *args)

    def secret(self, name: str) -> JSON:
        return self.emulator.get("v1", "Secret", name, NAMESPACE)


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[Kube]:
    emulator = KubeEmulator()
    url = await emulator.start()
    for path in sorted((REPO / "manifests" / "crds").glob("*.yaml")):
        emulator.apply_crd(yaml.safe_load(path.read_text()))
    emulator.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url, namespace=NAMESPACE)
    client = KubeClient(load_kubeconfig(kubeconfig))
    assert client.namespace == NAMESPACE
    try:
        yield Kube(emulator, kubeconfig, client)
    finally:
        await client.close()
        await emulator.stop()


def decoded(secret: JSON) -> dict[str, str]:
    return {k: base64.b64decode(v).decode(errors="replace") for k, v in secret["data"].items()}


# ---- join tokens ----


async def test_created_token_secret_has_the_bootstrap_layout_and_no_secret(kube: Kube) -> None:
    store = KubeTokenStore(kube.client, NAMESPACE)
    token = await store.create(owner="alice", ttl=dt.timedelta(hours=2), usage_limit=2, region="eu")
    token_id, secret = token.split(".")
    stored = kube.secret(secret_name(token_id))
    assert stored["type"] == "koinon.dev/join-token"
    assert stored["metadata"]["labels"] == {"koinon.dev/join-token": "true"}
    data = decoded(stored)
    assert data["token-id"] == token_id
    assert data["token-secret-sha256"] == hash_secret(secret)
    assert secret not in json.dumps(stored) and all(secret not in v for v in data.values())
    assert (data["usage-limit"], data["usages-count"], data["revoked"]) == ("2", "0", "false")
    assert (data["owner"], data["region"]) == ("alice", "eu")
    expires = dt.datetime.fromisoformat(data["expiration"])
    assert dt.timedelta(hours=1, minutes=59) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=2)


async def test_consume_counts_uses_until_the_limit(kube: Kube) -> None:
    store = KubeTokenStore(kube.client, NAMESPACE)
    token = await store.create(owner="alice", usage_limit=2, region="eu")
    for expected in (1, 2):
        grant = await store.consume(token)
        assert (grant.owner, grant.region) == ("alice", "eu")
        assert decoded(kube.secret(secret_name(grant.token_id)))["usages-count"] == str(expected)
    with pytest.raises(TokenError) as refused:
        await store.consume(token)
    assert refused.value.reason == "usage-limit"
    assert decoded(kube.secret(secret_name(token[:6])))["usages-count"] == "2"


async def test_a_given_back_use_can_be_taken_again(kube: Kube) -> None:
    store = KubeTokenStore(kube.client, NAMESPACE)
    token = await store.create(owner="alice", usage_limit=1)
    grant = await store.consume(token)
    await store.give_back(grant)
    assert decoded(kube.secret(secret_name(grant.token_id)))["usages-count"] == "0"
    await store.give_back(grant)  # never below zero
    assert decoded(kube.secret(secret_name(grant.token_id)))["usages-count"] == "0"
    await store.consume(token)
    with pytest.raises(TokenError, match="usage limit"):
        await store.consume(token)


@pytest.mark.parametrize("case", ["wrong-secret", "unknown", "malformed", "expired", "revoked", "revoked-by-kubectl"])
async def test_refused_tokens_name_the_reason_and_count_nothing(kube: Kube, case: str) -> None:
    store = KubeTokenStore(kube.client, NAMESPACE)
    good = await store.create(owner="alice", usage_limit=3)
    token = {"wrong-secret": good[:7] + "0" * 16, "unknown": "zzzzzz.0123456789abcdef", "malformed": "nope"}.get(
        case, good
    )
    if case == "expired":
        # Issued long ago: an expiration in the past, as the Secret would hold after its TTL.
        path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name(good[:6])}"
        past = base64.b64encode(b"2020-01-01T00:00:00Z").decode()
        await kube.client.merge_patch(path, {"data": {"expiration": past}})
    if case == "revoked":
        await store.revoke(good[:6])
    if case == "revoked-by-kubectl":
        patch = json.dumps({"data": {"revoked": base64.b64encode(b"true").decode()}})
        await kube.akubectl("-n", NAMESPACE, "patch", "secret", secret_name(good[:6]), "--type=merge", "-p", patch)
    with pytest.raises(TokenError) as refused:
        await store.consume(token)
    assert refused.value.reason == {"wrong-secret": "invalid-secret", "revoked-by-kubectl": "revoked"}.get(case, case)
    assert decoded(kube.secret(secret_name(good[:6])))["usages-count"] == "0"


async def test_corrupt_token_data_is_refused_naming_the_field(kube: Kube) -> None:
    store = KubeTokenStore(kube.client, NAMESPACE)
    token = await store.create(owner="alice")
    path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name(token[:6])}"
    await kube.client.merge_patch(path, {"data": {"usage-limit": base64.b64encode(b"many").decode()}})
    with pytest.raises(TokenError) as refused:
        await store.consume(token)
    assert refused.value.reason == "invalid-token-data"
    assert "data.usage-limit" in str(refused.value)


async def test_a_count_in_other_digits_is_refused_and_cleanup_carries_on(kube: Kube) -> None:
    store = KubeTokenStore(kube.client, NAMESPACE)
    odd, expired = await store.create(owner="alice"), await store.create(owner="alice", ttl=dt.timedelta(hours=1))
    for token, field, value in ((odd, "usages-count", "²"), (expired, "expiration", "2020-01-01T00:00:00Z")):
        path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name(token[:6])}"
        await kube.client.merge_patch(path, {"data": {field: base64.b64encode(value.encode()).decode()}})
    with pytest.raises(TokenError) as refused:
        await store.consume(odd)  # str.isdigit() took "²"; int() then raised a plain ValueError
    assert refused.value.reason == "invalid-token-data" and "²" not in str(refused.value)
    assert await store.delete_expired(dt.timedelta(0)) == [expired[:6]]  # one bad Secret stops nothing
    assert [t.token_id for t in await store.list()] == []  # the unreadable one is left out, not fatal


async def test_a_copied_token_secret_is_refused_and_its_cleanup_deletes_only_itself(kube: Kube) -> None:
    store = KubeTokenStore(kube.client, NAMESPACE)
    victim = await store.create(owner="alice", ttl=None)
    copy = dict(kube.secret(secret_name(victim[:6])))
    copy["metadata"] = {
        "name": "koinon-join-token-copy00",
        "namespace": NAMESPACE,
        "labels": copy["metadata"]["labels"],
    }
    copy["data"] = {**copy["data"], "expiration": base64.b64encode(b"2020-01-01T00:00:00Z").decode()}
    await kube.client.create(f"/api/v1/namespaces/{NAMESPACE}/secrets", copy)
    assert await store.delete_expired(dt.timedelta(0)) == []  # its data names the victim's id
    assert not await _secret_gone(kube, victim[:6])
    assert (await store.consume(victim)).owner == "alice"


async def test_cleanup_keeps_a_token_extended_after_it_was_listed(kube: Kube) -> None:
    store = KubeTokenStore(kube.client, NAMESPACE)
    token = await store.create(owner="alice", ttl=dt.timedelta(hours=1))
    path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name(token[:6])}"
    await kube.client.merge_patch(path, {"data": {"expiration": base64.b64encode(b"2020-01-01T00:00:00Z").decode()}})
    listed = kube.client.list_all

    async def list_then_extend(*args: Any, **kwargs: Any) -> Any:
        result = await listed(*args, **kwargs)
        later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        await kube.client.merge_patch(path, {"data": {"expiration": base64.b64encode(later.encode()).decode()}})
        return result

    kube.client.list_all = list_then_extend  # type: ignore[method-assign]
    try:
        assert await store.delete_expired(dt.timedelta(0)) == []
    finally:
        kube.client.list_all = listed  # type: ignore[method-assign]
    assert (await store.consume(token)).owner == "alice"


class RacingClient(KubeClient):
    """Holds the first ``parties`` PUTs until all of them are in flight: every racer has read the same
    resourceVersion, so all but one must get 409 and retry."""

    def __init__(self, base: KubeClient, parties: int) -> None:
        super().__init__(base.config)
        self._barrier = asyncio.Barrier(parties)
        self._held = parties

    async def replace(self, path: str, body: JSON) -> JSON:
        if self._held > 0:
            self._held -= 1
            await asyncio.wait_for(self._barrier.wait(), 10)
        return await super().replace(path, body)


@pytest.mark.parametrize(("racers", "limit"), [(2, 1), (6, 3)])
async def test_concurrent_consumers_never_exceed_the_limit(kube: Kube, racers: int, limit: int) -> None:
    token = await KubeTokenStore(kube.client, NAMESPACE).create(owner="alice", usage_limit=limit)
    client = RacingClient(kube.client, racers)
    store = KubeTokenStore(client, NAMESPACE)
    try:
        results = await asyncio.gather(*(store.consume(token) for _ in range(racers)), return_exceptions=True)
    finally:
        await client.close()
    granted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, TokenError)]
    assert len(granted) == limit
    assert len(refused) == racers - limit and all(r.reason == "usage-limit" for r in refused)
    assert store.conflicts >= racers - 1  # the race really happened and was resolved by 409 + retry
    assert decoded(kube.secret(secret_name(token[:6])))["usages-count"] == str(limit)


async def test_expired_tokens_are_deleted_after_a_grace_period_and_no_others(kube: Kube) -> None:
    store = KubeTokenStore(kube.client, NAMESPACE)
    long_expired, just_expired, valid, unreadable = [
        await store.create(owner="alice", ttl=dt.timedelta(hours=1)) for _ in range(4)
    ]
    forever = await store.create(owner="alice", ttl=None)
    five_minutes_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for token, expiration in (
        (long_expired, "2020-01-01T00:00:00Z"),
        (just_expired, five_minutes_ago),
        (unreadable, "soon"),
    ):
        path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name(token[:6])}"
        await kube.client.merge_patch(path, {"data": {"expiration": base64.b64encode(expiration.encode()).decode()}})

    assert await store.delete_expired(dt.timedelta(hours=1)) == [long_expired[:6]]
    assert await _secret_gone(kube, long_expired[:6])
    for kept in (just_expired, valid, forever, unreadable):
        assert not await _secret_gone(kube, kept[:6])
    # Within the grace period a late join still hears why it is refused.
    with pytest.raises(TokenError) as refused:
        await store.consume(just_expired)
    assert refused.value.reason == "expired"
    assert await store.delete_expired(dt.timedelta(0)) == [just_expired[:6]]


async def test_a_far_future_expiry_does_not_stop_the_cleanup_of_other_tokens(kube: Kube) -> None:
    """expiration + grace past 9999-12-31 raised OverflowError: the whole pass stopped, every 10
    minutes, and no expired token was deleted again."""
    store = KubeTokenStore(kube.client, NAMESPACE)
    forever, west, expired = [await store.create(owner="alice", ttl=dt.timedelta(hours=1)) for _ in range(3)]
    for token, value in (
        (forever, "9999-12-31T23:59:59Z"),
        (west, "9999-12-31T23:59:59-05:00"),  # in year 10000 in UTC
        (expired, "2020-01-01T00:00:00Z"),
    ):
        path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name(token[:6])}"
        await kube.client.merge_patch(path, {"data": {"expiration": b64(value)}})
    assert (await store.consume(forever)).owner == "alice" and (await store.consume(west)).owner == "alice"
    assert await store.delete_expired(dt.timedelta(hours=1)) == [expired[:6]]


async def test_token_list_prints_a_far_future_expiry_west_of_utc(
    kube: Kube, capsys: pytest.CaptureFixture[str]
) -> None:
    """`koinon-gateway token list` converted each expiry to UTC to print it: OverflowError."""
    store = KubeTokenStore(kube.client, NAMESPACE)
    token = await store.create(owner="alice")
    path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name(token[:6])}"
    await kube.client.merge_patch(path, {"data": {"expiration": b64("9999-12-31T23:59:59-05:00")}})
    print_table(await store.list())
    assert f"{token[:6]}  alice  0/-   9999-12-31T23:59:59Z  false" in capsys.readouterr().out


@pytest.mark.parametrize("owner", ["empty", "missing"])
async def test_a_token_secret_without_an_owner_is_refused_as_broken_not_retried_for_ever(
    kube: Kube, owner: str
) -> None:
    """A Secret made by hand without data.owner was accepted: each join then failed the CRD's
    spec.owner minLength (422), its use was given back, and it was answered UNAVAILABLE "retry"
    for ever. Refused for good now, as other broken token data, the reason in the gateway's log."""
    tokens = KubeTokenStore(kube.client, NAMESPACE)
    token = await tokens.create(owner="alice")
    if owner == "empty":
        kube.emulator.patch("v1", "Secret", secret_name(token[:6]), {"data": {"owner": b64("")}}, NAMESPACE)
    else:
        secret = kube.secret(secret_name(token[:6]))
        del secret["data"]["owner"]
        await kube.client.replace(f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name(token[:6])}", secret)
    with pytest.raises(TokenError) as broken:
        await tokens.consume(token)
    assert broken.value.reason == "invalid-token-data" and "data.owner" in str(broken.value)
    async with join_stub(kube, tokens) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Join(pb.JoinRequest(token=token, name_hint="alpha"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value.details()
        assert "invalid-token" in str(refused.value.details())
    nodes, _ = await kube.client.list_all("/apis/koinon.dev/v1alpha1/volunteernodes")
    assert nodes == [] and decoded(kube.secret(secret_name(token[:6])))["usages-count"] == "0"


async def test_gateway_deletes_expired_token_secrets_by_itself(kube: Kube) -> None:
    store = KubeTokenStore(kube.client, NAMESPACE)
    token = await store.create(owner="alice", ttl=dt.timedelta(hours=1))
    path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name(token[:6])}"
    await kube.client.merge_patch(path, {"data": {"expiration": base64.b64encode(b"2020-01-01T00:00:00Z").decode()}})
    async with echo_server() as head_port:
        config = gateway_config(head_port)
        config.token_cleanup_interval_s, config.token_cleanup_grace_s = 0.2, 60.0
        gateway = Gateway(config, store, KubeNodeRegistry(kube.client), KubeCAStore(kube.client, NAMESPACE))
        await gateway.start()
        try:
            assert await wait_until(lambda: _secret_gone(kube, token[:6]), timeout=5)
        finally:
            await gateway.stop(0)


async def _secret_gone(kube: Kube, token_id: str) -> bool:
    names = {s["metadata"]["name"] for s in kube.emulator.list_objects("v1", "Secret", NAMESPACE)}
    return secret_name(token_id) not in names


async def test_token_cli_prints_the_token_once_and_stores_only_its_hash(kube: Kube) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "koinon_gateway.main", "token", f"--kubeconfig={kube.kubeconfig}",
        f"--namespace={NAMESPACE}", "create", "--owner=bob", "--ttl=1h30m", "--usage-limit=2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    token = out.decode().strip()
    token_id, secret = token.split(".")
    assert secret not in err.decode()
    data = decoded(kube.secret(secret_name(token_id)))
    assert (data["owner"], data["usage-limit"]) == ("bob", "2")
    assert data["token-secret-sha256"] == hash_secret(secret)
    grant = await KubeTokenStore(kube.client, NAMESPACE).consume(token)
    assert grant.owner == "bob"
    listed = await kube.akubectl("-n", NAMESPACE, "get", "secrets", "-l", "koinon.dev/join-token=true", "-o", "name")
    assert listed.split() == [f"secret/{secret_name(token_id)}"]


async def test_token_cli_prints_the_ca_hash_agents_pin(kube: Kube) -> None:
    async def cli(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "koinon_gateway.main", "token", f"--kubeconfig={kube.kubeconfig}",
            f"--namespace={NAMESPACE}", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    rc, _, err = await cli("ca-hash")
    assert rc == 2 and "no gateway CA in namespace koinon-system yet" in err
    bundle = await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
    rc, out, _ = await cli("ca-hash")
    assert rc == 0 and out.strip() == ca_cert_hash(bundle.cert_pem)
    rc, out, err = await cli("create", "--owner=bob")
    assert rc == 0 and f"--ca-cert-hash {ca_cert_hash(bundle.cert_pem)}" in err
    assert out.strip().split(".")[1] not in err  # the secret is still printed once, on stdout only


@pytest.mark.parametrize("broken", ["secret-not-a-certificate", "published-certificate-not-pem"])
async def test_token_cli_create_succeeds_when_only_the_ca_hint_cannot_be_read(kube: Kube, broken: str) -> None:
    """A created token is a success (exit 0, printed once) even if the CA hash printed after it
    cannot be read (from the published ConfigMap, or the CA Secret where none is published); an
    empty owner is refused before anything is created."""
    not_pem = "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
    if broken == "secret-not-a-certificate":
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": CA_SECRET_NAME, "namespace": NAMESPACE}}
        kube.emulator.create({**secret, "type": "Opaque", "data": {"tls.crt": base64.b64encode(b"x").decode()}})
    else:
        await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))
        kube.emulator.patch("v1", "ConfigMap", CA_CERT_CONFIGMAP_NAME, {"data": {"ca.crt": not_pem}}, NAMESPACE)

    async def create(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "koinon_gateway.main", "token", f"--kubeconfig={kube.kubeconfig}",
            f"--namespace={NAMESPACE}", "create", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    rc, out, err = await create("--owner=bob")
    assert rc == 0, err
    token_id = out.strip().split(".")[0]
    assert decoded(kube.secret(secret_name(token_id)))["owner"] == "bob"
    assert "could not be read" in err
    rc, out, err = await create("--owner=")
    assert rc == 2 and "--owner" in err and out == ""
    assert len(await KubeTokenStore(kube.client, NAMESPACE).list()) == 1


async def test_a_bootstrap_token_stored_before_owners_is_given_the_flags_owner_and_limit(kube: Kube) -> None:
    """A gateway restarted with the same --bootstrap-token brings the Secret's owner and limit to
    the flag's (a Secret an older gateway wrote had no owner, and every join with it failed);
    its count stays, and another token that happens to have the id is not touched."""
    store = KubeTokenStore(kube.client, NAMESPACE)
    token = "abcdef.0123456789abcdef"
    await store.add_plain(token)  # as an older gateway stored it: no owner, no limit
    kube.emulator.patch("v1", "Secret", secret_name("abcdef"), {"data": {"usages-count": b64("1")}}, NAMESPACE)
    with pytest.raises(TokenError) as ownerless:  # its node would fail the CRD: refused as broken
        await store.consume(token)
    assert ownerless.value.reason == "invalid-token-data"
    await store.add_plain(token, usage_limit=3, owner="bootstrap")
    data = decoded(kube.secret(secret_name("abcdef")))
    assert (data["owner"], data["usage-limit"], data["usages-count"]) == ("bootstrap", "3", "1")
    assert (await store.consume(token)).owner == "bootstrap"
    assert decoded(kube.secret(secret_name("abcdef")))["usages-count"] == "2"
    await store.add_plain("abcdef.ffffffffffffffff", usage_limit=9, owner="mallory")  # same id, other secret
    data = decoded(kube.secret(secret_name("abcdef")))
    assert (data["owner"], data["usage-limit"]) == ("bootstrap", "3")
    # A hand-edited Secret the gateway cannot read is left alone; the gateway still starts.
    kube.emulator.patch("v1", "Secret", secret_name("abcdef"), {"data": {"usage-limit": b64("unlimited")}}, NAMESPACE)
    await store.add_plain(token, usage_limit=3, owner="bootstrap")
    assert decoded(kube.secret(secret_name("abcdef")))["usage-limit"] == "unlimited"


async def test_token_cli_names_the_bad_flag(kube: Kube) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "koinon_gateway.main", "token", f"--kubeconfig={kube.kubeconfig}",
        "create", "--owner=bob", "--ttl=soon", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2 and out == b""
    assert "--ttl" in err.decode()
    assert not kube.emulator.list_objects("v1", "Secret", NAMESPACE)


async def test_token_cli_revokes_by_a_whole_token_without_echoing_its_secret(kube: Kube) -> None:
    store = KubeTokenStore(kube.client, NAMESPACE)
    token = await store.create(owner="alice")
    for args, code in (
        (["revoke", token], 0),
        (["revoke", "Not/An-Id"], 2),
        (["create", "--owner=a", "--ttl=9999999d"], 2),
    ):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "koinon_gateway.main", "token", f"--kubeconfig={kube.kubeconfig}", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == code, err.decode()
        assert token.split(".")[1] not in (out + err).decode() and b"Traceback" not in err
    with pytest.raises(TokenError) as refused:
        await store.consume(token)
    assert refused.value.reason == "revoked"


def test_parse_ttl() -> None:
    assert parse_ttl("1h30m") == dt.timedelta(minutes=90)
    assert parse_ttl("7d") == dt.timedelta(days=7)
    assert parse_ttl("0") is None
    for bad in ("", "1x", "h", "0s", "-1h"):
        with pytest.raises(ValueError, match="--ttl"):
            parse_ttl(bad)


# ---- CA ----


async def test_concurrent_gateways_end_up_with_one_ca(kube: Kube) -> None:
    stores = [KubeCAStore(kube.client, NAMESPACE) for _ in range(4)]
    bundles = await asyncio.gather(*(load_or_create_ca(s) for s in stores))
    assert len({b.cert_pem for b in bundles}) == 1 and len({b.credential_key for b in bundles}) == 1
    secret = kube.secret(CA_SECRET_NAME)
    assert secret["type"] == "kubernetes.io/tls"
    assert base64.b64decode(secret["data"]["tls.crt"]) == bundles[0].cert_pem


async def test_broken_ca_secret_is_refused_not_replaced(kube: Kube) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": CA_SECRET_NAME, "namespace": NAMESPACE}}
    kube.emulator.create({**secret, "type": "Opaque", "data": {"tls.crt": base64.b64encode(b"x").decode()}})
    with pytest.raises(ValueError, match=r"data\.tls\.key"):
        await load_or_create_ca(KubeCAStore(kube.client, NAMESPACE))


# ---- VolunteerNodes ----


async def test_heartbeat_only_status_writes_are_coalesced(kube: Kube) -> None:
    registry = KubeNodeRegistry(kube.client, heartbeat_write_interval_s=60)
    await registry.create("vn-a", {"owner": "alice", "gpus": []}, {})
    await registry.patch_status(
        "vn-a", {"phase": "NotReady", "connected": True, "lastHeartbeat": "2026-01-01T00:00:00Z"}
    )
    version = kube.emulator.get("koinon.dev/v1alpha1", "VolunteerNode", "vn-a")["metadata"]["resourceVersion"]
    for second in range(1, 10):
        await registry.patch_status(
            "vn-a", {"phase": "NotReady", "connected": True, "lastHeartbeat": f"2026-01-01T00:00:0{second}Z"}
        )
    stored = kube.emulator.get("koinon.dev/v1alpha1", "VolunteerNode", "vn-a")
    assert stored["metadata"]["resourceVersion"] == version and registry.status_writes_skipped == 9
    await registry.patch_status(
        "vn-a", {"phase": "NotReady", "connected": False, "lastHeartbeat": "2026-01-01T00:01:00Z"}
    )
    stored = kube.emulator.get("koinon.dev/v1alpha1", "VolunteerNode", "vn-a")
    assert stored["status"]["connected"] is False and stored["status"]["lastHeartbeat"] == "2026-01-01T00:01:00Z"
    with pytest.raises(KeyError):
        await registry.patch_status("missing", {"phase": "NotReady"})


@dataclass
class KubeGateway:
    gateway: Gateway
    tokens: KubeTokenStore
    registry: KubeNodeRegistry

    async def agent_config(self, state_dir: Path) -> AgentConfig:
        """An agent without Ray, joining this gateway with a new token of alice's."""
        return AgentConfig(
            gateway=self.gateway.agent_target,
            token=await self.tokens.create(owner="alice"),
            state_dir=state_dir,
            ca_pem=self.gateway.ca_pem,
            name_hint="alpha",
            start_ray=False,
            simulate_gpus=1,
            simulate_gpu_memory_mib=8192,
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
        )

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            self.gateway.agent_target,
            grpc.ssl_channel_credentials(self.gateway.ca_pem),
            options=[("grpc.ssl_target_name_override", "koinon-gateway")],
        )


def gateway_config(head_port: int) -> GatewayConfig:
    return GatewayConfig(
        listen="127.0.0.1:0",
        head_address="127.0.0.1",
        head_gcs_port=head_port,
        vip_cidr="127.0.20.0/28",
        port_base=random_port_base(),
        port_block_size=16,
        heartbeat_interval_s=0.2,
        heartbeat_timeout_s=1.0,
        status_write_interval_s=0.2,
        verify_ray_nodes=False,  # no Ray head here; the Ray node id the agent reports is trusted
        namespace=NAMESPACE,
    )


def kube_gateway(
    kube: Kube, head_port: int, tokens: TokenStore | None = None, registry: NodeRegistry | None = None
) -> Gateway:
    """A gateway process as deployed: every store on the Kubernetes API (the emulator's)."""
    return Gateway(
        gateway_config(head_port),
        tokens or KubeTokenStore(kube.client, NAMESPACE),
        registry or KubeNodeRegistry(kube.client),
        KubeCAStore(kube.client, NAMESPACE),
    )


@pytest.fixture
async def kgw(kube: Kube) -> AsyncIterator[KubeGateway]:
    async with echo_server() as head_port:
        tokens, registry = KubeTokenStore(kube.client, NAMESPACE), KubeNodeRegistry(kube.client, 0.5)
        gateway = Gateway(gateway_config(head_port), tokens, registry, KubeCAStore(kube.client, NAMESPACE))
        await gateway.start()
        try:
            yield KubeGateway(gateway, tokens, registry)
        finally:
            await gateway.stop(0)


async def wait_until(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def kubectl_vn(kube: Kube, name: str) -> JSON:
    document: JSON = json.loads(await kube.akubectl("get", "vn", name, "-o", "json"))
    return document


async def test_join_over_grpc_writes_the_volunteernode_through_the_api(kube: Kube, kgw: KubeGateway) -> None:
    token = await kgw.tokens.create(owner="alice", usage_limit=1, region="eu")
    async with kgw.channel() as channel:
        stub = tunnel_stub(channel)
        gpu = pb.Gpu(model="Simulated GPU", memory_mib=8192)
        joined = await stub.Join(pb.JoinRequest(token=token, name_hint="alpha", gpus=[gpu]), timeout=10)
        name, address = joined.assignment.node_name, joined.assignment.address
        node = await kubectl_vn(kube, name)
        assert node["spec"] == {
            "owner": "alice",
            "region": "eu",
            "gpus": [{"model": "Simulated GPU", "memoryMiB": 8192}],
            "cordoned": False,  # the CRD's default, applied by the API server
        }
        assert node["metadata"]["annotations"]["koinon.dev/connection-owner"] == "gateway"
        assert node["metadata"]["labels"]["koinon.dev/join-token"] == token[:6]
        # The token's only use is spent: a second join is refused and creates nothing.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Join(pb.JoinRequest(token=token, name_hint="beta"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "usage-limit" in (refused.value.details() or "")
        assert [n["metadata"]["name"] for n in kube.emulator.list_objects("koinon.dev/v1alpha1", "VolunteerNode")] == [
            name
        ]

        call = stub.Control(metadata=(("authorization", f"Bearer {joined.credential}"),))
        await call.write(
            pb.AgentMessage(register=pb.Register(node_name=name, address=address, gpus=[gpu], agent_version="t-1"))
        )
        assert (await call.read()).HasField("registered")

        answer = asyncio.Event()
        answer.set()

        async def answer_pings() -> None:
            # Keeps reading (cancelling a read would end the call) but answers only while ``answer`` is set.
            while True:
                message = await call.read()
                if isinstance(message, pb.GatewayMessage) and message.HasField("ping") and answer.is_set():
                    heartbeat = pb.Heartbeat(
                        seq=message.ping.seq,
                        echo_seq=message.ping.seq,
                        echo_gateway_time_ns=message.ping.gateway_time_ns,
                        ray_node_id="ab" * 28,
                        ray_state="running",
                    )
                    await call.write(pb.AgentMessage(heartbeat=heartbeat))

        answering = asyncio.ensure_future(answer_pings())
        try:
            ready = await wait_until(lambda: _phase_is(kube, name, "Ready"))
        except BaseException:
            answering.cancel()
            raise
        status = ready["status"]
        assert status["connected"] is True and status["address"] == address
        assert status["rayNodeId"] == "ab" * 28 and status["agentVersion"] == "t-1"
        assert status["gpus"] == [{"model": "Simulated GPU", "memoryMiB": 8192}]
        assert status["latency"]["smoothedMs"] >= 0 and status["latency"]["updatedAt"].endswith("Z")
        assert status["conditions"][0]["type"] == "Ready" and status["conditions"][0]["status"] == "True"
        table = await kube.akubectl("get", "vn", name)
        assert "Ready" in table and "alice" in table and address in table

        # Heartbeats stop while the stream stays open: the gateway writes NotReady to the API.
        answer.clear()
        not_ready = await wait_until(lambda: _phase_is(kube, name, "NotReady"), timeout=5)
        assert not_ready["status"]["connected"] is False
        assert not_ready["status"]["conditions"][0]["reason"] == "HeartbeatTimeout"
        answering.cancel()
        call.cancel()


async def _phase_is(kube: Kube, name: str, phase: str) -> JSON | None:
    node = await kubectl_vn(kube, name)
    return node if (node.get("status") or {}).get("phase") == phase else None


async def test_deleting_the_volunteernode_revokes_the_agent(kube: Kube, kgw: KubeGateway, tmp_path: Path) -> None:
    config = await kgw.agent_config(tmp_path / "agent")
    agent = Agent(config)
    task = asyncio.ensure_future(agent.run())
    try:
        await asyncio.wait_for(agent.connected.wait(), 15)
        assert agent.identity is not None
        name = agent.identity.node_name
        assert (await kubectl_vn(kube, name))["status"]["connected"] is True
        # A connection the node holds open by itself (a hostile agent would keep it) ends too.
        async with kgw.channel() as channel:
            held = tunnel_stub(channel).Connect(metadata=(("authorization", f"Bearer {agent.identity.credential}"),))
            await held.write(pb.Frame(dial=pb.Dial(host="127.0.0.1", port=kgw.gateway.config.head_gcs_port)))
            assert (await asyncio.wait_for(held.read(), 5)).dial_result.ok
            await kube.akubectl("delete", "vn", name, "--wait=false")
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(held.read(), 10)
            assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The live Control stream is told that the node is gone, and the agent stops for good.
        with pytest.raises(JoinRefused, match="no longer exists"):
            await asyncio.wait_for(task, 15)
        assert name not in kgw.gateway.sessions.by_name
        assert kgw.gateway.metrics.refused_streams["node-deleted-while-connected"] == 1
        assert kube.emulator.list_objects("koinon.dev/v1alpha1", "VolunteerNode") == []

        # The deleted node's address went back to the pool: the next volunteer gets it (the pool
        # hands out its lowest free address) and works with it, while the old credential stays refused.
        old_address = agent.identity.address
        newcomer = Agent(
            dataclasses.replace(
                config, token=await kgw.tokens.create(owner="bob"), state_dir=tmp_path / "b", name_hint="beta"
            )
        )
        second = asyncio.ensure_future(newcomer.run())
        try:
            await asyncio.wait_for(newcomer.connected.wait(), 15)
            assert newcomer.identity is not None and newcomer.identity.address == old_address
            assert newcomer.identity.node_name != name
            status = (await kubectl_vn(kube, newcomer.identity.node_name))["status"]
            assert status["connected"] is True and status["address"] == old_address
            with pytest.raises(JoinRefused, match="no longer exists"):
                await asyncio.wait_for(Agent(config).run(), 15)
        finally:
            second.cancel()
    finally:
        task.cancel()


async def test_a_register_held_back_across_the_nodes_deletion_is_refused(kube: Kube, kgw: KubeGateway) -> None:
    # A deleted node's agent opens Control with its still-valid credential and sends Register only
    # after the node is gone and its address belongs to a newcomer: it must not win that address.
    async def join(owner: str, hint: str) -> pb.JoinResponse:
        async with kgw.channel() as channel:
            response: pb.JoinResponse = await tunnel_stub(channel).Join(
                pb.JoinRequest(token=await kgw.tokens.create(owner=owner), name_hint=hint), timeout=10
            )
            return response

    old = await join("mallory", "old")
    address = old.assignment.address
    async with kgw.channel() as channel, kgw.channel() as newcomer_channel:
        metadata = (("authorization", f"Bearer {old.credential}"),)
        held = tunnel_stub(channel).Control(metadata=metadata)
        await asyncio.sleep(0.5)  # past the gateway's first check that the node exists
        await kube.akubectl("delete", "vn", old.assignment.node_name, "--wait=false")
        await wait_until(lambda: kgw.gateway.allocator.holder(address) is None)
        newcomer = await join("bob", "new")
        assert newcomer.assignment.address == address
        live = tunnel_stub(newcomer_channel).Control(metadata=(("authorization", f"Bearer {newcomer.credential}"),))
        await live.write(
            pb.AgentMessage(register=pb.Register(node_name=newcomer.assignment.node_name, address=address))
        )
        assert (await asyncio.wait_for(live.read(), 10)).WhichOneof("msg") == "registered"

        await held.write(pb.AgentMessage(register=pb.Register(node_name=old.assignment.node_name, address=address)))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(held.read(), 10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "node-deleted" in (refused.value.details() or "")
        assert kgw.gateway.sessions.get_by_address(address).node_name == newcomer.assignment.node_name  # type: ignore[union-attr]
        assert kgw.gateway.allocator.holder(address) == newcomer.assignment.node_name
        assert old.assignment.node_name not in kgw.gateway.sessions.by_name
        live.cancel()


async def test_restarted_gateway_keeps_its_ca_and_nodes(kube: Kube) -> None:
    async with echo_server() as head_port:
        first = kube_gateway(kube, head_port)
        await first.start()
        token = await KubeTokenStore(kube.client, NAMESPACE).create(owner="alice")
        async with gateway_channel(first) as channel:
            joined = await tunnel_stub(channel).Join(pb.JoinRequest(token=token, name_hint="alpha"), timeout=10)
        await first.stop(0)
        # A new process: new store objects, state only in the API.
        second = kube_gateway(kube, head_port)
        await second.start()
        try:
            assert second.ca_pem == first.ca_pem
            # The address stays reserved for the node, and its old credential is still accepted.
            assert second.allocator.holder(joined.assignment.address) == joined.assignment.node_name
            assert second.allocator.allocate("another") != joined.assignment.address
            async with gateway_channel(second) as channel:
                call = tunnel_stub(channel).Control(metadata=(("authorization", f"Bearer {joined.credential}"),))
                register = pb.Register(node_name=joined.assignment.node_name, address=joined.assignment.address)
                await call.write(pb.AgentMessage(register=register))
                assert (await call.read()).HasField("registered")
                call.cancel()
        finally:
            await second.stop(0)
    assert len(kube.emulator.list_objects("v1", "Secret", NAMESPACE)) == 2  # the CA and one token


async def test_gateway_deletes_nodes_whose_agent_never_connected(kube: Kube) -> None:
    # A join that is never followed by a connection would hold its VolunteerNode and virtual address
    # for good; a node that connected once, and one made by hand, are not the cleaner's.
    async with echo_server() as head_port:
        config = gateway_config(head_port)
        config.unconnected_node_ttl_s, config.unconnected_node_sweep_s = 1.5, 0.2
        tokens, registry = KubeTokenStore(kube.client, NAMESPACE), KubeNodeRegistry(kube.client)
        gateway = Gateway(config, tokens, registry, KubeCAStore(kube.client, NAMESPACE))
        await gateway.start()
        kgw = KubeGateway(gateway, tokens, registry)
        try:
            await registry.create("by-hand", {"owner": "carol"}, {})
            async with kgw.channel() as channel:
                stub = tunnel_stub(channel)
                idle = await stub.Join(pb.JoinRequest(token=await tokens.create(owner="alice"), name_hint="idle"))
                live = await stub.Join(pb.JoinRequest(token=await tokens.create(owner="bob"), name_hint="live"))
                bearer = (("authorization", f"Bearer {live.credential}"),)
                call = stub.Control(metadata=bearer)
                register = pb.Register(node_name=live.assignment.node_name, address=live.assignment.address)
                await call.write(pb.AgentMessage(register=register))
                assert (await asyncio.wait_for(call.read(), 10)).HasField("registered")
                call.cancel()  # connected once, gone now: NotReady, not deleted
                live_name = live.assignment.node_name
                assert await wait_until(lambda: _status_says(registry, live_name, connected=False), timeout=10)

                idle_name, idle_address = idle.assignment.node_name, idle.assignment.address
                assert await wait_until(lambda: gateway.allocator.holder(idle_address) is None, timeout=10)
                assert await registry.get(idle_name) is None
                await asyncio.sleep(config.unconnected_node_ttl_s + 5 * config.unconnected_node_sweep_s)
                names = {n["metadata"]["name"] for n in await registry.list()}
                assert names == {"by-hand", live.assignment.node_name}
                assert gateway.allocator.holder(live.assignment.address) == live.assignment.node_name
                assert gateway.metrics.unconnected_nodes_deleted == 1
                assert "koinon_gateway_unconnected_nodes_deleted_total 1\n" in gateway.metrics.render()

                # The deleted node's agent is refused, as for any deleted node.
                late = stub.Control(metadata=(("authorization", f"Bearer {idle.credential}"),))
                with pytest.raises(grpc.aio.AioRpcError) as refused:  # refused before or after Register
                    await late.write(pb.AgentMessage(register=pb.Register(node_name=idle_name, address=idle_address)))
                    await asyncio.wait_for(late.read(), 10)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await gateway.stop(0)


async def _status_says(registry: KubeNodeRegistry, name: str, **fields: Any) -> bool:
    node = await registry.get(name)
    status = (node or {}).get("status") or {}
    return all(status.get(key) == value for key, value in fields.items())


async def test_a_node_delete_with_preconditions_spares_a_changed_or_new_object(kube: Kube) -> None:
    registry = KubeNodeRegistry(kube.client)
    uid = await registry.create("vn-a", {"owner": "alice"}, {})
    listed = await registry.get("vn-a")
    assert listed is not None
    as_read = {"uid": uid, "resourceVersion": listed["metadata"]["resourceVersion"]}
    await registry.patch_status("vn-a", {"phase": "Ready", "lastHeartbeat": "2026-12-06T00:00:00Z"})
    assert await registry.delete("vn-a", as_read) is False  # it connected after the read
    assert await registry.get("vn-a") is not None
    assert await registry.delete("vn-a", {"uid": "another-object"}) is False
    assert await registry.delete("vn-a", {"uid": uid}) is True
    assert await registry.get("vn-a") is None
    assert await registry.delete("vn-a", {"uid": uid}) is False


async def test_volunteernodes_are_listed_by_label(kube: Kube) -> None:
    registry = KubeNodeRegistry(kube.client)
    await registry.create("vn-a", {"owner": "alice"}, {"koinon.dev/join-token": "aaaaaa", "koinon.dev/join-key": "1"})
    await registry.create("vn-b", {"owner": "alice"}, {"koinon.dev/join-token": "aaaaaa", "koinon.dev/join-key": "2"})
    await registry.create("vn-c", {"owner": "bob"}, {})
    names = [n["metadata"]["name"] for n in await registry.list({"koinon.dev/join-token": "aaaaaa"})]
    assert sorted(names) == ["vn-a", "vn-b"]
    selected = await registry.list({"koinon.dev/join-token": "aaaaaa", "koinon.dev/join-key": "2"})
    assert [n["metadata"]["name"] for n in selected] == ["vn-b"]
    assert len(await registry.list()) == 3


async def test_a_join_whose_reply_was_lost_is_found_again_through_the_api(kube: Kube) -> None:
    """The retry with the same join id, to a restarted gateway, finds the node by its labels in the
    API and checks the token Secret without counting a second use."""
    join_id = "0123456789abcdef" * 2

    async def join_once(gateway: Gateway, token: str) -> pb.JoinResponse:
        async with gateway_channel(gateway) as channel:
            request = pb.JoinRequest(token=token, name_hint="alpha", join_id=join_id)
            response: pb.JoinResponse = await tunnel_stub(channel).Join(request, timeout=10)
            return response

    async with echo_server() as head_port:
        token = await KubeTokenStore(kube.client, NAMESPACE).create(owner="alice", usage_limit=1)
        first = kube_gateway(kube, head_port)
        await first.start()
        lost = await join_once(first, token)
        await first.stop(0)
        second = kube_gateway(kube, head_port)
        await second.start()
        try:
            again = await join_once(second, token)
        finally:
            await second.stop(0)
    assert (again.assignment.node_name, again.assignment.address) == (
        lost.assignment.node_name,
        lost.assignment.address,
    )
    nodes = kube.emulator.list_objects("koinon.dev/v1alpha1", "VolunteerNode")
    assert [n["metadata"]["name"] for n in nodes] == [lost.assignment.node_name]
    assert join_id not in json.dumps(nodes)  # only its digest is in the labels
    assert decoded(kube.secret(secret_name(token[:6])))["usages-count"] == "1"


class DiesAfterCreate(KubeNodeRegistry):
    """The process dies right after the create landed: the status patch never happens, and
    nothing the dying process would still do (delete the half-made node) reaches the API."""

    async def patch_status(self, name: str, status: Any, uid: str = "") -> None:
        await asyncio.Event().wait()  # never: the process is gone

    async def delete(self, name: str, preconditions: Any = None) -> bool:
        return False  # a dead process deletes nothing


class DeadTokens(KubeTokenStore):
    async def give_back(self, grant: JoinGrant) -> None:
        return None  # a dead process gives nothing back


async def test_a_join_retried_after_its_gateway_died_between_node_and_address_is_counted_once(kube: Kube) -> None:
    """The gateway died after creating the join's VolunteerNode and before writing its address:
    the retry could not get that node back, was counted as a new join, and a one-use token refused
    it "usage-limit" (fatal to the agent), the orphan kept for 24 h. Now the node, once this gateway
    has seen it half-made long enough not to be a live gateway's try, is deleted and the join goes
    on under the use it counted."""
    token = await KubeTokenStore(kube.client, NAMESPACE).create(owner="alice", usage_limit=1)
    join_id = "0123456789abcdef" * 2
    request = pb.JoinRequest(token=token, name_hint="alpha", join_id=join_id)

    async def join(gateway: Gateway, timeout: float) -> Any:
        async with gateway_channel(gateway) as channel:
            try:
                return await tunnel_stub(channel).Join(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                return exc

    def nodes() -> list[JSON]:
        return kube.emulator.list_objects("koinon.dev/v1alpha1", "VolunteerNode")

    async with echo_server() as head_port:
        first = kube_gateway(kube, head_port, DeadTokens(kube.client, NAMESPACE), DiesAfterCreate(kube.client))
        await first.start()
        lost = await join(first, timeout=1.5)
        assert isinstance(lost, grpc.aio.AioRpcError)  # the agent never heard back
        await first.stop(0)
        [half_made] = nodes()
        assert "address" not in (half_made.get("status") or {})
        assert decoded(kube.secret(secret_name(token[:6])))["usages-count"] == "1"
        second = kube_gateway(kube, head_port)
        await second.start()
        try:
            # Just made: it may be another gateway replica's try, still under way. Asked to wait
            # (the agent retries ABORTED), nothing deleted, nothing counted.
            early = await join(second, timeout=10)
            assert isinstance(early, grpc.aio.AioRpcError) and early.code() == grpc.StatusCode.ABORTED
            assert [n["metadata"]["uid"] for n in nodes()] == [half_made["metadata"]["uid"]]
            # The agent came back 2 minutes later, by this gateway's own clock (never the API
            # server's creationTimestamp against it: the two clocks may run minutes apart).
            assert second.service is not None
            second.service.half_made.clock = lambda: time.monotonic() + service.HALF_MADE_JOIN_S
            again = await join(second, timeout=10)  # the agent's retry, same join id
        finally:
            await second.stop(0)
    assert isinstance(again, pb.JoinResponse), f"{again.code()}: {again.details()}"
    [node] = nodes()
    assert node["metadata"]["name"] == again.assignment.node_name
    assert node["metadata"]["uid"] != half_made["metadata"]["uid"]
    assert node["status"]["address"] == again.assignment.address
    assert node["metadata"]["labels"][JOIN_KEY_LABEL] == join_key(join_id)
    assert decoded(kube.secret(secret_name(token[:6])))["usages-count"] == "1"


async def test_deleting_a_tokens_nodes_by_its_label_takes_exactly_the_nodes_it_made(
    kube: Kube, kgw: KubeGateway
) -> None:
    # README: revoking a token leaves the nodes it made; `kubectl delete vn -l
    # koinon.dev/join-token=<id>` cuts them off, and only them.
    token, other = await kgw.tokens.create(owner="alice", usage_limit=2), await kgw.tokens.create(owner="bob")
    await kgw.registry.create("by-hand", {"owner": "carol"}, {})
    async with kgw.channel() as channel:
        stub = tunnel_stub(channel)
        made = [await stub.Join(pb.JoinRequest(token=token, name_hint=f"a{i}"), timeout=10) for i in range(2)]
        kept = await stub.Join(pb.JoinRequest(token=other, name_hint="b"), timeout=10)
        await kgw.tokens.revoke(token[:6])
        out = await kube.akubectl("delete", "vn", "-l", f"{JOIN_TOKEN_LABEL}={token[:6]}", "--wait=false")
        assert all(j.assignment.node_name in out for j in made) and len(out.splitlines()) == 2
        names = {n["metadata"]["name"] for n in kube.emulator.list_objects("koinon.dev/v1alpha1", "VolunteerNode")}
        assert names == {"by-hand", kept.assignment.node_name}
        for joined in made:  # their credentials are refused from now on
            call = stub.Control(metadata=(("authorization", f"Bearer {joined.credential}"),))
            register = pb.Register(node_name=joined.assignment.node_name, address=joined.assignment.address)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.write(pb.AgentMessage(register=register))
                await asyncio.wait_for(call.read(), 10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ---- configuration ----


def test_incluster_config_reads_the_service_account(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "namespace").write_text("koinon-system")
    config = load_incluster_config({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}, tmp_path)
    assert (config.server, config.namespace, config.token_file) == (
        "https://10.0.0.1:443",
        NAMESPACE,
        tmp_path / "token",
    )
    with pytest.raises(ValueError, match="KUBERNETES_SERVICE_HOST"):
        load_incluster_config({}, tmp_path)


def test_kubeconfig_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({"current-context": "x", "contexts": [], "clusters": []}))
    with pytest.raises(ValueError, match="contexts: no entry named 'x'"):
        load_kubeconfig(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_kubeconfig(tmp_path / "absent")


async def test_api_errors_carry_the_status(kube: Kube) -> None:
    with pytest.raises(KubeApiError) as missing:
        await kube.client.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/absent")
    assert missing.value.not_found and missing.value.reason == "NotFound"


async def test_gateway_process_with_kube_store(kube: Kube, tmp_path: Path) -> None:
    """``koinon-gateway --store kube`` as a process: CA Secret created and its certificate published,
    bootstrap token stored hashed."""
    ready = tmp_path / "ready"
    bootstrap = "abcdef.0123456789abcdef"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "koinon_gateway.main", "--store=kube", f"--kubeconfig={kube.kubeconfig}",
        f"--namespace={NAMESPACE}", "--listen=127.0.0.1:0", "--head-proxy-listen=127.0.0.1:0",
        "--admin-listen=127.0.0.1:0", "--head-address=127.0.0.1", f"--bootstrap-token={bootstrap}:1",
        f"--ready-file={ready}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        await wait_until(lambda: ready.exists() and len(ready.read_text().splitlines()) == 4, timeout=30)
        ca_path = Path(ready.read_text().splitlines()[2])
        assert base64.b64decode(kube.secret(CA_SECRET_NAME)["data"]["tls.crt"]) == ca_path.read_bytes()
        # ... and its certificate alone published for `token ca-hash` (test_kube_ca_cert.py).
        published = kube.emulator.get("v1", "ConfigMap", CA_CERT_CONFIGMAP_NAME, NAMESPACE)
        assert published["data"] == {"ca.crt": ca_path.read_text()}
        data = decoded(kube.secret(secret_name("abcdef")))
        assert data["token-secret-sha256"] == hash_secret("0123456789abcdef") and data["usage-limit"] == "1"
        # The bootstrap token joins: its VolunteerNode gets an owner (the CRD requires one).
        target = ready.read_text().splitlines()[0]
        async with grpc.aio.secure_channel(
            target,
            grpc.ssl_channel_credentials(ca_path.read_bytes()),
            options=[("grpc.ssl_target_name_override", "koinon-gateway")],
        ) as channel:
            joined = await tunnel_stub(channel).Join(pb.JoinRequest(token=bootstrap, name_hint="boot"), timeout=10)
        node = await kubectl_vn(kube, joined.assignment.node_name)
        assert node["spec"]["owner"] == "bootstrap"
    finally:
        process.terminate()
        out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, out.decode()
    assert b"0123456789abcdef" not in out


@contextlib.asynccontextmanager
async def join_stub(kube: Kube, tokens: KubeTokenStore) -> AsyncIterator[Any]:
    """A gateway on the emulator's API with ``tokens``, and a Tunnel stub connected to it."""
    async with echo_server() as head_port:
        gateway = Gateway(
            gateway_config(head_port), tokens, KubeNodeRegistry(kube.client), KubeCAStore(kube.client, NAMESPACE)
        )
        await gateway.start()
        try:
            async with gateway_channel(gateway) as channel:
                yield tunnel_stub(channel)
        finally:
            await gateway.stop(0)


async def test_a_token_use_whose_api_answer_was_lost_is_counted_once_for_its_join(kube: Kube) -> None:
    # The Secret write that counts a use lands, but its answer never reaches the gateway (a
    # timeout): the agent hears UNAVAILABLE and retries with the same join id. That retry was
    # refused "usage-limit" (fatal to the agent): a one-use token spent with no node joined.
    tokens = KubeTokenStore(kube.client, NAMESPACE)
    real_replace, answers_to_lose = kube.client.replace, 1

    async def replace_then_lose_the_answer(path: str, body: JSON) -> JSON:
        nonlocal answers_to_lose
        result = await real_replace(path, body)
        if answers_to_lose and "/secrets/" in path:
            answers_to_lose -= 1
            raise TimeoutError("the API server's answer did not arrive in time")
        return result

    kube.client.replace = replace_then_lose_the_answer  # type: ignore[method-assign]
    token = await tokens.create(owner="alice", usage_limit=1)
    async with join_stub(kube, tokens) as stub:
        request = pb.JoinRequest(token=token, name_hint="alpha", join_id="0123456789abcdef" * 2)
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await stub.Join(request, timeout=10)
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE  # the agent retries
        again = await stub.Join(request, timeout=10)  # the agent's retry: same token, same join
        assert again.assignment.node_name
        assert decoded(kube.secret(secret_name(token[:6])))["usages-count"] == "1"
        # Another join with the spent token is still refused.
        with pytest.raises(grpc.aio.AioRpcError) as spent:
            await stub.Join(pb.JoinRequest(token=token, name_hint="beta", join_id="f" * 32), timeout=10)
        assert spent.value.code() == grpc.StatusCode.PERMISSION_DENIED and "usage" in str(spent.value.details())


async def test_a_counted_join_whose_token_expired_before_its_retry_makes_no_node(kube: Kube) -> None:
    # As above, but the token expires between the try whose answer was lost and the retry: expiry
    # is absolute (a kubeadm bootstrap token's is), and the retry would make the node the first try
    # did not. The use stays counted: the volunteer needs a new token either way.
    tokens = KubeTokenStore(kube.client, NAMESPACE)
    real_replace = kube.client.replace
    token = await tokens.create(owner="alice", usage_limit=1)
    secret = f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret_name(token[:6])}"

    async def replace_then_expire_and_lose_the_answer(path: str, body: JSON) -> JSON:
        await real_replace(path, body)
        kube.client.replace = real_replace  # type: ignore[method-assign]
        await kube.client.merge_patch(secret, {"data": {"expiration": b64("2020-01-01T00:00:00Z")}})
        raise TimeoutError("the API server's answer did not arrive in time")

    kube.client.replace = replace_then_expire_and_lose_the_answer  # type: ignore[method-assign]
    async with join_stub(kube, tokens) as stub:
        request = pb.JoinRequest(token=token, name_hint="alpha", join_id="0123456789abcdef" * 2)
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await stub.Join(request, timeout=10)
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await stub.Join(request, timeout=10)
        assert expired.value.code() == grpc.StatusCode.PERMISSION_DENIED and "expired" in str(expired.value.details())
    nodes, _ = await kube.client.list_all("/apis/koinon.dev/v1alpha1/volunteernodes")
    assert nodes == [] and decoded(kube.secret(secret_name(token[:6])))["usages-count"] == "1"


async def test_a_spent_token_makes_no_second_node_by_resending_a_finished_joins_id(kube: Kube) -> None:
    # A use counted for a join is honoured once more only for a retry of a join that made no node:
    # resending the join id of a join that got its node (and connected) must count a new use.
    tokens = KubeTokenStore(kube.client, NAMESPACE)
    token = await tokens.create(owner="alice", usage_limit=1)
    async with join_stub(kube, tokens) as stub:
        request = pb.JoinRequest(token=token, name_hint="alpha", join_id="0123456789abcdef" * 2)
        name = (await stub.Join(request, timeout=10)).assignment.node_name
        kube.emulator.patch(
            "koinon.dev/v1alpha1", "VolunteerNode", name,
            {"status": {"phase": "Ready", "lastHeartbeat": "2026-01-01T00:00:00Z"}},
            subresource="status",
        )  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as spent:
            await stub.Join(request, timeout=10)
        assert spent.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert decoded(kube.secret(secret_name(token[:6])))["usages-count"] == "1"


async def test_a_spent_token_makes_no_node_by_resending_the_join_id_of_a_node_an_admin_deleted(kube: Kube) -> None:
    """As above, but the admin deletes the node as the README says (`kubectl delete vn -l
    koinon.dev/join-token=<id>`) before the join id is resent: with no node of the join left, the
    gateway asked the Secret to honour the use counted for the id (17 minutes), and it did. The
    key is dropped from the Secret once the node is made."""
    tokens = KubeTokenStore(kube.client, NAMESPACE)
    token = await tokens.create(owner="mallory", usage_limit=1)
    async with join_stub(kube, tokens) as stub:
        request = pb.JoinRequest(token=token, name_hint="alpha", join_id="0123456789abcdef" * 2)
        first = (await stub.Join(request, timeout=10)).assignment.node_name
        assert decoded(kube.secret(secret_name(token[:6])))["counted-joins"] == ""
        kube.emulator.patch(
            "koinon.dev/v1alpha1", "VolunteerNode", first,
            {"status": {"phase": "Ready", "lastHeartbeat": "2026-01-01T00:00:00Z"}},
            subresource="status",
        )  # fmt: skip
        await kube.akubectl("delete", "vn", "-l", f"koinon.dev/join-token={token[:6]}")
        with pytest.raises(grpc.aio.AioRpcError) as spent:
            await stub.Join(request, timeout=10)
        assert spent.value.code() == grpc.StatusCode.PERMISSION_DENIED and "usage-limit" in str(spent.value.details())
    nodes, _ = await kube.client.list_all("/apis/koinon.dev/v1alpha1/volunteernodes")
    assert nodes == [] and decoded(kube.secret(secret_name(token[:6])))["usages-count"] == "1"


def test_a_counted_join_is_honoured_for_its_retries_only_for_a_while() -> None:
    from koinon_gateway.kube_tokens import _counted_since
    from koinon_gateway.tokens import COUNTED_JOIN_HONOURED_S

    counted = ["aaaa@1000", "bbbb@2000", "cccc"]
    assert _counted_since(counted, "aaaa", 1000 + COUNTED_JOIN_HONOURED_S - 1)
    assert not _counted_since(counted, "aaaa", 1000 + COUNTED_JOIN_HONOURED_S)
    assert not _counted_since(counted, "cccc", 1000)  # no time (written before times were kept)
    assert not _counted_since(counted, "dddd", 1000)


async def test_a_token_secret_deleted_while_its_join_forgets_the_counted_use_leaves_no_orphan(kube: Kube) -> None:
    """Deleting the token Secret revokes it for new joins. A join that had counted its use and
    recorded its node finishes: node_made's write answered 404 (the Secret gone between its read
    and its write) means nothing is left to forget. It was answered "retry", which the agent's
    retry was refused for good, and the node held its address until the unconnected-node TTL."""
    from koinon_gateway.kube_client import secret_path

    tokens = KubeTokenStore(kube.client, NAMESPACE)
    token = await tokens.create(owner="alice", usage_limit=1)
    path = secret_path(NAMESPACE, secret_name(token[:6]))
    real_replace, puts = kube.client.replace, []

    async def replace(target: str, body: JSON) -> JSON:
        if target == path:
            puts.append(target)
            if len(puts) == 2:  # node_made's write: the admin deletes the Secret just before it
                await kube.client.delete(path)
        return await real_replace(target, body)

    kube.client.replace = replace  # type: ignore[method-assign,assignment]
    request = pb.JoinRequest(token=token, name_hint="alpha", join_id="0123456789abcdef" * 2)
    async with join_stub(kube, tokens) as stub:
        joined = await stub.Join(request, timeout=10)
    assert len(puts) == 2 and joined.assignment.node_name.startswith("alpha-")
