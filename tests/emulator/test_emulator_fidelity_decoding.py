"""Bodies kube-apiserver cannot decode into its Go types (400; a patch whose result does not decode,
422), finalizer names it refuses (422), and
the in-process API handing out copies: where the emulator stored garbage, failed with a 500, or let a
caller change its objects behind its back."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import aiohttp
import pytest
from koinon_emulator import KubeEmulator

from .helpers import GROUP, widget

CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
DEPLOYMENTS = "/apis/apps/v1/namespaces/default/deployments"
WIDGETS_NS = f"/apis/{GROUP}/v1/namespaces/default/widgets"
JSON_PATCH = {"Content-Type": "application/json-patch+json"}
MERGE = {"Content-Type": "application/merge-patch+json"}
SMP = {"Content-Type": "application/strategic-merge-patch+json"}
SECRETS = "/api/v1/namespaces/default/secrets"
WIDGET = (f"{GROUP}/v1", "Widget")


def _deployment(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "d"}},
        "template": {
            "metadata": {"labels": {"app": "d"}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        },
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {**base, **spec}}


async def _status(response: aiohttp.ClientResponse) -> tuple[int, dict[str, Any]]:
    async with response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"name": "f1", "finalizers": "koinon.dev/x"}, "metadata.finalizers"),
        ({"name": "f2", "finalizers": [1]}, "metadata.finalizers"),
        ({"name": "f3", "ownerReferences": "x"}, "metadata.ownerReferences"),
        ({"name": "f4", "ownerReferences": [{"apiVersion": "v1", "kind": "K", "name": 5, "uid": "u"}]},
         "metadata.ownerReferences.name"),
        ({"name": 5}, "metadata.name"),
        ({"generateName": ["x"]}, "metadata.generateName"),
        ({"name": "f5", "generation": "1"}, "metadata.generation"),
        ({"name": "f6", "managedFields": {}}, "metadata.managedFields"),
    ],
)  # fmt: skip
async def test_object_meta_of_the_wrong_type_is_a_400_and_nothing_is_stored(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession, metadata: dict[str, Any], field: str
) -> None:
    body = {**widget("x"), "metadata": {**metadata, "namespace": "default"}}
    status, answer = await _status(await http.post(WIDGETS_NS, json=body))
    assert status == 400, answer
    assert answer["reason"] == "BadRequest"
    assert f"Widget.{field} of type" in answer["message"]
    assert with_widgets.list_objects(*WIDGET, namespace="default") == []


async def test_object_meta_of_the_wrong_type_is_a_400_in_an_update_and_a_422_in_a_patch(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    """A PUT body that does not decode is a 400; a patch whose result does not decode is a 422 on
    the field "patch" (patch.go decodes the patched object itself). The emulator answered 400 to both."""
    with_widgets.create(widget("w"))
    before = with_widgets.get(*WIDGET, "w", "default")
    status, answer = await _status(
        await http.patch(f"{WIDGETS_NS}/w", headers=MERGE, json={"metadata": {"finalizers": "a/b"}})
    )
    assert status == 422, answer
    assert [cause["field"] for cause in answer["details"]["causes"]] == ["patch"]
    replaced = {**before, "metadata": {**before["metadata"], "ownerReferences": [1]}}
    status, _ = await _status(await http.put(f"{WIDGETS_NS}/w", json=replaced))
    assert status == 400
    assert with_widgets.get(*WIDGET, "w", "default") == before


@pytest.mark.parametrize("finalizer", ["Bad Finalizer!", "-x", "a/b/c", "UPPER.example/x"])
async def test_finalizer_names_must_be_qualified_names(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession, finalizer: str
) -> None:
    """apimachinery's ValidateFinalizers: a 422 naming metadata.finalizers, on create and on patch."""
    body = widget("w")
    body["metadata"]["finalizers"] = ["test.koinon.dev/hold", finalizer]
    status, answer = await _status(await http.post(WIDGETS_NS, json=body))
    assert status == 422, answer
    assert answer["reason"] == "Invalid"
    assert [cause["field"] for cause in answer["details"]["causes"]] == ["metadata.finalizers"]
    assert finalizer in answer["details"]["causes"][0]["message"]

    with_widgets.create(widget("w"))
    status, answer = await _status(
        await http.patch(f"{WIDGETS_NS}/w", headers=MERGE, json={"metadata": {"finalizers": [finalizer]}})
    )
    assert status == 422, answer
    assert "finalizers" not in with_widgets.get(*WIDGET, "w", "default")["metadata"]


