"""API semantics of the emulator through real HTTP (aiohttp client)."""

from __future__ import annotations

from typing import Any

import aiohttp
from koinon_emulator import KubeEmulator

from .helpers import GROUP, WIDGETS, widget

NS_WIDGETS = f"{WIDGETS}/namespaces/default/widgets"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}


async def _json(response: aiohttp.ClientResponse) -> Any:
    return await response.json(content_type=None)


async def test_builtin_namespaces_exist_and_core_discovery_reports_v1(http: aiohttp.ClientSession) -> None:
    names = [ns["metadata"]["name"] for ns in (await _json(await http.get("/api/v1/namespaces")))["items"]]
    assert {"default", "kube-system"} <= set(names)
    core = await _json(await http.get("/api/v1"))
    assert core["groupVersion"] == "v1"
    events = next(r for r in core["resources"] if r["name"] == "events")
    assert events["namespaced"] and "watch" in events["verbs"]
    assert any(r["name"] == "namespaces/status" for r in core["resources"])
    version = await _json(await http.get("/version"))
    assert version["major"] == "1"


async def test_create_sets_server_metadata_and_defaults(
    http: aiohttp.ClientSession, with_widgets: KubeEmulator
) -> None:
    response = await http.post(NS_WIDGETS, json=widget("w1"))
    assert response.status == 201
    body = await _json(response)
    metadata = body["metadata"]
    assert metadata["uid"] and metadata["generation"] == 1 and metadata["creationTimestamp"].endswith("Z")
    assert int(metadata["resourceVersion"]) > 0
    assert body["spec"] == {"color": "red", "size": 3, "limits": {"cpu": 0.5}}
    again = await http.post(NS_WIDGETS, json=widget("w1"))
    assert again.status == 409
    status = await _json(again)
    assert status["kind"] == "Status" and status["reason"] == "AlreadyExists"
    missing = await http.get(f"{NS_WIDGETS}/nope")
    assert missing.status == 404
    assert (await _json(missing))["message"] == f'widgets.{GROUP} "nope" not found'


async def test_generate_name_and_unknown_namespace(http: aiohttp.ClientSession) -> None:
    event = {
        "metadata": {"generateName": "kopf-event-"},
        "reason": "R",
        "message": "m",
        "involvedObject": {"kind": "Widget", "name": "w", "namespace": "default"},
    }
    first = await _json(await http.post("/api/v1/namespaces/default/events", json=event))
    second = await _json(await http.post("/api/v1/namespaces/default/events", json=event))
    assert first["metadata"]["name"].startswith("kopf-event-")
    assert first["metadata"]["name"] != second["metadata"]["name"]
    orphan = await http.post("/api/v1/namespaces/ghost/configmaps", json={"metadata": {"name": "c"}})
    assert orphan.status == 404
    assert (await _json(orphan))["message"] == 'namespaces "ghost" not found'


async def test_a_status_merge_patch_naming_a_stale_resource_version_conflicts(
    http: aiohttp.ClientSession, with_widgets: KubeEmulator
) -> None:
    """kube-apiserver takes metadata.resourceVersion in a merge patch as a precondition on the
    status subresource too (the update is checked against the stored version before the status
    strategy keeps the rest of the object): the operator's status writes rely on it (409, nothing
    written, when the object changed since the version the patch names)."""
    created = await _json(await http.post(NS_WIDGETS, json=widget("w9")))
    read = created["metadata"]["resourceVersion"]
    status_url = f"{NS_WIDGETS}/w9/status"
    first = await http.patch(
        status_url, headers=MERGE, json={"metadata": {"resourceVersion": read}, "status": {"phase": "A"}}
    )
    assert first.status == 200, await first.text()
    written = await _json(first)
    assert written["status"]["phase"] == "A" and written["metadata"]["resourceVersion"] != read
    late = await http.patch(
        status_url, headers=MERGE, json={"metadata": {"resourceVersion": read}, "status": {"phase": "B"}}
    )
    assert late.status == 409
    refused = await _json(late)
    assert (refused["reason"], refused["code"]) == ("Conflict", 409)
    assert "the object has been modified" in refused["message"]
    stored = await _json(await http.get(f"{NS_WIDGETS}/w9"))
    assert stored["status"]["phase"] == "A"
    assert stored["metadata"]["resourceVersion"] == written["metadata"]["resourceVersion"]


