"""Every Kubernetes API call the gateway *server* makes at start-up must be allowed by its
Role/ClusterRole in manifests/gateway/rbac.yaml.

The server path exercised here is the one a platform team hits when it runs the gateway with
``--bootstrap-token`` (the Role's own comment lists "--bootstrap-token Secrets" as something the
server does) and later restarts it with a different usage limit or owner for that token:
``open_stores`` -> ``KubeTokenStore.add_plain`` merge-PATCHes the existing token Secret
(operator/koinon_gateway/kube_tokens.py). Until 2026-12-06 the Role granted no ``patch`` on Secrets,
so in a real cluster that restart got 403 Forbidden and the gateway crash-looped.

Each start also loads the CA and publishes its certificate in ConfigMap koinon-gateway-ca-cert
(kube_ca.py; one planted immutable is deleted and created again), and the platform team's
`koinon-gateway token create|ca-hash` must work under koinon-gateway-token-issuer
(manifests/gateway/token-roles.yaml), which reads no Secret: rules are matched with their
resourceNames, as RBAC matches them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from koinon_emulator.kubeconfig import write_kubeconfig
from koinon_emulator.server import KubeEmulator
from koinon_gateway import kube_client, token_cli
from koinon_gateway.kube_ca import CA_CERT_CONFIGMAP_NAME, KubeCAStore
from koinon_gateway.kube_client import KubeApiError, KubeClient, load_kubeconfig
from koinon_gateway.main import build_parser, open_stores
from koinon_gateway.pki import ca_cert_hash, load_or_create_ca

from .helpers import MANIFESTS, REPO, Manifest, Tools, parse_documents

pytestmark = pytest.mark.timeout(120)
NAMESPACE = "koinon-system"
TOKEN = "abcdef.0123456789abcdef"


Call = tuple[str, str, str, str | None]


def _verb(method: str, path: str, params: dict[str, str] | None) -> Call:
    """(apiGroup, resource[/subresource], RBAC verb, object name) of one request, as the API server
    authorizes it."""
    parts = urlsplit(path).path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    if rest and rest[0] == "namespaces" and len(rest) > 2:
        rest = rest[2:]
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
    full = f"{resource}/{sub}" if sub else resource
    verb = {
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }.get(method)
    if method == "GET":
        verb = "get" if name else ("watch" if (params or {}).get("watch") == "true" else "list")
    assert verb
    return group, full, verb, name


def _allowed(rules: list[Manifest], group: str, resource: str, verb: str, name: str | None) -> bool:
    """As RBAC decides: a rule with resourceNames allows only requests naming one of them (never a
    create or a list, which name no object)."""
    return any(
        group in r["apiGroups"]
        and resource in r["resources"]
        and (verb in r["verbs"] or "*" in r["verbs"])
        and ("resourceNames" not in r or name in r["resourceNames"])
        for r in rules
    )


@pytest.fixture(scope="module")
def rendered(tools: Tools) -> list[Manifest]:
    result = tools.run(tools.kubectl, "kustomize", str(MANIFESTS))
    assert result.returncode == 0, result.stderr
    return parse_documents(result.stdout)


def _rules(rendered: list[Manifest], name: str) -> list[Manifest]:
    rules: list[Manifest] = []
    for doc in rendered:
        if doc["kind"] in ("Role", "ClusterRole") and doc["metadata"]["name"] == name:
            rules += doc["rules"]
    return rules


@pytest.fixture(scope="module")
def gateway_rules(rendered: list[Manifest]) -> list[Manifest]:
    return _rules(rendered, "koinon-gateway")


@contextlib.asynccontextmanager
async def emulated_cluster(tmp_path: Path) -> AsyncIterator[tuple[KubeEmulator, Path]]:
    emulator = KubeEmulator()
    url = await emulator.start()
    try:
        for crd in sorted((REPO / "manifests" / "crds").glob("*.yaml")):
            emulator.apply_crd(yaml.safe_load(crd.read_text()))
        emulator.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        yield emulator, write_kubeconfig(tmp_path / "kubeconfig", url, namespace=NAMESPACE)
    finally:
        await emulator.stop()


async def test_gateway_restarted_with_a_changed_bootstrap_token_stays_within_its_rbac(
    gateway_rules: list[Manifest], rendered: list[Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with emulated_cluster(tmp_path) as (emulator, kubeconfig):
        calls: list[Call] = []
        original = kube_client.KubeClient.request

        async def recording(self: Any, method: str, path: str, body: Any = None, params: Any = None, **kw: Any) -> Any:
            calls.append(_verb(method, path, params))
            return await original(self, method, path, body, params, **kw)

        monkeypatch.setattr(kube_client.KubeClient, "request", recording)

        deployment = next(
            d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "koinon-gateway"
        )
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        # The Deployment's own flags (the namespace resolved as the kubelet does), plus a bootstrap token.
        base = [a.replace("$(POD_NAMESPACE)", NAMESPACE) for a in container["args"]]
        base = [a for a in base if not a.startswith("--state-dir=")] + [f"--state-dir={tmp_path / 'state'}"]

        def args(flag: str) -> argparse.Namespace:
            return build_parser().parse_args([*base, f"--kubeconfig={kubeconfig}", f"--bootstrap-token={flag}"])

        # First start, then restarts where the platform team raised the token's usage limit; each
        # start loads the CA (creates it first) and publishes its certificate, which a restart
        # finds changed (by hand) and writes again, and then changed and made immutable (planted),
        # which it can only delete and create again.
        planted = ({"data": {"ca.crt": "edited"}}, {"data": {"ca.crt": "planted"}, "immutable": True}, None)
        for flag, edit in zip((f"{TOKEN}:3", f"{TOKEN}:10", f"{TOKEN}:11"), planted, strict=True):
            async with open_stores(args(flag)) as (_, _, ca_store):
                await load_or_create_ca(ca_store)
            if edit is not None:
                emulator.patch("v1", "ConfigMap", CA_CERT_CONFIGMAP_NAME, edit, NAMESPACE)
        assert not emulator.get("v1", "ConfigMap", CA_CERT_CONFIGMAP_NAME, NAMESPACE).get("immutable")
    assert ("", "configmaps", "update", CA_CERT_CONFIGMAP_NAME) in calls
    assert ("", "configmaps", "delete", CA_CERT_CONFIGMAP_NAME) in calls

    denied = sorted({c for c in calls if not _allowed(gateway_rules, *c)})
    assert not denied, f"the gateway server makes API calls its Role/ClusterRole does not allow: {denied}"


async def test_token_issuers_create_tokens_and_read_the_ca_hash_within_their_role(
    rendered: list[Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`koinon-gateway token create` and `ca-hash` under koinon-gateway-token-issuer alone (the API
    refuses, 403, what it does not allow): both work, and the CA Secret (its private key, the
    credential-signing key) is never read. `list` and `revoke` are refused: they need Secret list
    and patch, which would give the CA Secret too (manifests/gateway/token-roles.yaml)."""
    rules = _rules(rendered, "koinon-gateway-token-issuer")
    async with emulated_cluster(tmp_path) as (_, kubeconfig):
        client = KubeClient(load_kubeconfig(kubeconfig))
        try:
            bundle = await load_or_create_ca(KubeCAStore(client, NAMESPACE))  # the gateway, at its start
        finally:
            await client.close()
        denied: list[Call] = []
        original = kube_client.KubeClient.request

        async def authorized(self: Any, method: str, path: str, body: Any = None, params: Any = None, **kw: Any) -> Any:
            call = _verb(method, path, params)
            if not _allowed(rules, *call):
                denied.append(call)
                raise KubeApiError(403, "Forbidden", f"{call} is not allowed")
            return await original(self, method, path, body, params, **kw)

        monkeypatch.setattr(kube_client.KubeClient, "request", authorized)

        def cli(*args: str) -> int:
            return token_cli.main([f"--kubeconfig={kubeconfig}", f"--namespace={NAMESPACE}", *args])

        assert await asyncio.to_thread(cli, "create", "--owner=alice") == 0
        out, err = capsys.readouterr()
        token = out.strip()
        assert f"--ca-cert-hash {ca_cert_hash(bundle.cert_pem)}" in err
        assert await asyncio.to_thread(cli, "ca-hash") == 0
        assert capsys.readouterr().out.strip() == ca_cert_hash(bundle.cert_pem)
        assert not denied
        assert await asyncio.to_thread(cli, "list") == 1
        assert await asyncio.to_thread(cli, "revoke", token.split(".")[0]) == 1
    assert {(resource, verb) for _, resource, verb, _ in denied} == {("secrets", "list"), ("secrets", "patch")}
