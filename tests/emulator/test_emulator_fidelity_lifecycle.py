"""Deletion and restart as kube-apiserver does them: dry-run deletes, immortal namespaces, CRD cleanup
that waits for its objects' finalizers, objects of a version no longer served, float multipleOf."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from koinon_emulator import KubeEmulator
from koinon_emulator.resources import CRD_RESOURCE
from koinon_emulator.schema import admit

from .helpers import GROUP, WIDGETS, Kubectl, widget, widget_crd

pytestmark = pytest.mark.timeout(120)

NS_WIDGETS = f"{WIDGETS}/namespaces/default/widgets"
MERGE = {"Content-Type": "application/merge-patch+json"}
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"


async def _json(response: aiohttp.ClientResponse) -> Any:
    return await response.json(content_type=None)


async def test_delete_with_dry_run_in_delete_options_body_keeps_object(
    http: aiohttp.ClientSession, with_widgets: KubeEmulator
) -> None:
    """kubectl (and client-go's DeleteWithOptions) send dryRun in the DeleteOptions body, not the query."""
    created = await http.post(NS_WIDGETS, json=widget("dry"))
    assert created.status == 201
    response = await http.delete(
        f"{NS_WIDGETS}/dry", json={"kind": "DeleteOptions", "apiVersion": "v1", "dryRun": ["All"]}
    )
    assert response.status == 200
    assert (await http.get(f"{NS_WIDGETS}/dry")).status == 200, "a dry-run delete removed the object"


def test_kubectl_delete_dry_run_server_keeps_object(kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(widget_crd()))
    kubectl.run("wait", "--for=condition=Established", f"crd/widgets.{GROUP}", "--timeout=10s")
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(widget("dry-kubectl")))
    result = kubectl.run("delete", "widget", "dry-kubectl", "--dry-run=server")
    assert "(server dry run)" in result.stdout
    still = kubectl.run("get", "widget", "dry-kubectl", check=False)
    assert still.returncode == 0, f"kubectl delete --dry-run=server really deleted it: {still.stderr}"


@pytest.mark.parametrize("name", ["default", "kube-system", "kube-public"])
async def test_system_namespaces_may_not_be_deleted(http: aiohttp.ClientSession, name: str) -> None:
    response = await http.delete(f"/api/v1/namespaces/{name}")
    body = await _json(response)
    assert response.status == 403, body
    assert (await http.get(f"/api/v1/namespaces/{name}")).status == 200


async def test_object_of_unserved_version_survives_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    crd = widget_crd()
    beta = copy.deepcopy(crd["spec"]["versions"][0])
    beta.update(name="v1beta1", storage=False)
    crd["spec"]["versions"].append(beta)

    first = KubeEmulator(state_file=state)
    await first.start()
    first.apply_crd(crd)
    old = widget("made-in-beta")
    old["apiVersion"] = f"{GROUP}/v1beta1"
    first.create(old)
    # The usual migration: stop serving v1beta1 once clients moved to v1 (v1 is the storage version).
    stored_crd = copy.deepcopy(first.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", f"widgets.{GROUP}"))
    stored_crd["spec"]["versions"][1]["served"] = False
    first.service.update(CRD_RESOURCE, None, stored_crd["metadata"]["name"], stored_crd)
    assert [w["metadata"]["name"] for w in first.list_objects(f"{GROUP}/v1", "Widget")] == ["made-in-beta"]
    await first.stop()

    second = KubeEmulator(state_file=state)
    await second.start()
    try:
        names = [w["metadata"]["name"] for w in second.list_objects(f"{GROUP}/v1", "Widget")]
    finally:
        await second.stop()
    assert names == ["made-in-beta"], "the restart dropped an object kube-apiserver keeps in its storage version"


@pytest.mark.parametrize("value", [0.3, 0.7])
def test_multiple_of_fractional_factor_accepts_exact_multiples(value: float) -> None:
    schema = {"type": "object", "properties": {"spec": {"type": "object", "properties": {
        "cpu": {"type": "number", "multipleOf": 0.1}}}}}  # fmt: skip
    result = admit({"spec": {"cpu": value}}, schema)
    assert result.causes == [], [c.render() for c in result.causes]


async def test_crd_deletion_respects_object_finalizers(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    body = widget("held")
    body["metadata"]["finalizers"] = ["example.com/cleanup"]
    assert (await http.post(NS_WIDGETS, json=body)).status == 201
    await http.delete(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.{GROUP}")
    response = await http.get(f"{NS_WIDGETS}/held")
    assert response.status == 200, "the finalized object vanished with its CRD"
    held = await _json(response)
    assert held["metadata"].get("deletionTimestamp")
    crd_url = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.{GROUP}"
    crd = await _json(await http.get(crd_url))
    assert crd["metadata"].get("deletionTimestamp"), "the CRD should be Terminating while objects remain"
    refused = await http.post(NS_WIDGETS, json=widget("late"))
    assert refused.status == 405, await _json(refused)

    # The operator's delete handler runs and lets go: the object, then the CRD, are gone.
    released = await http.patch(f"{NS_WIDGETS}/held", json={"metadata": {"finalizers": None}}, headers=MERGE)
    assert released.status == 200, await _json(released)
    assert (await http.get(f"{NS_WIDGETS}/held")).status == 404
    assert (await http.get(crd_url)).status == 404


async def test_crd_deletion_without_finalized_objects_is_immediate(
    http: aiohttp.ClientSession, with_widgets: KubeEmulator
) -> None:
    assert (await http.post(NS_WIDGETS, json=widget("plain"))).status == 201
    crd_url = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.{GROUP}"
    assert (await http.delete(crd_url)).status == 200
    assert (await http.get(crd_url)).status == 404
    assert (await http.get(f"{NS_WIDGETS}/plain")).status == 404


@pytest.mark.parametrize("key", ["uid", "resourceVersion"])
async def test_an_empty_delete_precondition_is_a_conflict(http: aiohttp.ClientSession, key: str) -> None:
    """DeleteOptions.preconditions' fields are *string: "" is set, and storage.Preconditions.Check
    compares it (409 "Precondition failed: ..."). Before 2026-12-07 the emulator ignored it and
    deleted the object."""
    assert (await http.post(CONFIGMAPS, json={"metadata": {"name": "pre"}})).status == 201
    response = await http.delete(f"{CONFIGMAPS}/pre", json={"preconditions": {key: ""}})
    assert response.status == 409, response.status
    assert (await http.get(f"{CONFIGMAPS}/pre")).status == 200
    assert (await http.delete(f"{CONFIGMAPS}/pre", json={"preconditions": {key: None}})).status == 200
