"""The operator's OTEL_* settings as the SDK and the shipped manifest meet them: a setting the SDK
refuses anywhere in the pipeline (batch processor, sampler, span limits, exporter) stops the
operator at start, never in kopf's startup handler; empty endpoint variables mean unset for both
OTLP protocols; the Deployment lets an SRE's service.name in OTEL_RESOURCE_ATTRIBUTES win."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_operator.telemetry import exporter_settings_problem, setup_tracing
from opentelemetry.sdk.trace import TracerProvider

from tests.aijob.test_tracing_rules import main_exits_2_before_kopf, resource_attributes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_otel_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def _exporter(provider: TracerProvider) -> Any:
    processors: Any = provider._active_span_processor._span_processors
    return processors[0]._batch_processor._exporter


def _exporter_endpoint() -> str:
    """The endpoint of the exporter setup_tracing() builds from the environment."""
    provider = setup_tracing()
    assert provider is not None
    try:
        endpoint: str = _exporter(provider)._endpoint
        return endpoint
    finally:
        provider.shutdown()


def _manifest_env() -> list[dict[str, Any]]:
    docs = yaml.safe_load_all((ROOT / "manifests/operator/deployment.yaml").read_text())
    deployment = next(d for d in docs if d and d.get("kind") == "Deployment")
    env: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return env


def _as_kubelet_sets(env: list[dict[str, Any]], pod: dict[str, str]) -> dict[str, str]:
    """The OTEL_* variables the operator process gets: `value`s with $(VAR) expanded from the
    entries before them, fieldRefs taken from ``pod``."""
    resolved: dict[str, str] = {}
    for entry in env:
        if "value" in entry:
            value = re.sub(r"\$\((\w+)\)", lambda m: resolved.get(m.group(1), m.group(0)), str(entry["value"]))
        else:
            value = pod[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        resolved[entry["name"]] = value
    return {name: value for name, value in resolved.items() if name.startswith("OTEL_")}


REFUSED = {
    "schedule-delay-0": ({"OTEL_BSP_SCHEDULE_DELAY": "0"}, "OTEL_BSP_SCHEDULE_DELAY"),
    "schedule-delay-negative": ({"OTEL_BSP_SCHEDULE_DELAY": "-5"}, "OTEL_BSP_SCHEDULE_DELAY"),
    "batch-larger-than-queue": (
        {"OTEL_BSP_MAX_QUEUE_SIZE": "256", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "512"},
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    ),
    "batch-larger-than-default-queue": ({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4096"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
    "queue-0": ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
    "span-limit": ({"OTEL_SPAN_EVENT_COUNT_LIMIT": "many"}, "OTEL_SPAN_EVENT_COUNT_LIMIT"),  # TracerProvider's
    "compression": ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "OTEL_EXPORTER_OTLP_COMPRESSION"),  # gRPC exporter's
    "traces-compression": (
        {"OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "zstd"},
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    ),
    # The gRPC exporter's float(): "could not convert string to float: 'abc'", naming nothing.
    "timeout": ({"OTEL_EXPORTER_OTLP_TIMEOUT": "abc"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
    "traces-timeout": ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "abc"}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"),
    "empty-traces-timeout": ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": ""}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"),
    "timeout-under-a-zero-traces-one": (
        {"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "0", "OTEL_EXPORTER_OTLP_TIMEOUT": "abc"},
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ),
}


@pytest.mark.parametrize(("settings", "variable"), REFUSED.values(), ids=REFUSED.keys())
def test_settings_the_sdk_refuses_stop_the_operator_at_start_naming_the_variable(
    settings: dict[str, str], variable: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """They passed main()'s check (which built the exporters only, and caught only ValueError),
    then setup_tracing() raised in kopf's startup handler: kopf retried every 60 s and the operator
    reconciled nothing while looking alive (or, for the compression, main() died with a traceback)."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://tempo:4317")
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    err = main_exits_2_before_kopf(
        monkeypatch, capsys, "kopf started: its startup handler's setup_tracing() would raise every minute"
    )
    assert err.startswith("koinon-operator: ") and err.count("\n") == 1, err
    assert variable in err, err


