"""Join the AIJob's trace from inside the job.

The operator hands the job its trace's root span in ``TRACEPARENT`` (W3C trace context), but no
OpenTelemetry SDK, nor ``opentelemetry-instrument``, reads that variable from the environment: the
job extracts it itself. Its spans are exported only where the job configures an SDK (e.g. run
under ``opentelemetry-instrument`` with ``OTEL_EXPORTER_OTLP_ENDPOINT`` in its runtimeEnv, never a
credential: volunteers can read the runtimeEnv, see README "Tracing"); otherwise they cost nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


@contextmanager
def job_span(name: str, tracer_provider: TracerProvider | None = None) -> Iterator[None]:
    """A span named ``name`` under the AIJob's root span (a trace of its own without TRACEPARENT;
    nothing at all where OpenTelemetry is not installed in the job's environment)."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except Exception:  # not installed, or a setting of the volunteer's it cannot load: no span
        yield
        return
    carrier = {"traceparent": os.environ["TRACEPARENT"]} if os.environ.get("TRACEPARENT") else {}
    tracer = trace.get_tracer("koinon_examples", tracer_provider=tracer_provider)
    # TRACEPARENT is W3C trace context by the operator's contract, whatever OTEL_PROPAGATORS the
    # job's environment names (b3 or none would start a trace of its own; an xray that is not
    # installed made importing opentelemetry.propagate raise, failing the job itself).
    with tracer.start_as_current_span(name, context=TraceContextTextMapPropagator().extract(carrier)):
        yield
