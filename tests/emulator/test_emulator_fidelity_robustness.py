"""Malformed or oversized requests get Kubernetes Status errors (4xx), not 500s.

Each test states what kube-apiserver (v1.30) answers (the emulator differed before 2026-12-06)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from koinon_emulator import KubeEmulator
from koinon_operator.api.aijob import parse_spec

REPO = Path(__file__).resolve().parents[2]

CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
NS_WIDGETS = "/apis/test.koinon.dev/v1/namespaces/default/widgets"
MERGE = {"Content-Type": "application/merge-patch+json"}


async def _json(response: aiohttp.ClientResponse) -> Any:
    return await response.json(content_type=None)


async def test_body_over_the_limit_is_413_status(http: aiohttp.ClientSession) -> None:
    """kube-apiserver reads at most --max-request-bytes-ish 3 MiB (MaxRequestBodyBytes = 3145728)
    of a write body and answers 413 RequestEntityTooLarge (`Request entity too large: limit is
    3145728`) as a Status. Before 2026-12-06 the emulator's aiohttp limit was 16 MiB, and going over it raised
    HTTPRequestEntityTooLarge inside the handler, which the catch-all turns into a 500
    InternalError (logged as an emulator failure)."""
    body = b'{"metadata":{"name":"big"},"data":{"x":"' + b"a" * (17 * 1024 * 1024) + b'"}}'
    response = await http.post(CONFIGMAPS, data=body, headers={"Content-Type": "application/json"})
    status = await _json(response)
    assert response.status == 413, status
    assert status["kind"] == "Status" and status["reason"] == "RequestEntityTooLarge"


async def test_body_between_real_limit_and_emulator_limit_is_refused(http: aiohttp.ClientSession) -> None:
    """A 4 MiB ConfigMap is over kube-apiserver's 3 MiB request limit (and etcd's 1.5 MiB object
    limit): refused with 413. Before 2026-12-06 the emulator stored it, so a component that writes large status
    (AIJob status.result, log tails) or Secrets would pass here and fail on a cluster."""
    body = b'{"metadata":{"name":"big4"},"data":{"x":"' + b"a" * (4 * 1024 * 1024) + b'"}}'
    response = await http.post(CONFIGMAPS, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 413, response.status


async def test_deeply_nested_json_is_400_not_500(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    """Go's JSON decoders used by kube-apiserver (sigs.k8s.io/json, json-iterator) stop at a
    maximum nesting depth (10000) and the request fails as a 400 BadRequest decode error.
    Python's json.loads raises RecursionError (not a ValueError) at about 1000 levels, which the
    emulator's catch-all answers with 500 InternalError."""
    depth = 5000
    nested = b'{"a":' * depth + b"1" + b"}" * depth
    body = b'{"metadata":{"name":"deep"},"data":' + nested + b"}"
    response = await http.post(CONFIGMAPS, data=body, headers={"Content-Type": "application/json"})
    status = await _json(response)
    assert 400 <= response.status < 500, status
    assert status["kind"] == "Status"


async def test_malformed_query_parameters_are_400_not_500(http: aiohttp.ClientSession) -> None:
    """kube-apiserver decodes query parameters into ListOptions and answers a non-integer `limit`
    or `timeoutSeconds` with 400 BadRequest. Before 2026-12-06 the emulator called int()/float() on them unguarded:
    ValueError, logged as an emulator failure and answered 500 InternalError."""
    bad_limit = await http.get(CONFIGMAPS, params={"limit": "abc"})
    assert bad_limit.status == 400, await bad_limit.text()
    bad_timeout = await http.get(CONFIGMAPS, params={"watch": "true", "timeoutSeconds": "abc"})
    assert bad_timeout.status == 400, await bad_timeout.text()


AIJOBS = "/apis/koinon.dev/v1alpha1/namespaces/default/aijobs"


def _aijob(name: str, spec: str) -> bytes:
    head = '{"apiVersion":"koinon.dev/v1alpha1","kind":"AIJob","metadata":{"name":"' + name + '"},"spec":'
    return (head + spec + "}").encode()


@pytest.fixture
def with_aijobs(emulator: KubeEmulator) -> KubeEmulator:
    emulator.apply_crd(yaml.safe_load((REPO / "manifests" / "crds" / "aijobs.koinon.dev.yaml").read_text()))
    return emulator


async def test_nesting_the_emulator_cannot_walk_is_400_not_500(
    http: aiohttp.ClientSession, with_aijobs: KubeEmulator
) -> None:
    """600 levels under a preserve-unknown-fields field parsed, then the schema walk and the copies
    hit Python's recursion limit: a 500 "internal error" naming nothing."""
    nested = '{"n":' * 600 + "1" + "}" * 600
    body = _aijob("deep", '{"entrypoint":"x","runtimeEnv":{"config":' + nested + "}}")
    response = await http.post(AIJOBS, data=body, headers={"Content-Type": "application/json"})
    status = await _json(response)
    assert response.status == 400, status
    assert "nested deeper than" in status["message"]


@pytest.mark.parametrize("literal", ["1e30", "100000000000000000000", "9007199254740994.0"])
async def test_an_integer_beyond_what_kube_takes_as_one_is_refused(
    http: aiohttp.ClientSession, with_aijobs: KubeEmulator, literal: str
) -> None:
    """kube-openapi takes a float64 as an integer only when whole and within 2^53, and decodes a JSON
    integer beyond int64 as a float64: 1e30 and 1e20 get "must be of type integer". The emulator
    stored them, and the operator failed the job later (or left it Pending for good)."""
    body = _aijob("big", '{"entrypoint":"x","resources":{"gpuMemoryMiB":' + literal + "}}")
    response = await http.post(AIJOBS, data=body, headers={"Content-Type": "application/json"})
    status = await _json(response)
    assert response.status == 422, status
    assert "spec.resources.gpuMemoryMiB" in status["message"]


