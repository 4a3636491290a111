"""Patch semantics as kube-apiserver (v1.30) has them: no strategic merge patch for custom resources,
and strategic merge patches that merge built-in lists by key.

Each test states what the real API server does (the emulator differed before 2026-12-06).
"""

from __future__ import annotations

from typing import Any

import aiohttp
from koinon_emulator import KubeEmulator

from .helpers import widget

NS_WIDGETS = "/apis/test.koinon.dev/v1/namespaces/default/widgets"
SMP = {"Content-Type": "application/strategic-merge-patch+json"}
DEPLOYMENTS = "/apis/apps/v1/namespaces/default/deployments"
JSON_PATCH = {"Content-Type": "application/json-patch+json"}


async def _json(response: aiohttp.ClientResponse) -> Any:
    return await response.json(content_type=None)


async def test_strategic_merge_patch_on_custom_resource_is_415(
    http: aiohttp.ClientSession, with_widgets: KubeEmulator
) -> None:
    """kube-apiserver refuses strategic merge patch for custom resources (they have no patchMergeKey
    metadata): 415 UnsupportedMediaType, "accepted media types include: application/json-patch+json,
    application/merge-patch+json, application/apply-patch+yaml" (kubernetes/kubernetes#53558; the
    same 415 that kubernetes-client/python#866 hit with kopf). So `kubectl patch aij x -p ...`
    without --type=merge fails on a real cluster; the emulator accepted it before 2026-12-06."""
    assert (await http.post(NS_WIDGETS, json=widget("smp"))).status == 201
    response = await http.patch(f"{NS_WIDGETS}/smp", headers=SMP, json={"spec": {"size": 5}})
    assert response.status == 415, await response.text()
    assert (await _json(response))["reason"] == "UnsupportedMediaType"


