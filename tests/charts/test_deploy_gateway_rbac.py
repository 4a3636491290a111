"""Every Kubernetes API call the gateway *server* makes at start-up must be allowed by its
Role/ClusterRole in manifests/gateway/rbac.yaml.

The server path exercised here is the one a platform team hits when it runs the gateway with
``--bootstrap-token`` (the Role's own comment lists "--bootstrap-token Secrets" as something the
server does) and later restarts it with a different usage limit or owner for that token:
``open_stores`` -> ``KubeTokenStore.add_plain`` merge-PATCHes the existing token Secret
(operator/koinon_gateway/kube_tokens.py). Until 2026-12-06 the Role granted no ``patch`` on Secrets,
so in a real cluster that restart got 403 Forbidden and the gateway crash-looped.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from koinon_emulator.kubeconfig import write_kubeconfig
from koinon_emulator.server import KubeEmulator
from koinon_gateway import kube_client
from koinon_gateway.main import build_parser, open_stores

from .helpers import MANIFESTS, REPO, Manifest, Tools, parse_documents

pytestmark = pytest.mark.timeout(120)
NAMESPACE = "koinon-system"
TOKEN = "abcdef.0123456789abcdef"


def _verb(method: str, path: str, params: dict[str, str] | None) -> tuple[str, str, str]:
    """(apiGroup, resource[/subresource], RBAC verb) of one request, as the API server authorizes it."""
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
    return group, full, verb


def _allowed(rules: list[Manifest], group: str, resource: str, verb: str) -> bool:
    return any(
        group in r["apiGroups"] and resource in r["resources"] and (verb in r["verbs"] or "*" in r["verbs"])
        for r in rules
    )


@pytest.fixture(scope="module")
def rendered(tools: Tools) -> list[Manifest]:
    result = tools.run(tools.kubectl, "kustomize", str(MANIFESTS))
    assert result.returncode == 0, result.stderr
    return parse_documents(result.stdout)


@pytest.fixture(scope="module")
def gateway_rules(rendered: list[Manifest]) -> list[Manifest]:
    docs = rendered
    rules: list[Manifest] = []
    for doc in docs:
        if doc["kind"] in ("Role", "ClusterRole") and doc["metadata"]["name"] == "koinon-gateway":
            rules += doc["rules"]
    return rules


async def test_gateway_restarted_with_a_changed_bootstrap_token_stays_within_its_rbac(
    gateway_rules: list[Manifest], rendered: list[Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator = KubeEmulator()
    url = await emulator.start()
    try:
        for crd in sorted((REPO / "manifests" / "crds").glob("*.yaml")):
            emulator.apply_crd(yaml.safe_load(crd.read_text()))
        emulator.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url, namespace=NAMESPACE)

        calls: list[tuple[str, str, str]] = []
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

        # First start, then a restart where the platform team raised the token's usage limit.
        for flag in (f"{TOKEN}:3", f"{TOKEN}:10"):
            async with open_stores(args(flag)):
                pass
    finally:
        await emulator.stop()

    denied = sorted({c for c in calls if not _allowed(gateway_rules, *c)})
    assert not denied, f"the gateway server makes API calls its Role/ClusterRole does not allow: {denied}"