async def test_resource_versions_increase_and_stale_writes_conflict(
    http: aiohttp.ClientSession, with_widgets: KubeEmulator
) -> None:
    created = await _json(await http.post(NS_WIDGETS, json=widget("w2")))
    stale = created["metadata"]["resourceVersion"]
    updated = dict(created, spec={**created["spec"], "color": "blue"})
    put = await http.put(f"{NS_WIDGETS}/w2", json=updated)
    assert put.status == 200
    fresh = await _json(put)
    assert int(fresh["metadata"]["resourceVersion"]) > int(stale)
    assert fresh["metadata"]["generation"] == 2
    conflict = await http.put(f"{NS_WIDGETS}/w2", json=updated)
    assert conflict.status == 409
    assert (await _json(conflict))["reason"] == "Conflict"
    merge_conflict = await http.patch(
        f"{NS_WIDGETS}/w2", headers=MERGE, json={"metadata": {"resourceVersion": stale}, "spec": {"size": 4}}
    )
    assert merge_conflict.status == 409
    failing_test = await http.patch(
        f"{NS_WIDGETS}/w2",
        headers=JSON_PATCH,
        json=[
            {"op": "test", "path": "/metadata/resourceVersion", "value": stale},
            {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
        ],
    )
    assert failing_test.status == 422
    passing = await http.patch(
        f"{NS_WIDGETS}/w2",
        headers=JSON_PATCH,
        json=[
            {"op": "test", "path": "/metadata/resourceVersion", "value": fresh["metadata"]["resourceVersion"]},
            {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
        ],
    )
    assert passing.status == 200
    patched = await _json(passing)
    assert patched["metadata"]["finalizers"] == ["x/y"]
    assert patched["metadata"]["generation"] == 2  # metadata changes do not bump generation


async def test_noop_patch_keeps_resource_version(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    created = await _json(await http.post(NS_WIDGETS, json=widget("w3")))
    same = await _json(await http.patch(f"{NS_WIDGETS}/w3", headers=MERGE, json={"spec": {"color": "red"}}))
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


async def test_status_subresource_is_isolated(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    await http.post(NS_WIDGETS, json={**widget("w4"), "status": {"phase": "Ignored"}})
    created = await _json(await http.get(f"{NS_WIDGETS}/w4"))
    assert "status" not in created
    status = await _json(
        await http.patch(
            f"{NS_WIDGETS}/w4/status",
            headers=MERGE,
            json={"status": {"conditions": [{"type": "Ready", "status": "True"}]}, "spec": {"color": "blue"}},
        )
    )
    assert status["status"] == {"phase": "Pending", "conditions": [{"type": "Ready", "status": "True"}]}
    assert status["spec"]["color"] == "red" and status["metadata"]["generation"] == 1
    main = await _json(
        await http.patch(f"{NS_WIDGETS}/w4", headers=MERGE, json={"status": {"phase": "Hacked"}, "spec": {"size": 5}})
    )
    assert main["status"]["phase"] == "Pending" and main["spec"]["size"] == 5
    assert main["metadata"]["generation"] == 2


async def test_schema_violations_are_422_with_field_causes(
    http: aiohttp.ClientSession, with_widgets: KubeEmulator
) -> None:
    response = await http.post(NS_WIDGETS, json=widget("bad", size=0, color="pink"))
    assert response.status == 422
    status = await _json(response)
    assert status["reason"] == "Invalid"
    fields = {cause["field"]: cause["message"] for cause in status["details"]["causes"]}
    assert fields["spec.size"] == "Invalid value: 0: spec.size in body should be greater than or equal to 1"
    assert fields["spec.color"].startswith('Unsupported value: "pink"')
    assert status["message"].startswith(f'Widget.{GROUP} "bad" is invalid: [')
    assert (await http.get(f"{NS_WIDGETS}/bad")).status == 404  # nothing stored


async def test_unknown_fields_pruned_or_rejected_when_strict(
    http: aiohttp.ClientSession, with_widgets: KubeEmulator
) -> None:
    body = widget("w5", bogus=1)
    strict = await http.post(NS_WIDGETS, params={"fieldValidation": "Strict"}, json=body)
    assert strict.status == 400  # kube-apiserver: a strict decoding error is a BadRequest
    assert 'strict decoding error: unknown field "spec.bogus"' in (await _json(strict))["message"]
    lenient = await http.post(NS_WIDGETS, json=body)
    assert lenient.status == 201
    assert "bogus" not in (await _json(lenient))["spec"]
    assert 'unknown field \\"spec.bogus\\"' in lenient.headers.get("Warning", "")


async def test_dry_run_validates_without_storing(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    dry = await http.post(NS_WIDGETS, params={"dryRun": "All"}, json=widget("dry"))
    assert dry.status == 201
    assert (await _json(dry))["spec"]["size"] == 3
    assert (await http.get(f"{NS_WIDGETS}/dry")).status == 404
    invalid = await http.post(NS_WIDGETS, params={"dryRun": "All"}, json=widget("dry", size=99))
    assert invalid.status == 422


async def test_finalizers_delay_deletion(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    body = widget("held")
    body["metadata"]["finalizers"] = ["test.koinon.dev/hold"]
    await http.post(NS_WIDGETS, json=body)
    deleted = await _json(await http.delete(f"{NS_WIDGETS}/held"))
    assert deleted["metadata"]["deletionTimestamp"]
    still = await http.get(f"{NS_WIDGETS}/held")
    assert still.status == 200
    await http.patch(f"{NS_WIDGETS}/held", headers=MERGE, json={"metadata": {"finalizers": None}})
    assert (await http.get(f"{NS_WIDGETS}/held")).status == 404


async def test_list_selectors_kind_and_cluster_wide(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    await http.post("/api/v1/namespaces", json={"metadata": {"name": "other"}})
    for name, namespace, tier in [("a", "default", "gold"), ("b", "default", "silver"), ("c", "other", "gold")]:
        body = widget(name, namespace)
        body["metadata"]["labels"] = {"tier": tier}
        assert (await http.post(f"{WIDGETS}/namespaces/{namespace}/widgets", json=body)).status == 201

    async def names(url: str, **params: str) -> list[str]:
        listing = await _json(await http.get(url, params=params))
        assert listing["kind"] == "WidgetList" and listing["apiVersion"] == f"{GROUP}/v1"
        assert int(listing["metadata"]["resourceVersion"]) > 0
        return [item["metadata"]["name"] for item in listing["items"]]

    assert await names(f"{WIDGETS}/widgets") == ["a", "b", "c"]
    assert await names(NS_WIDGETS) == ["a", "b"]
    assert await names(f"{WIDGETS}/widgets", labelSelector="tier=gold") == ["a", "c"]
    assert await names(f"{WIDGETS}/widgets", labelSelector="tier!=gold") == ["b"]
    assert await names(f"{WIDGETS}/widgets", labelSelector="tier in (silver,bronze)") == ["b"]
    assert await names(f"{WIDGETS}/widgets", labelSelector="tier notin (silver)") == ["a", "c"]
    assert await names(f"{WIDGETS}/widgets", labelSelector="!tier") == []
    assert await names(f"{WIDGETS}/widgets", fieldSelector="metadata.namespace=other") == ["c"]
    assert await names(f"{WIDGETS}/widgets", fieldSelector="metadata.name!=a,metadata.namespace=default") == ["b"]
    bad = await http.get(f"{WIDGETS}/widgets", params={"fieldSelector": "spec.color=red"})
    assert bad.status == 400


async def test_list_pagination_with_continue(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    for index in range(5):
        await http.post(NS_WIDGETS, json=widget(f"p{index}"))
    seen: list[str] = []
    params = {"limit": "2"}
    while True:
        page = await _json(await http.get(NS_WIDGETS, params=params))
        seen += [item["metadata"]["name"] for item in page["items"]]
        token = page["metadata"].get("continue")
        if not token:
            break
        params = {"limit": "2", "continue": token}
    assert seen == [f"p{index}" for index in range(5)]


async def test_event_field_selectors(http: aiohttp.ClientSession) -> None:
    for name in ("x", "y"):
        await http.post(
            "/api/v1/namespaces/default/events",
            json={
                "metadata": {"generateName": "e-"},
                "reason": "R",
                "message": name,
                "involvedObject": {"kind": "Widget", "name": name, "namespace": "default"},
            },
        )
    found = await _json(
        await http.get(
            "/api/v1/namespaces/default/events",
            params={"fieldSelector": "involvedObject.name=y,involvedObject.kind=Widget"},
        )
    )
    assert [event["message"] for event in found["items"]] == ["y"]


async def test_table_output_uses_printer_columns(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    await http.post(NS_WIDGETS, json=widget("t1", size=7))
    await http.patch(
        f"{NS_WIDGETS}/t1/status",
        headers=MERGE,
        json={"status": {"conditions": [{"type": "Other", "status": "False"}, {"type": "Ready", "status": "True"}]}},
    )
    accept = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
    table = await _json(await http.get(NS_WIDGETS, headers=accept))
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Color", "Size", "Phase", "Ready", "Age"]
    cells = table["rows"][0]["cells"]
    assert cells[:5] == ["t1", "red", 7, "Pending", "True"]
    assert cells[5].endswith("s")
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
    single = await _json(await http.get(f"{NS_WIDGETS}/t1", headers=accept, params={"includeObject": "Object"}))
    assert single["rows"][0]["object"]["spec"]["size"] == 7


async def test_discovery_lists_crd_resources(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    groups = await _json(await http.get("/apis"))
    widget_group = next(g for g in groups["groups"] if g["name"] == GROUP)
    assert widget_group["preferredVersion"]["groupVersion"] == f"{GROUP}/v1"
    resources = await _json(await http.get(WIDGETS))
    entry = next(r for r in resources["resources"] if r["name"] == "widgets")
    assert entry["shortNames"] == ["wdg"] and entry["singularName"] == "widget"
    assert entry["categories"] == ["koinon"] and entry["namespaced"] is True
    assert any(r["name"] == "widgets/status" for r in resources["resources"])
    crd = await _json(await http.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.{GROUP}"))
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions == {"Established": "True", "NamesAccepted": "True"}
    assert crd["status"]["acceptedNames"]["kind"] == "Widget"


async def test_deleting_crd_unregisters_it(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    await http.post(NS_WIDGETS, json=widget("gone"))
    response = await http.delete(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.{GROUP}")
    assert response.status == 200
    assert (await http.get(NS_WIDGETS)).status == 404
    groups = await _json(await http.get("/apis"))
    assert GROUP not in [g["name"] for g in groups["groups"]]


async def test_invalid_crd_is_rejected(http: aiohttp.ClientSession) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "wrong.test.koinon.dev"},
        "spec": {
            "group": "test.koinon.dev",
            "scope": "Namespaced",
            "names": {"plural": "things", "kind": "Thing"},
            "versions": [{"name": "v1", "served": True, "storage": True}],
        },
    }
    response = await http.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd)
    assert response.status == 422
    fields = {c["field"] for c in (await _json(response))["details"]["causes"]}
    assert fields == {"metadata.name", "spec.versions[0].schema.openAPIV3Schema"}


async def test_openapi_v3_documents_crd_schema(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    index = await _json(await http.get("/openapi/v3"))
    url = index["paths"][f"apis/{GROUP}/v1"]["serverRelativeURL"]
    document = await _json(await http.get(url))
    schema = document["components"]["schemas"]["dev.koinon.test.v1.Widget"]
    assert schema["x-kubernetes-group-version-kind"] == [{"group": GROUP, "version": "v1", "kind": "Widget"}]
    assert schema["properties"]["spec"]["properties"]["size"]["minimum"] == 1
    patch = document["paths"][f"/apis/{GROUP}/v1/namespaces/{{namespace}}/widgets/{{name}}"]["patch"]
    assert "fieldValidation" in [p["name"] for p in patch["parameters"]]


async def test_secret_string_data_and_namespace_deletion(http: aiohttp.ClientSession) -> None:
    await http.post("/api/v1/namespaces", json={"metadata": {"name": "tmp"}})
    secret = await _json(
        await http.post(
            "/api/v1/namespaces/tmp/secrets", json={"metadata": {"name": "token"}, "stringData": {"key": "abc"}}
        )
    )
    assert secret["data"] == {"key": "YWJj"} and secret["type"] == "Opaque" and "stringData" not in secret
    await http.delete("/api/v1/namespaces/tmp")
    assert (await http.get("/api/v1/namespaces/tmp/secrets/token")).status == 404
    assert (await http.get("/api/v1/namespaces/tmp")).status == 404


async def test_invalid_names_and_protobuf_bodies(http: aiohttp.ClientSession) -> None:
    response = await http.post("/api/v1/namespaces/default/configmaps", json={"metadata": {"name": "Bad_Name"}})
    assert response.status == 422
    assert (await _json(response))["details"]["causes"][0]["field"] == "metadata.name"
    protobuf = await http.post(
        "/api/v1/namespaces", data=b"k8s\x00", headers={"Content-Type": "application/vnd.kubernetes.protobuf"}
    )
    assert protobuf.status == 415
    apply = await http.patch(
        "/api/v1/namespaces/default", data=b"{}", headers={"Content-Type": "application/apply-patch+yaml"}
    )
    assert apply.status == 415