async def test_strategic_merge_patch_merges_containers_by_name(http: aiohttp.ClientSession) -> None:
    """For built-in kinds kubectl apply (client-side) sends a strategic merge patch in which
    `containers` is merged by its patchMergeKey `name` (and `env` by `name`): only the changed
    fields of the container are sent. kube-apiserver keeps the container's other fields (image,
    ports...). Before 2026-12-06 the emulator replaced the whole list with the partial container, silently dropping
    `image`; a re-apply of the charts' Deployments (tests/charts/test_apply_emulator.py) would
    then store a Deployment a real server would reject (containers[0].image: Required value)."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "agent"},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {
                "metadata": {"labels": {"app": "agent"}},
                "spec": {
                    "containers": [
                        {
                            "name": "agent",
                            "image": "ghcr.io/koinon/agent:1",
                            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                        }
                    ]
                },
            },
        },
    }
    assert (await http.post(DEPLOYMENTS, json=deployment)).status == 201
    # What `kubectl apply` sends after B's value changed in the manifest.
    patch = {
        "spec": {
            "template": {
                "spec": {
                    "$setElementOrder/containers": [{"name": "agent"}],
                    "containers": [
                        {
                            "$setElementOrder/env": [{"name": "A"}, {"name": "B"}],
                            "env": [{"name": "B", "value": "3"}],
                            "name": "agent",
                        }
                    ],
                }
            }
        }
    }
    response = await http.patch(f"{DEPLOYMENTS}/agent", headers=SMP, json=patch)
    assert response.status == 200, await response.text()
    (container,) = (await _json(response))["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/koinon/agent:1"
    assert container["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}]


def test_strategic_merge_patch_list_directives() -> None:
    from koinon_emulator.patching import strategic_merge_patch

    spec = {
        "containers": [{"name": "a", "image": "x", "ports": [{"containerPort": 80, "name": "http"}]}],
        "volumes": [{"name": "v1", "emptyDir": {}}, {"name": "v2", "emptyDir": {}}],
        "args": ["--one", "--two"],
    }
    patch = {
        "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
        "containers": [{"name": "b", "image": "y"}, {"name": "a", "ports": [{"containerPort": 81}]}],
        "volumes": [{"name": "v1", "$patch": "delete"}],
        "$deleteFromPrimitiveList/args": ["--two"],
    }
    merged = strategic_merge_patch(spec, patch)
    assert [c["name"] for c in merged["containers"]] == ["b", "a"]
    assert merged["containers"][1]["image"] == "x"  # kept: merged by name
    assert merged["containers"][1]["ports"] == [{"containerPort": 80, "name": "http"}, {"containerPort": 81}]
    assert merged["volumes"] == [{"name": "v2", "emptyDir": {}}]
    assert merged["args"] == ["--one"]
    replaced = strategic_merge_patch(spec, {"volumes": [{"$patch": "replace"}, {"name": "v3"}]})
    assert replaced["volumes"] == [{"name": "v3"}]


async def test_a_uid_test_guards_a_status_patch_and_a_merge_patch_uid_does_not(
    http: aiohttp.ClientSession, with_widgets: KubeEmulator
) -> None:
    """How a client writes the status of one object only (not one created again under its name):
    kube-apiserver applies a JSON patch to the stored object, metadata included, so a failing
    `test` of /metadata/uid on the status subresource answers 422 Invalid and changes nothing
    (patch.go: the jsonpatch error becomes a 422). A merge patch carrying metadata.uid is no such
    guard there: the status strategy of a custom resource copies the stored object and takes only
    its status from the request (customresource/status_strategy.go PrepareForUpdate)."""
    created = await _json(await http.post(NS_WIDGETS, json=widget("st")))
    uid = created["metadata"]["uid"]
    status = f"{NS_WIDGETS}/st/status"
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": "/metadata/uid", "value": "another-uid"},
        {"op": "add", "path": "/status", "value": {"phase": "Gone"}},
    ]
    refused = await http.patch(status, headers={"Content-Type": "application/json-patch+json"}, json=ops)
    assert refused.status == 422, await refused.text()
    assert (await _json(refused))["reason"] == "Invalid"
    ops[0]["value"] = uid
    accepted = await http.patch(status, headers={"Content-Type": "application/json-patch+json"}, json=ops)
    assert accepted.status == 200, await accepted.text()
    merge = {"metadata": {"uid": "another-uid"}, "status": {"phase": "Merged"}}
    ignored = await http.patch(status, headers={"Content-Type": "application/merge-patch+json"}, json=merge)
    assert ignored.status == 200, await ignored.text()
    stored = await _json(ignored)
    assert (stored["metadata"]["uid"], stored["status"]["phase"]) == (uid, "Merged")


async def test_json_patch_copies_are_bounded(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    """kube-apiserver sets evanphx/json-patch's AccumulatedCopySizeLimit (JSONPatchMaxCopyBytes, 3 MiB):
    a patch whose copies duplicate more than that is a 422. Before 2026-12-07 the emulator copied
    without a bound: each copy of a subtree into itself doubles it, so 12 operations in a 782-byte
    request made a 4 MiB object, and some 30 would exhaust its memory on its one event loop. (13 here:
    8 MiB of copies.)"""
    assert (await http.post(NS_WIDGETS, json=widget("amp", extra={"a": "x" * 1024}))).status == 201
    ops = [{"op": "copy", "from": "/spec/extra", "path": f"/spec/extra/k{i}"} for i in range(13)]
    response = await http.patch(f"{NS_WIDGETS}/amp", json=ops, headers=JSON_PATCH)
    assert response.status == 422, response.status
    assert "the accumulated size increase of copy is" in (await response.json())["message"]
    stored = await (await http.get(f"{NS_WIDGETS}/amp")).json()
    assert list(stored["spec"]["extra"]) == ["a"]  # nothing applied
    small = [{"op": "copy", "from": "/spec/extra", "path": f"/spec/extra/k{i}"} for i in range(3)]
    assert (await http.patch(f"{NS_WIDGETS}/amp", json=small, headers=JSON_PATCH)).status == 200


async def test_json_patch_operations_are_bounded(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    """patch.go: more than 10,000 operations in one JSON patch is a 413 RequestEntityTooLarge."""
    assert (await http.post(NS_WIDGETS, json=widget("many"))).status == 201
    ops = [{"op": "test", "path": "/spec/color", "value": "red"}] * 10_001
    response = await http.patch(f"{NS_WIDGETS}/many", json=ops, headers=JSON_PATCH)
    assert response.status == 413, response.status
    assert "The allowed maximum operations in a JSON patch is 10000, got 10001" in (await response.json())["message"]
    assert (await http.patch(f"{NS_WIDGETS}/many", json=ops[:10_000], headers=JSON_PATCH)).status == 200