async def test_qualified_finalizer_names_are_taken(with_widgets: KubeEmulator, http: aiohttp.ClientSession) -> None:
    body = widget("w")
    body["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker", "foregroundDeletion", "a.b_c"]
    status, answer = await _status(await http.post(WIDGETS_NS, json=body))
    assert status == 201, answer


@pytest.mark.parametrize(
    "fields",
    [
        {"data": {"port": 8080}},
        {"data": "x"},
        {"data": {"ok": 1}},
        {"binaryData": {"b": 1}},
        {"binaryData": {"b": "!"}},
        {"binaryData": {"b": "AAE"}},  # Go's StdEncoding wants the padding
    ],
)
async def test_configmap_data_that_is_not_strings_is_a_400(
    emulator: KubeEmulator, http: aiohttp.ClientSession, fields: dict[str, Any]
) -> None:
    status, answer = await _status(await http.post(CONFIGMAPS, json={"metadata": {"name": "c"}, **fields}))
    assert status == 400, answer
    assert answer["message"].startswith('ConfigMap in version "v1" cannot be handled as a ConfigMap')
    assert emulator.list_objects("v1", "ConfigMap", namespace="default") == []


async def test_configmap_data_of_strings_is_taken(http: aiohttp.ClientSession) -> None:
    body = {"metadata": {"name": "c"}, "data": {"port": "8080"}, "binaryData": {"b": "AAE="}}
    assert (await http.post(CONFIGMAPS, json=body)).status == 201


async def test_a_null_configmap_value_is_taken_as_kube_apiserver_takes_it(
    emulator: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    """What `kubectl create -f` sends for the YAML `data: {EMPTY_VAR: }`, and the kubernetes Python
    client for V1ConfigMap(data={"EMPTY_VAR": None}). Go decodes null into a string as "" and into
    []byte as nil (served back as null); the emulator answered 400."""
    body = {"metadata": {"name": "c"}, "data": {"EMPTY_VAR": None, "x": "1"}, "binaryData": {"b": None}}
    status, answer = await _status(await http.post(CONFIGMAPS, json=body))
    assert status == 201, answer
    assert answer["data"] == {"EMPTY_VAR": "", "x": "1"}
    assert answer["binaryData"] == {"b": None}
    stored = emulator.get("v1", "ConfigMap", "c", namespace="default")
    assert stored["data"] == {"EMPTY_VAR": "", "x": "1"}


async def test_line_wrapped_binary_data_is_taken_as_kube_apiserver_takes_it(
    emulator: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    """Go decodes []byte with base64.StdEncoding, which skips CR and LF (`base64` wraps its output
    at 76 characters); it serves the bytes back unwrapped. The emulator answered 400."""
    body = {"metadata": {"name": "w"}, "binaryData": {"b": "AAEC\r\nAwQF\n"}}
    status, answer = await _status(await http.post(CONFIGMAPS, json=body))
    assert status == 201, answer
    assert answer["binaryData"] == {"b": "AAECAwQF"}


@pytest.mark.parametrize(
    "spec",
    [
        {"selector": "app=d"},
        {"selector": {"matchLabels": ["app"]}},
        {"selector": {"matchLabels": {"app": 1}}},
        {"selector": {"matchLabels": {"app": "d"}, "matchExpressions": {}}},
        {"template": "x"},
        {"template": {"metadata": "x"}},
        {"template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": {"name": "c"}}}},
        {"template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": ["c"]}}},
        {"template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": [{"name": "c", "image": 5}]}}},
    ],
)
async def test_a_deployment_whose_selector_or_template_has_the_wrong_type_is_a_400(
    http: aiohttp.ClientSession, spec: dict[str, Any]
) -> None:
    status, answer = await _status(await http.post(DEPLOYMENTS, json=_deployment(**spec)))
    assert status == 400, answer
    assert answer["message"].startswith('Deployment in version "v1" cannot be handled as a Deployment')