def test_a_span_limit_the_sdk_refuses_on_import_exits_2_naming_it() -> None:
    """The SDK reads OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT when its trace module is imported (by
    main()'s check), not when the provider is built: a traceback and exit 1 instead."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT="http://tempo:4317", OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT="many")
    ran = subprocess.run(
        [sys.executable, "-c", "from koinon_operator.main import main; main([])"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 2, ran.stderr[-2000:]
    assert ran.stderr.startswith("koinon-operator: OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT"), ran.stderr[-2000:]


@pytest.mark.parametrize("settings", [{}, {"OTEL_SPAN_EVENT_COUNT_LIMIT": "many"}, {"OTEL_BSP_SCHEDULE_DELAY": "0"}])
def test_the_start_check_leaves_no_batch_thread_running(
    settings: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It builds the whole pipeline; passed or refused halfway, what it built is shut down."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://tempo:4317")
    for name, value in settings.items():
        monkeypatch.setenv(name, value)

    def batch_threads() -> int:
        return sum(thread.name.startswith("OtelBatch") for thread in threading.enumerate())

    before = batch_threads()
    assert (exporter_settings_problem() is None) == (not settings)
    assert batch_threads() == before


CHECK_CASES = [
    {},
    {"OTEL_BSP_SCHEDULE_DELAY": "0"},
    {"OTEL_BSP_SCHEDULE_DELAY": "soon"},  # not an integer: the SDK logs it and takes its default
    {"OTEL_BSP_MAX_QUEUE_SIZE": "256", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "512"},
    {"OTEL_BSP_MAX_QUEUE_SIZE": "256", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "256"},
    {"OTEL_TRACES_SAMPLER": "sometimes"},  # unknown: the SDK logs it and takes its default
    {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
    {"OTEL_SPAN_EVENT_COUNT_LIMIT": "many"},
    {"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"},
    {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"},
    {"OTEL_RESOURCE_ATTRIBUTES": "not-a-pair"},
    {"OTEL_EXPORTER_OTLP_TIMEOUT": "abc"},  # over HTTP: the SDK logs it and takes its default
    {"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "5", "OTEL_EXPORTER_OTLP_TIMEOUT": "abc"},  # not read
    {"OTEL_EXPORTER_OTLP_TIMEOUT": "2.5"},
]


def test_a_timeout_the_grpc_exporter_does_not_read_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://tempo:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "5")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "abc")
    assert exporter_settings_problem() is None


def test_a_refusal_naming_no_variable_names_those_set_but_no_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever else the SDK may raise without naming its variable: the OTEL_* variables set are
    the ones to look at; their values are left out (OTEL_EXPORTER_OTLP_HEADERS holds API keys)."""
    from koinon_operator import telemetry

    def refused(_: str) -> None:
        raise ValueError("could not convert string to float: 'abc'")

    monkeypatch.setattr(telemetry, "_build_tracing", refused)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=s3cr3t")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "")  # empty: unset
    problem = exporter_settings_problem()
    assert problem is not None and problem.startswith("OTEL_* settings (OTEL_EXPORTER_OTLP_HEADERS): "), problem
    assert "s3cr3t" not in problem


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
@pytest.mark.parametrize("settings", CHECK_CASES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "none")
def test_setup_tracing_does_not_raise_where_the_start_check_passed(
    settings: dict[str, str], protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One code path: whatever main()'s check lets through, kopf's startup handler can set up."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://tempo:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    if exporter_settings_problem() is not None:
        return  # main() exits 2 before kopf starts
    provider = setup_tracing()
    assert provider is not None
    provider.shutdown()


@pytest.mark.parametrize(
    ("protocol", "default"), [("grpc", "localhost:4317"), ("http/protobuf", "http://localhost:4318/v1/traces")]
)
@pytest.mark.parametrize("empty", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "both"])
def test_an_empty_endpoint_variable_is_unset_for_an_explicit_otlp_exporter(
    protocol: str, default: str, empty: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: "`otlp` named explicitly without an endpoint uses the spec's default". The operator
    took "" as unset (and built the exporter), but the gRPC exporter reads the generic variable
    with a default only for a missing one: it dialled the empty target and exported nothing."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        if empty in (name, "both"):
            monkeypatch.setenv(name, "")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    assert exporter_settings_problem() is None
    assert _exporter_endpoint() == default


@pytest.mark.parametrize(
    ("protocol", "expected"), [("grpc", "tempo:4317"), ("http/protobuf", "http://tempo:4317/v1/traces")]
)
def test_an_empty_traces_endpoint_leaves_the_generic_one(
    protocol: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://tempo:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    assert _exporter_endpoint() == expected


def test_an_empty_endpoint_without_otlp_named_still_exports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    assert setup_tracing() is None


POD = {"metadata.name": "koinon-operator-5d9c-x2x7k", "metadata.namespace": "koinon-system"}


def test_the_manifest_sets_no_empty_otel_variable() -> None:
    """An empty value is not the same as no variable to every SDK (the gRPC exporter dialled "")."""
    empty = [name for name, value in _as_kubelet_sets(_manifest_env(), POD).items() if value == ""]
    assert not empty, f"manifests/operator/deployment.yaml sets {empty} to an empty string"


def test_the_manifests_service_name_is_the_default_and_an_sres_resource_attribute_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTEL_SERVICE_NAME beats service.name in OTEL_RESOURCE_ATTRIBUTES (spec): the Deployment set
    it to koinon-operator (the operator's default anyway), so an SRE's service.name there was
    silently ignored."""
    env = _as_kubelet_sets(_manifest_env(), POD)
    assert "OTEL_SERVICE_NAME" not in env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    attributes = resource_attributes()
    assert attributes["service.name"] == "koinon-operator"
    assert attributes["k8s.pod.name"] == POD["metadata.name"]
    # The SRE adds service.name to the manifest's OTEL_RESOURCE_ATTRIBUTES.
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"service.name=koinon-prod,{env['OTEL_RESOURCE_ATTRIBUTES']}")
    assert resource_attributes()["service.name"] == "koinon-prod"
