"""Every CRD of the project (manifests/crds/) registers in the emulator and validates a sample."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_emulator.errors import ApiError
from koinon_emulator.service import ApiService, WriteOptions

CRD_DIR = Path(__file__).resolve().parents[2] / "manifests" / "crds"
CRD_FILES = sorted(CRD_DIR.glob("*.yaml")) if CRD_DIR.is_dir() else []


def _sample(schema: dict[str, Any]) -> Any:
    """A minimal instance: required fields filled with the smallest valid values."""
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    if kind == "object" or "properties" in schema:
        return {key: _sample(schema["properties"][key]) for key in schema.get("required", [])}
    if kind == "array":
        return [_sample(schema.get("items", {})) for _ in range(schema.get("minItems", 0))]
    if kind == "string":
        value = "a" * max(1, schema.get("minLength", 1))
        return value if "pattern" not in schema or re.search(schema["pattern"], value) else None
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return False
    return "x"


@pytest.mark.skipif(not CRD_FILES, reason="manifests/crds/ has no CRDs yet")
@pytest.mark.parametrize("path", CRD_FILES, ids=[p.name for p in CRD_FILES])
def test_project_crd_registers_and_validates(path: Path) -> None:
    service = ApiService()
    crd = yaml.safe_load(path.read_text())
    stored = service.create(
        service.resolve("apiextensions.k8s.io", "v1", "customresourcedefinitions"),
        None,
        crd,
        WriteOptions(field_validation="Strict"),
    ).obj
    assert {c["type"] for c in stored["status"]["conditions"]} == {"Established", "NamesAccepted"}
    spec = crd["spec"]
    for version in (v for v in spec["versions"] if v.get("served", True)):
        resource = service.resolve(spec["group"], version["name"], spec["names"]["plural"])
        schema = version["schema"]["openAPIV3Schema"]
        namespace = "default" if resource.namespaced else None
        name = f"sample-{version['name']}"
        sample = {
            "apiVersion": resource.api_version,
            "kind": resource.kind,
            "metadata": {"name": name},
            "spec": _sample(schema["properties"]["spec"]),
        }
        if any(value is None for value in sample["spec"].values()):
            pytest.skip("sample generation does not handle patterns of required fields")
        created = service.create(resource, namespace, sample, WriteOptions(field_validation="Strict")).obj
        assert created["metadata"]["generation"] == 1
        with pytest.raises(ApiError) as rejected:
            service.create(
                resource,
                namespace,
                {**sample, "metadata": {"name": f"{name}-x"}, "spec": {**sample["spec"], "notAField": 1}},
                WriteOptions(field_validation="Strict"),
            )
        assert rejected.value.code == 400 and 'unknown field "spec.notAField"' in rejected.value.message


def test_a_volunteer_node_holds_no_more_gpus_than_the_gateway_admits() -> None:
    # The operator books a node for at most len(spec.gpus) GPUs and makes an object per GPU: a
    # hand-written VolunteerNode must be held to the gateway's bounds as its own joins are.
    from koinon_gateway.limits import MAX_GPU_MEMORY_MIB, MAX_GPUS, MAX_TEXT

    crd = yaml.safe_load((CRD_DIR / "volunteernodes.koinon.dev.yaml").read_text())
    version = crd["spec"]["versions"][0]
    properties = version["schema"]["openAPIV3Schema"]["properties"]
    for where in (properties["spec"]["properties"]["gpus"], properties["status"]["properties"]["gpus"]):
        gpu = where["items"]["properties"]
        assert (where["maxItems"], gpu["model"]["maxLength"], gpu["memoryMiB"]["maximum"]) == (
            MAX_GPUS,
            MAX_TEXT,
            MAX_GPU_MEMORY_MIB,
        )
    service = ApiService()
    service.create(
        service.resolve("apiextensions.k8s.io", "v1", "customresourcedefinitions"), None, crd, WriteOptions()
    )
    resource = service.resolve(crd["spec"]["group"], version["name"], crd["spec"]["names"]["plural"])
    spec = {**_sample(properties["spec"]), "gpus": [{"model": "A100", "memoryMiB": 81920}] * (MAX_GPUS + 1)}
    body = {"apiVersion": resource.api_version, "kind": resource.kind, "metadata": {"name": "greedy"}, "spec": spec}
    with pytest.raises(ApiError) as rejected:
        service.create(resource, None, body, WriteOptions())
    assert rejected.value.code == 422 and "spec.gpus" in rejected.value.message
    spec["gpus"] = spec["gpus"][:MAX_GPUS]
    service.create(resource, None, body, WriteOptions())
