"""Emulator fidelity: writes holding a lone surrogate escape are stored as kube-apiserver stores them
(not a 500 from the size checks), and CRD patterns' \\d, \\s, \\w are ASCII-only as RE2's."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import yaml
from koinon_emulator import KubeEmulator

from .helpers import widget, widget_crd

REPO = Path(__file__).resolve().parents[2]
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
JSON = {"Content-Type": "application/json"}
JSONPATCH = {"Content-Type": "application/json-patch+json"}
NS_WIDGETS = "/apis/test.koinon.dev/v1/namespaces/default/widgets"


async def test_a_lone_surrogate_escape_is_not_a_500(http: aiohttp.ClientSession) -> None:
    """Go's decoder turns an unpaired "\\ud800" into U+FFFD and kube-apiserver stores it (201).
    Before cf67601 the emulator stored it (201); since, store.put's size check runs
    json.dumps(..., ensure_ascii=False).encode(), which raises UnicodeEncodeError: a 500
    "internal error occurred in the emulator" (and a logged traceback) for every such write."""
    body = '{"metadata": {"name": "s"}, "data": {"k": "\\ud800"}}'
    response = await http.post(CONFIGMAPS, data=body, headers=JSON)
    assert response.status == 201, await response.text()


async def test_a_json_patch_copy_of_a_lone_surrogate_is_not_a_500(http: aiohttp.ClientSession) -> None:
    """Same in patching.json_patch's copy accounting (and then in store.put)."""
    assert (await http.post(CONFIGMAPS, json={"metadata": {"name": "c"}})).status == 201
    ops = (
        '[{"op": "add", "path": "/data", "value": {"k": "\\ud800"}},'
        ' {"op": "copy", "from": "/data/k", "path": "/data/j"}]'
    )
    response = await http.patch(f"{CONFIGMAPS}/c", data=ops, headers=JSONPATCH)
    assert response.status == 200, await response.text()


async def test_the_aijob_entrypoint_pattern_matches_as_re2_does(http: aiohttp.ClientSession) -> None:
    """manifests/crds/aijobs: entrypoint `pattern: '\\S'`. RE2's \\s is [\\t\\n\\f\\r ] (ASCII), so on a
    cluster a no-break space (or \\v) IS a \\S and the AIJob is created; Python's str \\s is Unicode
    whitespace, so the emulator answers 422. README (new in cf67601): "pattern (as RE2 matches it ...)"."""
    crd = yaml.safe_load((REPO / "manifests/crds/aijobs.koinon.dev.yaml").read_text())
    assert (await http.post(CRDS, json=crd)).status == 201
    group, version = crd["spec"]["group"], crd["spec"]["versions"][0]["name"]
    url = f"/apis/{group}/{version}/namespaces/default/{crd['spec']['names']['plural']}"
    for name, entrypoint in (("nbsp", "\u00a0"),):  # \v: Python's ASCII \s takes it, RE2's does not (README)
        job = {
            "apiVersion": f"{group}/{version}",
            "kind": crd["spec"]["names"]["kind"],
            "metadata": {"name": name},
            "spec": {"entrypoint": entrypoint},
        }
        response = await http.post(url, data=json.dumps(job), headers=JSON)
        assert response.status == 201, (name, await response.text())


async def test_a_digit_pattern_refuses_non_ascii_digits_as_re2_does(
    http: aiohttp.ClientSession, emulator: KubeEmulator
) -> None:
    """RE2's \\d is [0-9]: "١٢٣" (Arabic-Indic digits) fails '^\\d+$' on a cluster (422); Python's \\d
    takes any Unicode digit, so the emulator stored it."""
    crd = widget_crd()
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["code"] = {
        "type": "string",
        "pattern": "^\\d+$",
    }
    emulator.apply_crd(crd)
    response = await http.post(NS_WIDGETS, json=widget("d", code="١٢٣"))
    assert response.status == 422, await response.text()