async def test_a_deployment_spec_that_is_not_an_object_is_a_400(http: aiohttp.ClientSession) -> None:
    body = {**_deployment(), "spec": "x"}
    status, answer = await _status(await http.post(DEPLOYMENTS, json=body))
    assert status == 400, answer
    assert (await http.post(DEPLOYMENTS, json=_deployment())).status == 201


@pytest.mark.parametrize(
    "options", [{"preconditions": "x"}, {"preconditions": {"uid": 5}}, {"preconditions": [1]}, ["x"], "x"]
)
async def test_delete_options_of_the_wrong_type_are_a_400_and_nothing_is_deleted(
    emulator: KubeEmulator, http: aiohttp.ClientSession, options: Any
) -> None:
    assert (await http.post(CONFIGMAPS, json={"metadata": {"name": "c"}})).status == 201
    status, answer = await _status(await http.request("DELETE", f"{CONFIGMAPS}/c", json=options))
    assert status == 400, answer
    assert answer["message"].startswith('DeleteOptions in version "v1" cannot be handled as a DeleteOptions')
    assert emulator.get("v1", "ConfigMap", "c", "default")["metadata"]["name"] == "c"


async def test_delete_preconditions_of_the_right_type_still_apply(
    emulator: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    assert (await http.post(CONFIGMAPS, json={"metadata": {"name": "c"}})).status == 201
    stale = {"preconditions": {"uid": "someone-else"}}
    assert (await http.request("DELETE", f"{CONFIGMAPS}/c", json=stale)).status == 409
    uid = emulator.get("v1", "ConfigMap", "c", "default")["metadata"]["uid"]
    assert (await http.request("DELETE", f"{CONFIGMAPS}/c", json={"preconditions": {"uid": uid}})).status == 200


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"labels": ["app"]}, "metadata.labels"),
        ({"labels": 5}, "metadata.labels"),
        ({"labels": "app=x"}, "metadata.labels"),
        ({"labels": {"app": 1}}, "metadata.labels"),
        ({"labels": {"app": True}}, "metadata.labels"),
        ({"annotations": ["a"]}, "metadata.annotations"),
        ({"annotations": {"a": {"b": "c"}}}, "metadata.annotations"),
        ({"annotations": {"a": 1.5}}, "metadata.annotations"),
    ],
)  # fmt: skip
async def test_labels_or_annotations_of_the_wrong_type_are_a_400_on_create_and_update_as_other_object_meta(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession, metadata: dict[str, Any], field: str
) -> None:
    """ObjectMeta.labels and .annotations are map[string]string: a list, a number or a non-string
    value fails to decode in kube-apiserver (400 BadRequest, "cannot unmarshal ... of type ..."),
    on create and update, for built-in kinds and custom resources alike; the emulator answered 422
    Invalid, which clients take for a validation failure of a decoded object. A patch leaving one
    is the other way round: patch.go turns its decoding error into a 422 Invalid on "patch"."""
    status, answer = await _status(await http.post(CONFIGMAPS, json={"metadata": {"name": "c", **metadata}}))
    assert status == 400, answer
    assert answer["reason"] == "BadRequest"
    assert answer["message"].startswith('ConfigMap in version "v1" cannot be handled as a ConfigMap')
    assert f"ConfigMap.{field} of type" in answer["message"]
    assert with_widgets.list_objects("v1", "ConfigMap", namespace="default") == []

    body = {**widget("x"), "metadata": {"name": "x", "namespace": "default", **metadata}}
    status, answer = await _status(await http.post(WIDGETS_NS, json=body))
    assert status == 400, answer
    assert f"Widget.{field} of type" in answer["message"]

    with_widgets.create(widget("w"))
    before = with_widgets.get(*WIDGET, "w", "default")
    status, answer = await _status(await http.patch(f"{WIDGETS_NS}/w", headers=MERGE, json={"metadata": metadata}))
    assert status == 422, answer
    assert answer["reason"] == "Invalid"
    replaced = {**before, "metadata": {**before["metadata"], **metadata}}
    status, _ = await _status(await http.put(f"{WIDGETS_NS}/w", json=replaced))
    assert status == 400
    assert with_widgets.get(*WIDGET, "w", "default") == before


