"""Request validation as kube-apiserver (v1.30) does it. Each test states the real server's behaviour
(the emulator differed before 2026-12-06)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from koinon_emulator import KubeEmulator

from .helpers import widget, widget_crd

NS_WIDGETS = "/apis/test.koinon.dev/v1/namespaces/default/widgets"
SECRETS = "/api/v1/namespaces/default/secrets"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
DEPLOYMENTS = "/apis/apps/v1/namespaces/default/deployments"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


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


def _crd_with_times() -> dict[str, Any]:
    crd = widget_crd()
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    spec["when"] = {"type": "string", "format": "date-time"}
    spec["day"] = {"type": "string", "format": "date"}
    return crd


@pytest.mark.parametrize(
    "value",
    [
        "2024-05-01T10:00:00",  # naive datetime.isoformat(): no offset
        "2024-05-01T10:00:00.123456",  # the same with microseconds
        "2024-05-01 10:00:00Z",  # a space separator
        "2024-05-01T10:00:00+0100",  # an offset without its colon
        "2024-05-01T10:00Z",  # no seconds
        "2024-02-30T10:00:00Z",  # no such day
        "2024-05-01T24:00:00Z",
        "2024-05-01T10:00:00Z\n",  # Go's `$` is the end of the text
    ],
)
async def test_date_time_takes_rfc3339_only(http: aiohttp.ClientSession, emulator: KubeEmulator, value: str) -> None:
    """kube-apiserver checks `format: date-time` with kube-openapi's strfmt.IsDateTime: a date, "T" or
    "t", HH:MM:SS, an optional fraction, then "Z"/"z" or +hh:mm with its colon. Before 2026-12-07 the
    emulator also took the values above (a naive isoformat(), a space, "+0100"): a component writing
    one passed its tests and got a 422 from a cluster."""
    emulator.apply_crd(_crd_with_times())
    response = await http.post(NS_WIDGETS, json=widget("d", when=value))
    assert response.status == 422, (value, response.status)
    cause = (await response.json())["details"]["causes"][0]
    assert cause["field"] == "spec.when" and "must be of type date-time" in cause["message"]


@pytest.mark.parametrize(
    "value",
    ["2024-05-01T10:00:00Z", "2024-05-01t10:00:00z", "2024-05-01T10:00:00.123456Z", "2024-05-01T10:00:00-07:30"],
)
async def test_date_time_takes_what_a_cluster_takes(
    http: aiohttp.ClientSession, emulator: KubeEmulator, value: str
) -> None:
    emulator.apply_crd(_crd_with_times())
    assert (await http.post(NS_WIDGETS, json=widget("d", when=value))).status == 201, value


@pytest.mark.parametrize("value", ["20240501", "2024-W18-3", "2024-5-1", "2023-02-29"])
async def test_date_is_yyyy_mm_dd_only(http: aiohttp.ClientSession, emulator: KubeEmulator, value: str) -> None:
    """strfmt.IsDate is Go's time.Parse("2006-01-02"); Python 3.11's date.fromisoformat, used before,
    also took the ISO 8601 basic and week forms."""
    emulator.apply_crd(_crd_with_times())
    assert (await http.post(NS_WIDGETS, json=widget("d", day=value))).status == 422, value
    assert (await http.post(NS_WIDGETS, json=widget("e", day="2024-02-29"))).status == 201


async def test_pattern_dollar_is_the_end_of_the_text(http: aiohttp.ClientSession, with_widgets: KubeEmulator) -> None:
    """CRD patterns are RE2 there: `$` does not match before a trailing newline, as Python's does. The
    Widget's spec.code is '^[A-Z]{3}$': "ABC\\n" (a value read from a file without strip()) passed here
    and was a 422 on a cluster."""
    response = await http.post(NS_WIDGETS, json=widget("nl", code="ABC\n"))
    assert response.status == 422, response.status
    assert (await response.json())["details"]["causes"][0]["field"] == "spec.code"
    assert (await http.post(NS_WIDGETS, json=widget("ok", code="ABC"))).status == 201


@pytest.mark.parametrize("pattern", ["^(?=A)[A-Z]+$", "^(a)\\1$", "^(?!x)"])
async def test_a_crd_pattern_re2_cannot_compile_is_refused(http: aiohttp.ClientSession, pattern: str) -> None:
    """kube-apiserver compiles every CRD pattern with Go's regexp: lookarounds and backreferences
    refuse the CRD (422); Python's re would have taken them and matched with them."""
    crd = widget_crd()
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["code"] = {
        "type": "string",
        "pattern": pattern,
    }
    response = await http.post(CRDS, json=crd)
    assert response.status == 422, response.status
    cause = (await response.json())["details"]["causes"][0]
    assert cause["field"].endswith("properties[spec].properties[code].pattern")
    assert "must be a valid regular expression" in cause["message"]
