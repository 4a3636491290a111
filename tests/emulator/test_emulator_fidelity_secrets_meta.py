"""Secret and ObjectMeta validation and update preconditions that kube-apiserver (v1.30) enforces
(the emulator did not before 2026-12-06)."""

from __future__ import annotations

from typing import Any

import aiohttp
from koinon_emulator import KubeEmulator

from .helpers import widget

SECRETS = "/api/v1/namespaces/default/secrets"
NS_WIDGETS = "/apis/test.koinon.dev/v1/namespaces/default/widgets"
MERGE = {"Content-Type": "application/merge-patch+json"}


async def _json(response: aiohttp.ClientResponse) -> Any:
    return await response.json(content_type=None)


async def test_tls_secret_needs_tls_crt_and_tls_key(http: aiohttp.ClientSession) -> None:
    """ValidateSecret: a `kubernetes.io/tls` Secret must have data `tls.crt` and `tls.key`
    (422, `data[tls.crt]: Required value`). kube_ca.py stores the gateway CA as such a Secret;
    the emulator accepted one without them before 2026-12-06."""
    body = {"metadata": {"name": "tls"}, "type": "kubernetes.io/tls", "data": {"credential.key": "eA=="}}
    response = await http.post(SECRETS, json=body)
    assert response.status == 422, await response.text()


async def test_secret_type_is_immutable(http: aiohttp.ClientSession) -> None:
    """ValidateSecretUpdate: `type` cannot change (422, `type: Invalid value: ...: field is
    immutable`). Before 2026-12-06 the emulator let a merge patch change it."""
    assert (await http.post(SECRETS, json={"metadata": {"name": "t"}, "data": {"a": "eA=="}})).status == 201
    response = await http.patch(f"{SECRETS}/t", headers=MERGE, json={"type": "koinon.dev/join-token"})
    assert response.status == 422, await response.text()


async def test_an_immutable_configmap_or_secret_can_only_be_deleted_and_created_again(
    http: aiohttp.ClientSession,
) -> None:
    """ValidateConfigMapUpdate / ValidateSecretUpdate: with `immutable: true` neither the data nor
    the flag may change (422, "data: Forbidden: field is immutable when `immutable` is set"); a
    delete still works. kube_ca.py relies on it (a planted immutable koinon-gateway-ca-cert); the
    emulator let such an update through before 2026-12-07."""
    configmaps = "/api/v1/namespaces/default/configmaps"
    for collection, data in ((configmaps, {"a": "x"}), (SECRETS, {"a": "eA=="})):
        body = {"metadata": {"name": "frozen"}, "immutable": True, "data": data}
        assert (await http.post(collection, json=body)).status == 201
        for patch in ({"data": {"a": None, "b": next(iter(data.values()))}}, {"immutable": False}):
            response = await http.patch(f"{collection}/frozen", headers=MERGE, json=patch)
            assert response.status == 422, await response.text()
            assert "field is immutable when `immutable` is set" in (await _json(response))["message"]
        labelled = await http.patch(f"{collection}/frozen", headers=MERGE, json={"metadata": {"labels": {"l": "v"}}})
        assert labelled.status == 200, await labelled.text()  # metadata is not frozen
        assert (await http.delete(f"{collection}/frozen")).status == 200


async def test_secret_string_data_values_must_be_strings(http: aiohttp.ClientSession) -> None:
    """stringData is map[string]string: a number fails decoding with 400 BadRequest. Before 2026-12-06 the emulator
    str()-converts it (5 -> "NQ=="), hiding a writer that forgot to stringify a count."""
    response = await http.post(SECRETS, json={"metadata": {"name": "n"}, "stringData": {"usages-count": 5}})
    assert response.status == 400, await response.text()