async def test_labels_and_annotations_that_decode_but_fail_validation_stay_a_422(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    """A label key or value of the wrong syntax decodes (it is a string) and fails ValidateObjectMeta:
    422 Invalid naming metadata.labels, as before."""
    for metadata in ({"labels": {"bad key!": "x"}}, {"labels": {"app": "-x-"}}, {"annotations": {"a/b/c": "x"}}):
        body = {"metadata": {"name": "c", **metadata}}
        status, answer = await _status(await http.post(CONFIGMAPS, json=body))
        assert status == 422, answer
        assert answer["reason"] == "Invalid"


async def test_a_null_label_or_annotation_value_is_taken_as_kube_apiserver_takes_it(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    """Go decodes null into a map[string]string value as "": kube-apiserver stores the label (or
    annotation) with an empty value, and the caller's body is left as it was."""
    metadata = {"name": "c", "labels": {"app": None}, "annotations": {"note": None}}
    body = {"metadata": metadata}
    status, answer = await _status(await http.post(CONFIGMAPS, json=body))
    assert status == 201, answer
    assert answer["metadata"]["labels"] == {"app": ""}
    assert answer["metadata"]["annotations"] == {"note": ""}
    created = with_widgets.create({**widget("w"), "metadata": {**widget("w")["metadata"], "labels": {"app": None}}})
    assert created["metadata"]["labels"] == {"app": ""}
    in_process: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "d", "labels": {"app": None}},
    }
    assert with_widgets.create(in_process)["metadata"]["labels"] == {"app": ""}
    assert in_process["metadata"]["labels"] == {"app": None}  # the caller's dict is not changed


@pytest.mark.parametrize(
    ("headers", "patch", "problem"),
    [
        (MERGE, {"metadata": {"labels": {"app": 1}}}, "ConfigMap.metadata.labels of type string"),
        (SMP, {"metadata": {"labels": {"app": 1}}}, "ConfigMap.metadata.labels of type string"),
        (JSON_PATCH, [{"op": "add", "path": "/metadata/labels/app", "value": 1}], "ConfigMap.metadata.labels"),
        (MERGE, {"metadata": {"annotations": ["a"]}}, "ConfigMap.metadata.annotations of type map"),
        (MERGE, {"metadata": {"finalizers": "a/b"}}, "ConfigMap.metadata.finalizers of type []string"),
        (JSON_PATCH, [{"op": "replace", "path": "/metadata/name", "value": 5}], "ConfigMap.metadata.name"),
        (MERGE, {"metadata": "x"}, "ConfigMap.metadata of type v1.ObjectMeta"),
        (MERGE, {"data": {"k": 1}}, "ConfigMap.data of type string"),
    ],
)  # fmt: skip
async def test_a_patch_whose_result_does_not_decode_is_a_422_on_the_field_patch(
    emulator: KubeEmulator, http: aiohttp.ClientSession, headers: dict[str, str], patch: Any, problem: str
) -> None:
    """patch.go's applyPatchToCurrentObject decodes the *patched* object and turns a decoding error
    into errors.NewInvalid(schema.GroupKind{}, "", field.Invalid(field.NewPath("patch"), ...)): a
    422 Invalid for merge, JSON and strategic merge patches alike (only a POST or PUT body that does
    not decode is a 400). kopf and the gateway branch on 422 for patches. Since 4b7b8f9 the emulator
    answered 400 for labels and annotations (422 before), and always 400 for finalizers and name."""
    created = await http.post(CONFIGMAPS, json={"metadata": {"name": "c", "labels": {"x": "y"}}})
    assert created.status == 201
    before = emulator.get("v1", "ConfigMap", "c", namespace="default")
    status, answer = await _status(await http.patch(f"{CONFIGMAPS}/c", headers=headers, json=patch))
    assert status == 422, answer
    assert answer["reason"] == "Invalid"
    assert answer["message"].startswith(' "" is invalid: patch: Invalid value: ')
    assert problem in answer["message"]
    [cause] = answer["details"]["causes"]
    assert cause["field"] == "patch" and cause["reason"] == "FieldValueInvalid"
    assert "kind" not in answer["details"] and "name" not in answer["details"]
    if headers is SMP:  # quoted as Go prints the decoded patch, not as the patched object
        assert 'Invalid value: "map[metadata:map[labels:map[app:1]]]"' in cause["message"]
    else:
        assert cause["message"].startswith('Invalid value: "{')
    assert emulator.get("v1", "ConfigMap", "c", namespace="default") == before


