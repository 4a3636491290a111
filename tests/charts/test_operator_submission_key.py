"""The key of the operator's Ray submission ids (reconciler.keyed_submission_nonce): kept in Secret
koinon-operator-submission-key in the operator's namespace, made at its first start, read again by
every later start and every other replica; within the Role manifests/operator/rbac.yaml gives it."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kopf
import pytest
from koinon_emulator.kubeconfig import write_kubeconfig
from koinon_emulator.server import KubeEmulator
from koinon_operator.kube import SUBMISSION_KEY_SECRET, get_or_create_submission_key
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.client.rest import RESTClientObject
from kubernetes.config import kube_config

from .helpers import MANIFESTS, Manifest, Tools, parse_documents
from .test_deploy_gateway_rbac import Call, _allowed, _verb

pytestmark = pytest.mark.timeout(120)
NAMESPACE = "koinon-system"


@pytest.fixture(scope="module")
def rendered(tools: Tools) -> list[Manifest]:
    result = tools.run(tools.kubectl, "kustomize", str(MANIFESTS))
    assert result.returncode == 0, result.stderr
    return parse_documents(result.stdout)


def _find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_the_operator_may_read_only_its_own_key_secret(rendered: list[Manifest]) -> None:
    """A namespaced Role: get by name (no list: no other Secret of the namespace, the Ray token's
    or the gateway's CA, is read), and create (which RBAC cannot limit by name)."""
    role = _find(rendered, "Role", "koinon-operator-submission-key")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [SUBMISSION_KEY_SECRET], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]
    binding = _find(rendered, "RoleBinding", "koinon-operator-submission-key")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "koinon-operator", "namespace": NAMESPACE}]
    assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) == ("Role", "koinon-operator-submission-key")


@pytest.fixture
async def emulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KubeEmulator]:
    """An API emulator with the operator's namespace, the kubernetes client pointed at it."""
    emulator = KubeEmulator()
    url = await emulator.start()
    try:
        emulator.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url, namespace=NAMESPACE)
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield emulator
    finally:
        await emulator.stop()


def _recorded(monkeypatch: pytest.MonkeyPatch, rules: list[Manifest]) -> list[Call]:
    """Every request of the kubernetes client from now on, as RBAC sees it; one the rules do not
    allow is refused (403), as the API server would."""
    calls: list[Call] = []
    original: Any = RESTClientObject.request

    def request(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        call = _verb(method, urlsplit(url).path, None)
        calls.append(call)
        if not _allowed(rules, *call):
            raise ApiException(status=403, reason=f"Forbidden: {call}")
        return original(self, method, url, *args, **kwargs)

    monkeypatch.setattr(RESTClientObject, "request", request)
    return calls


async def test_the_first_start_makes_the_key_and_every_later_one_reads_it_within_the_role(
    emulated: KubeEmulator, rendered: list[Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _recorded(monkeypatch, _find(rendered, "Role", "koinon-operator-submission-key")["rules"])
    first = await asyncio.to_thread(get_or_create_submission_key, NAMESPACE)
    assert len(first) == 32
    stored = emulated.get("v1", "Secret", SUBMISSION_KEY_SECRET, NAMESPACE)
    assert base64.b64decode(stored["data"]["key"]) == first
    again = await asyncio.to_thread(get_or_create_submission_key, NAMESPACE)  # a restart, another replica
    assert again == first
    assert calls == [
        ("", "secrets", "get", SUBMISSION_KEY_SECRET),
        ("", "secrets", "create", None),
        ("", "secrets", "get", SUBMISSION_KEY_SECRET),
    ]


async def test_a_replica_that_loses_the_race_to_create_the_key_uses_the_winners(
    emulated: KubeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas starting together both find no Secret; the one whose create comes second (409)
    reads the winner's key, so both name an attempt's Ray submissions alike."""
    winner = base64.b64encode(bytes(range(32))).decode()
    original = client.CoreV1Api.read_namespaced_secret
    reads: list[str] = []

    def read(self: Any, name: str, namespace: str, **kwargs: Any) -> Any:
        reads.append(name)
        if len(reads) == 1:  # absent when first read; the other replica creates it right after
            emulated.create(
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                 "data": {"key": winner}}
            )  # fmt: skip
            raise ApiException(status=404, reason="NotFound")
        return original(self, name, namespace, **kwargs)

    monkeypatch.setattr(client.CoreV1Api, "read_namespaced_secret", read)
    assert await asyncio.to_thread(get_or_create_submission_key, NAMESPACE) == bytes(range(32))
    assert len(reads) == 2


async def test_a_key_secret_too_short_to_be_a_key_stops_the_start(emulated: KubeEmulator) -> None:
    """Refused, not replaced (nor used: it could be guessed): whoever wrote it sees why."""
    emulated.create(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SUBMISSION_KEY_SECRET, "namespace": NAMESPACE},
         "data": {"key": base64.b64encode(b"short").decode()}}
    )  # fmt: skip
    with pytest.raises(kopf.PermanentError, match="fix or delete the Secret"):
        await asyncio.to_thread(get_or_create_submission_key, NAMESPACE)


async def test_a_start_without_the_role_stops_with_a_permanent_error(
    emulated: KubeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator whose manifests predate the Role (403): it exits saying so, not retried for
    ever looking alive."""
    _recorded(monkeypatch, [])
    with pytest.raises(kopf.PermanentError, match=r"rbac\.yaml"):
        await asyncio.to_thread(get_or_create_submission_key, NAMESPACE)