async def test_null_secret_values_are_taken_as_kube_apiserver_takes_them(
    http: aiohttp.ClientSession, emulator: KubeEmulator
) -> None:
    """What kubectl sends for `data: {KEY: }` and the Python client for data={"KEY": None}: Go
    decodes null into []byte as empty bytes (data) and into a string as "" (stringData), and
    kube-apiserver serves the key back as "" (etcd gives empty bytes back). The emulator answered
    400 for both."""
    body = {"metadata": {"name": "n"}, "data": {"empty": None, "a": "eA=="}, "stringData": {"s": None}}
    response = await http.post(SECRETS, json=body)
    assert response.status == 201, await response.text()
    assert (await _json(response))["data"] == {"empty": "", "a": "eA==", "s": ""}
    assert emulator.get("v1", "Secret", "n", "default")["data"] == {"empty": "", "a": "eA==", "s": ""}


async def test_line_wrapped_secret_data_is_taken_as_kube_apiserver_takes_it(
    http: aiohttp.ClientSession, emulator: KubeEmulator
) -> None:
    """encoding/json decodes []byte with base64.StdEncoding, which skips CR and LF: the wrapped
    output of `base64` (76 columns) or of `openssl base64` (64) is taken and served back unwrapped.
    The emulator answered 400; a wrapped value that is not base64 is still one."""
    body = {"metadata": {"name": "w"}, "data": {"tls.crt": "AAEC\r\nAwQF\n", "b": "eA\n=="}}
    response = await http.post(SECRETS, json=body)
    assert response.status == 201, await response.text()
    assert (await _json(response))["data"] == {"tls.crt": "AAECAwQF", "b": "eA=="}
    assert emulator.get("v1", "Secret", "w", "default")["data"]["tls.crt"] == "AAECAwQF"
    response = await http.post(SECRETS, json={"metadata": {"name": "x"}, "data": {"b": "AA\nE"}})
    assert response.status == 400, await response.text()


async def test_put_with_another_uid_is_a_conflict(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    """An update whose metadata.uid differs from the stored object's fails the UID precondition:
    409 Conflict (`Precondition failed: UID in precondition: ..., UID in object meta: ...`). The
    emulator overwrites the body's uid with the stored one and applies the update, so a writer
    holding a copy of a deleted-and-recreated object is not stopped by uid alone."""
    created = await _json(await http.post(NS_WIDGETS, json=widget("u")))
    created["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    created["spec"]["size"] = 4
    response = await http.put(f"{NS_WIDGETS}/u", json=created)
    assert response.status == 409, await response.text()


async def test_unknown_metadata_fields_are_not_stored(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    """metadata of a custom resource is decoded as ObjectMeta: an unknown field is dropped (with a
    warning) or, under fieldValidation=Strict, refused with 400 (`unknown field
    "metadata.bogus"`). Before 2026-12-06 the emulator stored metadata verbatim, even under Strict."""
    body = widget("m")
    body["metadata"]["bogus"] = 1
    strict = await http.post(NS_WIDGETS, params={"fieldValidation": "Strict"}, json=body)
    assert strict.status == 400, await strict.text()
    lenient = await _json(await http.post(NS_WIDGETS, json=body))
    assert "bogus" not in lenient["metadata"]


async def test_generation_counts_status_changes_without_status_subresource(
    http: aiohttp.ClientSession, emulator: KubeEmulator
) -> None:
    """customResourceStrategy.PrepareForUpdate: without a status subresource, any change outside
    metadata (status included) increments metadata.generation; only with the subresource is status
    excluded. Before 2026-12-06 the emulator always excluded status. (The project's CRDs have the subresource, so
    this matters only for other CRDs.)"""
    from .helpers import widget_crd

    crd = widget_crd()
    del crd["spec"]["versions"][0]["subresources"]
    emulator.apply_crd(crd)
    created = await _json(await http.post(NS_WIDGETS, json=widget("g")))
    patched = await _json(await http.patch(f"{NS_WIDGETS}/g", headers=MERGE, json={"status": {"phase": "X"}}))
    assert patched["status"]["phase"] == "X"
    assert patched["metadata"]["generation"] == created["metadata"]["generation"] + 1
