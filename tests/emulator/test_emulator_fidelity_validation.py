"""Request validation as kube-apiserver (v1.30) does it. Each test states the real server's behaviour
(the emulator differed before 2026-12-06)."""

from __future__ import annotations

from typing import Any

import aiohttp
from koinon_emulator import KubeEmulator

from .helpers import widget

NS_WIDGETS = "/apis/test.koinon.dev/v1/namespaces/default/widgets"
SECRETS = "/api/v1/namespaces/default/secrets"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
DEPLOYMENTS = "/apis/apps/v1/namespaces/default/deployments"


async def _json(response: aiohttp.ClientResponse) -> Any:
    return await response.json(content_type=None)


async def test_strict_unknown_field_is_400_bad_request(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    """With ?fieldValidation=Strict an unknown field makes the decoder fail with a strict decoding
    error, which the handler turns into 400 BadRequest: `Widget in version "v1" cannot be handled
    as a Widget: strict decoding error: unknown field "spec.bogus"` (what `kubectl apply` prints as
    `Error from server (BadRequest)`). Before 2026-12-06 the emulator answered 422 Invalid with causes instead, so a
    client that treats 422 as "the object is invalid" and 400 as "the request is malformed" is
    tested against the wrong code (tests/emulator/test_emulator_api.py pins the 422)."""
    response = await http.post(NS_WIDGETS, params={"fieldValidation": "Strict"}, json=widget("s", bogus=1))
    status = await _json(response)
    assert response.status == 400, status
    assert status["reason"] == "BadRequest"
    assert 'strict decoding error: unknown field "spec.bogus"' in status["message"]


async def test_nan_and_infinity_are_not_json(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    """`NaN`/`Infinity` are not JSON (RFC 8259); kube-apiserver's decoder refuses the body with
    400. Python's json.loads takes them, and the emulator stored them (before 2026-12-06) in a
    preserve-unknown-fields subtree (like AIJob status.result/verification), then serves
    `NaN` back in GET/LIST/WATCH responses that kubectl and other Go clients cannot parse. A
    Python writer doing json.dumps(float('nan')) (the default allow_nan=True) thus passes here and
    fails on a real cluster."""
    body = (
        b'{"apiVersion":"test.koinon.dev/v1","kind":"Widget","metadata":{"name":"nan"},'
        b'"spec":{"color":"red","extra":{"score":NaN}}}'
    )
    response = await http.post(NS_WIDGETS, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400, await response.text()


async def test_date_time_format_refuses_date_only(http: aiohttp.ClientSession, emulator: KubeEmulator) -> None:
    """`format: date-time` is checked with kube-openapi's strfmt DateTime (RFC 3339 date-time
    layouts). A bare date ("2024-05-01") is not a date-time and is refused with 422 (`must be of
    type date-time`). Before 2026-12-06 the emulator used datetime.fromisoformat, which also takes "2024-05-01",
    "2024-05-01T10" and ISO week dates, so an operator writing a malformed startTime /
    lastTransitionTime (AIJob/VolunteerNode status) would pass here."""
    emulator.apply_crd(
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "stamps.test.koinon.dev"},
            "spec": {
                "group": "test.koinon.dev",
                "scope": "Namespaced",
                "names": {"plural": "stamps", "singular": "stamp", "kind": "Stamp"},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "properties": {
                                    "spec": {
                                        "type": "object",
                                        "properties": {"at": {"type": "string", "format": "date-time"}},
                                    }
                                },
                            }
                        },
                    }
                ],
            },
        }
    )
    url = "/apis/test.koinon.dev/v1/namespaces/default/stamps"
    good = await http.post(url, json={"metadata": {"name": "ok"}, "spec": {"at": "2024-05-01T10:00:00Z"}})
    assert good.status == 201
    bad = await http.post(url, json={"metadata": {"name": "bad"}, "spec": {"at": "2024-05-01"}})
    assert bad.status == 422, await bad.text()


async def test_secret_data_must_be_base64(http: aiohttp.ClientSession) -> None:
    """Secret.data is map[string][]byte: kube-apiserver base64-decodes each value while decoding
    the request and refuses a non-base64 value with 400 BadRequest (`illegal base64 data at input
    byte N`). Before 2026-12-06 the emulator stored the plain text, so a chart or the gateway (kube_tokens.py,
    kube_ca.py) writing unencoded data would pass the emulator tests and fail on a cluster."""
    response = await http.post(SECRETS, json={"metadata": {"name": "plain"}, "data": {"token": "not base64!"}})
    assert response.status == 400, await response.text()


async def test_label_values_are_validated(http: aiohttp.ClientSession) -> None:
    """Label keys must be qualified names and values at most 63 characters of
    [A-Za-z0-9_.-] starting and ending alphanumeric; kube-apiserver answers 422
    (`metadata.labels: Invalid value: "a b": a valid label must be ...`). Before 2026-12-06 the emulator only
    checks that values are strings; the gateway labels VolunteerNodes with derived values
    (service.py join-token / join-key labels), which a real server would validate."""
    response = await http.post(CONFIGMAPS, json={"metadata": {"name": "lbl", "labels": {"k": "has space"}}})
    assert response.status == 422, await response.text()
    too_long = await http.post(CONFIGMAPS, json={"metadata": {"name": "lbl2", "labels": {"k": "x" * 64}}})
    assert too_long.status == 422, await too_long.text()


async def test_deployment_selector_must_match_template(http: aiohttp.ClientSession) -> None:
    """Built-in kinds are validated (and defaulted) by kube-apiserver: a Deployment whose selector
    does not match its template labels is refused with 422 (`spec.template.metadata.labels:
    Invalid value: ...: selector does not match template labels`); one without containers too.
    Before 2026-12-06 the emulator stored built-ins as given, so tests/charts/test_apply_emulator.py ("the chart
    applies") cannot catch a chart that a real cluster refuses."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "mismatch"},
        "spec": {
            "selector": {"matchLabels": {"app": "a"}},
            "template": {"metadata": {"labels": {"app": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
        },
    }
    response = await http.post(DEPLOYMENTS, json=deployment)
    assert response.status == 422, await response.text()
