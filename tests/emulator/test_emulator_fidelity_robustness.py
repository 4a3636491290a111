"""Malformed or oversized requests get Kubernetes Status errors (4xx), not 500s.

Each test states what kube-apiserver (v1.30) answers (the emulator differed before 2026-12-06)."""

from __future__ import annotations

from typing import Any

import aiohttp
from koinon_emulator import KubeEmulator

CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
NS_WIDGETS = "/apis/test.koinon.dev/v1/namespaces/default/widgets"


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
