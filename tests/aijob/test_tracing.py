"""Every AIJob produces one OpenTelemetry trace, exported over real OTLP/gRPC."""

from __future__ import annotations

import os
import time

import pytest

from tests.aijob.conftest import ControlPlane, aijob
from tests.aijob.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.slow


def test_job_trace_reaches_an_otlp_backend(control_plane: ControlPlane, namespace: str) -> None:
    receiver = OtlpReceiver()
    receiver.start()
    saved = dict(os.environ)
    os.environ.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_SERVICE_NAME="koinon-operator-test", OTEL_BSP_SCHEDULE_DELAY="200",
    )  # fmt: skip
    try:
        operator = control_plane.start_operator(namespace)  # inherits the OTEL_* environment
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        control_plane.apply(
            aijob("traced", namespace, "python -m koinon_examples.monte_carlo_pi --tasks 2 --samples 1000")
        )
        done = control_plane.wait_phase("traced", namespace, "Succeeded", timeout=90)
        trace_id = done["status"]["traceId"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(s.name == "aijob" for s in receiver.spans()):
            time.sleep(0.2)
    finally:
        operator.stop(grace_seconds=5)
        receiver.stop()
    spans = [s for s in receiver.spans() if s.trace_id == trace_id]
    names = {s.name for s in spans}
    root = next(s for s in spans if s.name == "aijob")
    assert {"aijob.Accepted", "aijob.Scheduled", "aijob.Submitted", "aijob.Running", "aijob.Completed",
            "ray.job"} <= names, names  # fmt: skip
    assert root.parent_span_id == ""
    assert all(s.parent_span_id == root.span_id for s in spans if s is not root)
    assert root.service_name == "koinon-operator-test"
    assert root.attributes["koinon.aijob"] == f"{namespace}/traced"
    assert root.attributes["koinon.aijob.namespace"] == namespace and root.attributes["koinon.aijob.name"] == "traced"
    assert root.start_ns <= min(s.start_ns for s in spans) and root.end_ns >= max(s.end_ns for s in spans)
    assert root.status_code == 1  # STATUS_CODE_OK