async def test_a_patch_leaving_secret_data_that_is_not_base64_is_a_422(
    emulator: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    """Secret.data is map[string][]byte: base64 is decoded with the patched object, so a patch
    leaving a value that is not base64 fails as any other decoding error of a patch, with a 422."""
    assert (await http.post(SECRETS, json={"metadata": {"name": "s"}, "data": {"k": "YQ=="}})).status == 201
    status, answer = await _status(await http.patch(f"{SECRETS}/s", headers=MERGE, json={"data": {"k": "not base64!"}}))
    assert status == 422, answer
    assert answer["details"]["causes"][0]["field"] == "patch"
    assert "data[k]" in answer["message"]


async def test_under_strict_field_validation_a_patch_adding_an_unknown_field_is_a_422(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    """The strict decoding error of a patched object is a 422 on "patch" too (a POST's is a 400)."""
    with_widgets.create(widget("w"))
    url = f"{WIDGETS_NS}/w?fieldValidation=Strict"
    status, answer = await _status(await http.patch(url, headers=MERGE, json={"spec": {"bogus": 1}}))
    assert status == 422, answer
    assert 'strict decoding error: unknown field "spec.bogus"' in answer["message"]
    assert answer["details"]["causes"][0]["field"] == "patch"


@pytest.mark.parametrize(
    ("operation", "field"),
    [
        ({"op": "add", "path": 5, "value": 1}, "path"),
        ({"op": "add", "path": ["metadata"], "value": 1}, "path"),
        ({"op": "add", "path": {"p": 1}, "value": 1}, "path"),
        ({"op": 1, "path": "/spec/size", "value": 1}, "op"),
        ({"op": "copy", "from": 5, "path": "/spec/x"}, "from"),
    ],
)
@pytest.mark.parametrize("validation", ["", "?fieldValidation=Warn", "?fieldValidation=Strict"])
async def test_a_json_patch_op_path_or_from_that_is_not_a_string_is_a_400(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession, operation: dict[str, Any], field: str, validation: str
) -> None:
    """Under fieldValidation Warn (the default) or Strict, patch.go's applyJSPatch first decodes the
    whole patch into []jsonPatchOp{Op, Path, From string; Value any}: a number there is a 400
    "error decoding patch", before any operation applies. The emulator answered 422."""
    with_widgets.create(widget("w"))
    before = with_widgets.get(*WIDGET, "w", "default")
    operations = [{"op": "test", "path": "/spec/size", "value": "no"}, operation]  # the test op would fail: 422
    url = f"{WIDGETS_NS}/w{validation}"
    status, answer = await _status(await http.patch(url, headers=JSON_PATCH, json=operations))
    assert status == 400, answer
    assert answer["kind"] == "Status" and answer["reason"] == "BadRequest"
    assert answer["message"].startswith("error decoding patch: json: cannot unmarshal")
    assert f"jsonPatchOp.{field} of type string" in answer["message"]
    assert with_widgets.get(*WIDGET, "w", "default") == before


@pytest.mark.parametrize("path", [5, ["metadata"], {"p": 1}])
async def test_under_field_validation_ignore_a_json_patch_path_that_is_not_a_string_is_a_422(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession, path: Any
) -> None:
    """fieldValidation=Ignore skips that decoding: the operations are raw JSON to evanphx/json-patch,
    applying one fails to read its path as a string, and patch.go answers that (like any failed
    operation) with a 422."""
    with_widgets.create(widget("w"))
    before = with_widgets.get(*WIDGET, "w", "default")
    operations = [{"op": "add", "path": path, "value": 1}]
    url = f"{WIDGETS_NS}/w?fieldValidation=Ignore"
    status, answer = await _status(await http.patch(url, headers=JSON_PATCH, json=operations))
    assert status == 422, answer
    assert answer["kind"] == "Status" and answer["reason"] == "Invalid"
    assert "add operation failed to decode path" in answer["message"]
    assert with_widgets.get(*WIDGET, "w", "default") == before


@pytest.mark.parametrize(
    ("operation", "message"),
    [
        ({"op": "add", "value": 1}, "add operation failed to decode path: missing value"),
        ({"op": "add", "path": None, "value": 1}, "add operation failed to decode path: missing value"),
        ({"op": "remove"}, "remove operation failed to decode path: missing value"),
        ({"op": "replace", "value": 1}, "replace operation failed to decode path: operation missing path field"),
        ({"op": "test", "value": 1}, "test operation failed to decode path: operation missing path field"),
        ({"op": "move", "from": "/spec/color"}, "move operation failed to decode path: operation missing path field"),
        ({"op": "copy", "path": "/spec/x"}, "copy operation failed to decode from: operation, missing from field"),
        ({"path": "/spec/size", "value": 1}, "Unexpected kind: unknown"),
        ({"op": None, "path": "/spec/size", "value": 1}, "Unexpected kind: unknown"),
        ({"op": "frob", "path": "/spec/size", "value": 1}, "Unexpected kind: frob"),
        (None, "Unexpected kind: unknown"),
    ],
)
@pytest.mark.parametrize("validation", ["", "?fieldValidation=Ignore"])
async def test_a_json_patch_operation_without_op_or_path_is_a_422(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession, operation: Any, message: str, validation: str
) -> None:
    """An absent (or null) op, path or from decodes (into "" or a nil raw message); evanphx/json-patch
    then fails the operation ("Unexpected kind", "failed to decode path: missing value") and
    patch.go answers every failed operation with a 422, whatever fieldValidation says. The
    emulator answered 400 for these."""
    with_widgets.create(widget("w"))
    before = with_widgets.get(*WIDGET, "w", "default")
    url = f"{WIDGETS_NS}/w{validation}"
    status, answer = await _status(await http.patch(url, headers=JSON_PATCH, json=[operation]))
    assert status == 422, answer
    assert answer["kind"] == "Status" and answer["reason"] == "Invalid"
    assert message in answer["message"]
    assert with_widgets.get(*WIDGET, "w", "default") == before


async def test_a_json_patch_item_that_is_not_an_object_is_still_a_400(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    with_widgets.create(widget("w"))
    for operations in (["x"], [1], {"op": "add"}):
        status, answer = await _status(await http.patch(f"{WIDGETS_NS}/w", headers=JSON_PATCH, json=operations))
        assert status == 400, answer


async def test_a_json_patch_add_or_replace_without_a_value_sets_null_as_evanphx_does(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    """evanphx/json-patch v4's add and replace take Operation.value(): without "value" a nil node,
    marshalled as null. Decoded into map[string]string that is "": kube-apiserver answers 200 and
    stores the label empty; in a custom resource the schema decides (spec.size is not nullable and
    defaults to 3: pruned, then defaulted). The emulator answered 400 "needs a 'value'"."""
    assert (await http.post(CONFIGMAPS, json={"metadata": {"name": "c", "labels": {"x": "y"}}})).status == 201
    operations = [{"op": "add", "path": "/metadata/labels/z"}, {"op": "replace", "path": "/metadata/labels/x"}]
    status, answer = await _status(await http.patch(f"{CONFIGMAPS}/c", headers=JSON_PATCH, json=operations))
    assert status == 200, answer
    assert answer["metadata"]["labels"] == {"x": "", "z": ""}

    with_widgets.create(widget("w", size=5))
    operations = [{"op": "replace", "path": "/spec/size"}]
    status, answer = await _status(await http.patch(f"{WIDGETS_NS}/w", headers=JSON_PATCH, json=operations))
    assert status == 200, answer
    assert answer["spec"]["size"] == 3


async def test_a_json_patch_test_without_a_value_compares_with_null(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    """evanphx's test: with no value, it passes where the path holds nothing (or null) and fails
    (422) where it holds something."""
    with_widgets.create(widget("w"))
    absent = [{"op": "test", "path": "/spec/shape"}, {"op": "replace", "path": "/spec/color", "value": "blue"}]
    status, answer = await _status(await http.patch(f"{WIDGETS_NS}/w", headers=JSON_PATCH, json=absent))
    assert status == 200, answer
    assert answer["spec"]["color"] == "blue"
    present = [{"op": "test", "path": "/spec/color"}]
    status, answer = await _status(await http.patch(f"{WIDGETS_NS}/w", headers=JSON_PATCH, json=present))
    assert status == 422, answer
    assert "testing value /spec/color failed" in answer["message"]


@pytest.mark.parametrize("validation", ["", "?fieldValidation=Ignore"])
async def test_a_null_json_patch_is_a_no_op_and_no_body_a_400(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession, validation: str
) -> None:
    """patch.go decodes the JSON `null` as no operations (kjson.UnmarshalStrict and DecodePatch both
    take it): 200, nothing changed. The emulator answered 400. An empty body stays a 400."""
    with_widgets.create(widget("w"))
    before = with_widgets.get(*WIDGET, "w", "default")
    url = f"{WIDGETS_NS}/w{validation}"
    status, answer = await _status(await http.patch(url, headers=JSON_PATCH, data=b"null"))
    assert status == 200, answer
    assert answer == before
    status, answer = await _status(await http.patch(url, headers=JSON_PATCH, data=b""))
    assert status == 400, answer
    assert with_widgets.get(*WIDGET, "w", "default") == before


async def test_an_unknown_field_in_a_json_patch_operation_is_refused_under_strict_and_warned_of_under_warn(
    emulator: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    """patch.go decodes the operations with kjson.UnmarshalStrict into jsonPatchOp{op, path, from,
    value}: an unknown field is a strict error, "json patch unknown field \"[0].valeu\"": under
    Strict a 422 Invalid on "patch", under Warn (the default) a warning, under Ignore nothing. The
    emulator applied the operation silently whatever fieldValidation said."""
    assert (await http.post(CONFIGMAPS, json={"metadata": {"name": "c"}})).status == 201
    operations = [{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}, "valeu": 1}]
    strict = await http.patch(f"{CONFIGMAPS}/c?fieldValidation=Strict", headers=JSON_PATCH, json=operations)
    status, answer = await _status(strict)
    assert status == 422, answer
    assert answer["message"].endswith('strict decoding error: json patch unknown field "[0].valeu"')
    assert answer["details"]["causes"][0]["field"] == "patch"
    assert "labels" not in emulator.get("v1", "ConfigMap", "c", namespace="default")["metadata"]

    warned = await http.patch(f"{CONFIGMAPS}/c", headers=JSON_PATCH, json=operations)
    assert warned.status == 200, await warned.text()
    assert warned.headers.getall("Warning") == ['299 - "json patch unknown field \\"[0].valeu\\""']
    ignored = await http.patch(f"{CONFIGMAPS}/c?fieldValidation=Ignore", headers=JSON_PATCH, json=operations)
    assert ignored.status == 200 and "Warning" not in ignored.headers


async def test_the_in_process_api_hands_out_copies(with_widgets: KubeEmulator, http: aiohttp.ClientSession) -> None:
    """README: the in-process API has the HTTP API's semantics and watch events. It returned the
    stored dicts: a caller's edit changed the server's object with no resourceVersion or event,
    and its later patch to the same effect was then taken for a no-op."""
    emulator = with_widgets
    created = emulator.create(widget("w"))
    pristine = copy.deepcopy(created)
    created["spec"]["color"] = "green"
    read = emulator.get(*WIDGET, "w", "default")
    assert read == pristine
    read["spec"]["color"] = "blue"
    emulator.list_objects(*WIDGET, namespace="default")[0]["spec"]["color"] = "blue"
    assert emulator.get(*WIDGET, "w", "default") == pristine

    async with http.get(f"{WIDGETS_NS}?watch=true&resourceVersion={pristine['metadata']['resourceVersion']}") as watch:
        patched = emulator.patch(*WIDGET, "w", {"spec": {"color": "blue"}}, "default")
        assert patched["metadata"]["resourceVersion"] != pristine["metadata"]["resourceVersion"]
        patched["spec"]["color"] = "mauve"
        deleted = emulator.delete(*WIDGET, "w", "default")
        deleted["spec"]["color"] = "mauve"
        events = [await asyncio.wait_for(watch.content.readline(), 5) for _ in range(2)]
    assert [b'"MODIFIED"' in events[0], b'"DELETED"' in events[1]] == [True, True]
    assert all(b'"blue"' in event and b"mauve" not in event for event in events)


async def test_apply_crd_hands_out_a_copy(emulator: KubeEmulator) -> None:
    from .helpers import widget_crd

    crd = emulator.apply_crd(widget_crd())
    crd["spec"]["names"]["kind"] = "Gadget"
    stored = emulator.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", f"widgets.{GROUP}")
    assert stored["spec"]["names"]["kind"] == "Widget"


@pytest.mark.parametrize("key", ["x\ry", "x\x00y", "x\x7fy", "x\ny"])
async def test_a_warning_naming_a_field_with_a_control_character_is_still_answered(
    emulator: KubeEmulator, http: aiohttp.ClientSession, key: str
) -> None:
    """The Warning header for an unknown JSON patch operation field carried the key as sent;
    aiohttp refused the header after the change was stored, and the client saw a dropped
    connection for a write that happened (kube-apiserver answers 200)."""
    emulator.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"}})
    operations = [{"op": "add", "path": "/data", "value": {"a": "1"}, key: 1}]
    async with http.patch("/api/v1/namespaces/default/configmaps/c", json=operations, headers=JSON_PATCH) as response:
        assert response.status == 200, await response.text()
        assert response.headers.getall("Warning") == ['299 - "json patch unknown field \\"[0].x y\\""']
    assert emulator.get("v1", "ConfigMap", "c", namespace="default")["data"] == {"a": "1"}


async def test_a_pruned_field_with_a_control_character_is_still_answered(
    with_widgets: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    with_widgets.create(widget("w"))
    merge = {"Content-Type": "application/merge-patch+json"}
    async with http.patch(
        f"/apis/{GROUP}/v1/namespaces/default/widgets/w", json={"spec": {"x\ry": 1}}, headers=merge
    ) as response:
        assert response.status == 200, await response.text()


@pytest.mark.parametrize("key", ["apiVersion", "kind"])
@pytest.mark.parametrize("value", [True, 1, ["v1"], {"a": 1}])
async def test_a_type_meta_field_that_is_not_a_string_is_400(http: aiohttp.ClientSession, key: str, value: Any) -> None:
    """kube-apiserver reads apiVersion and kind into TypeMeta's strings before anything else: another
    JSON type is a 400 ("json: cannot unmarshal bool into Go struct field .apiVersion of type
    string"). Before 2026-12-07 a non-string apiVersion was a 500 here (an AttributeError)."""
    response = await http.post(CONFIGMAPS, json={key: value, "metadata": {"name": "x"}})
    assert response.status == 400, (response.status, await response.text())
    assert f"Go struct field .{key} of type string" in (await response.json())["message"]


async def test_a_patch_that_makes_api_version_not_a_string_is_422(http: aiohttp.ClientSession) -> None:
    """As for other patched objects that do not decode (patch.go): a 422 Invalid on "patch"."""
    assert (await http.post(CONFIGMAPS, json={"metadata": {"name": "tm"}})).status == 201
    response = await http.patch(f"{CONFIGMAPS}/tm", json={"apiVersion": 1}, headers=MERGE)
    assert response.status == 422, (response.status, await response.text())
    assert (await response.json())["details"]["causes"][0]["field"] == "patch"