async def test_a_whole_float_is_served_back_as_an_integer(
    http: aiohttp.ClientSession, with_aijobs: KubeEmulator
) -> None:
    """kube-apiserver serves the float64 2.0 as 2 (Go's encoding): a Python client's `gpus: 2.0`
    runs on a cluster, and came back here as 2.0, which the operator refuses as not an integer."""
    body = _aijob("whole", '{"entrypoint":"x","resources":{"gpus":2.0,"cpus":1.5},"replicas":1.0}')
    response = await http.post(AIJOBS, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 201, await _json(response)
    text = await (await http.get(f"{AIJOBS}/whole")).text()
    spec = json.loads(text)["spec"]
    assert spec["resources"]["gpus"] == 2 and isinstance(spec["resources"]["gpus"], int)
    assert isinstance(spec["replicas"], int) and spec["resources"]["cpus"] == 1.5
    parse_spec(spec)  # the operator takes it


async def test_annotations_over_256_kib_are_refused(http: aiohttp.ClientSession) -> None:
    """apimachinery's ValidateAnnotationsSize: keys and values together at most 256 KiB per object.
    The emulator stored any size, so a writer that grows annotations (kopf's diff-base copy of a
    large spec) passed here and was refused by a real cluster."""
    body = {"metadata": {"name": "big", "annotations": {"a": "x" * (256 * 1024)}}, "data": {}}
    response = await http.post(CONFIGMAPS, json=body)
    status = await _json(response)
    assert response.status == 422, status
    assert "metadata.annotations" in status["message"]
    body["metadata"]["annotations"] = {"a": "x" * (256 * 1024 - 1)}
    assert (await http.post(CONFIGMAPS, json=body)).status == 201


async def test_annotation_size_is_counted_in_bytes_as_kube_does(http: aiohttp.ClientSession) -> None:
    """apimachinery's ValidateAnnotationsSize sums len(k)+len(v) of Go strings: UTF-8 bytes. The
    emulator sums Python str lengths (code points): 150 Ki 'e'-acute is 300 KiB, which a real
    API server refuses and the emulator stores."""
    body = {"metadata": {"name": "wide", "annotations": {"a": "\u00e9" * (150 * 1024)}}, "data": {}}
    response = await http.post(CONFIGMAPS, json=body)
    status = await _json(response)
    assert response.status == 422, status


async def test_a_patch_that_grows_annotations_over_the_limit_is_refused(http: aiohttp.ClientSession) -> None:
    body = {"metadata": {"name": "grow", "annotations": {"a": "x" * (200 * 1024)}}, "data": {}}
    assert (await http.post(CONFIGMAPS, json=body)).status == 201
    patch = {"metadata": {"annotations": {"b": "y" * (100 * 1024)}}}
    response = await http.patch(
        f"{CONFIGMAPS}/grow", json=patch, headers={"Content-Type": "application/merge-patch+json"}
    )
    assert response.status == 422, await _json(response)


async def test_an_object_cannot_grow_past_etcds_limit(http: aiohttp.ClientSession) -> None:
    """etcd refuses a write over its --max-request-bytes (1.5 MiB by default), and kube-apiserver
    passes its error on as a 500 "etcdserver: request is too large" (kubernetes/kubernetes#112152).
    Before 2026-12-07 only request bodies were bounded (3 MiB): successive merge patches grew one
    object without limit (6.3 MB in review), and a component appending to a status passed its tests
    here and failed on a cluster. (A ConfigMap stands in for any object here: a cluster's own
    ConfigMap and Secret validation refuses data over 1 MiB earlier, with a 422, which the emulator
    does not check.)"""
    assert (await http.post(CONFIGMAPS, json={"metadata": {"name": "grow"}})).status == 201
    codes = []
    for i in range(3):
        patch = {"data": {f"m{i}": "y" * (700 * 1024)}}
        response = await http.patch(f"{CONFIGMAPS}/grow", data=json.dumps(patch), headers=MERGE)
        codes.append(response.status)
    assert codes == [200, 200, 500], codes
    body = await response.json()
    assert body["message"] == "etcdserver: request is too large" and "reason" not in body
    stored = await (await http.get(f"{CONFIGMAPS}/grow")).json()
    assert sorted(stored["data"]) == ["m0", "m1"]  # the refused write stored nothing
    big = {"metadata": {"name": "big"}, "data": {"v": "z" * (2 * 1024 * 1024)}}
    assert (await http.post(CONFIGMAPS, json=big)).status == 500
    # A dry run never reaches etcd, there or here.
    assert (await http.post(f"{CONFIGMAPS}?dryRun=All", json=big)).status == 201


@pytest.mark.parametrize(
    "query",
    [
        "limit=" + "9" * 5000,  # int() refuses more than 4300 digits: it was a 500
        "watch=true&timeoutSeconds=" + "9" * 5000,
        "limit=9223372036854775808",  # beyond int64, where kube-apiserver's ParseInt stops
        "watch=true&timeoutSeconds=1&resourceVersion=-5",  # ParseUint: a 400, not a too-old version's 410
        "watch=true&timeoutSeconds=1&resourceVersion=%2B5",
        "watch=true&timeoutSeconds=1&resourceVersion=" + "9" * 5000,
    ],
)
async def test_out_of_range_integer_query_parameters_are_400(http: aiohttp.ClientSession, query: str) -> None:
    response = await http.get(f"{CONFIGMAPS}?{query}")
    assert response.status == 400, (response.status, (await response.text())[:200])
    assert (await http.get(f"{CONFIGMAPS}?limit=9223372036854775807")).status == 200
