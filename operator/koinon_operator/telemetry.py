"""OpenTelemetry traces of every AIJob, exported over OTLP to the SREs' own backend.

One trace per job, with ids derived from the object's uid (trace id and root span id are hashes of
it, see ``trace_id_for``), so spans emitted by different operator processes over the job's life
(restarts included) land in the same trace. Each transition the operator posts as an Event is also
a span; when the job finishes, or is deleted before, the root span covering creation
to completion (or deletion) and a span for the Ray run are emitted, once per operator process (see
``JobTracer``). A run that a suspension ends gets its span with the suspension.

Configuration is the standard ``OTEL_*`` environment: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) turns export on, over gRPC or, with
``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL=http/protobuf``, over HTTP; ``OTEL_SERVICE_NAME`` or
``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES`` (default ``koinon-operator``), ``OTEL_BSP_*`` and
``OTEL_TRACES_SAMPLER`` work as usual (a job's spans follow its root span's sampling decision);
``OTEL_TRACES_EXPORTER=none`` turns it off, ``console`` prints spans, ``otlp`` named explicitly
exports to the spec's default endpoint when none is given (an empty endpoint variable counts as
unset); ``OTEL_SDK_DISABLED=true`` turns it off. A malformed ``OTEL_EXPORTER_OTLP_(TRACES_)HEADERS``
item, or a header the exporter could not send once URL-decoded, is refused at start, its values
never shown; so is any setting the SDK refuses while the pipeline is built
(``exporter_settings_problem``).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import importlib.metadata
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.re import parse_env_headers

from koinon_operator.api.aijob import parse_time

_forced_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("koinon_ids", default=None)


class JobIdGenerator(IdGenerator):
    """Random ids, except while a job's root span is being created (then the job's own ids)."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        forced = _forced_ids.get()
        return forced[1] if forced else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        forced = _forced_ids.get()
        return forced[0] if forced else self._random.generate_trace_id()


def trace_id_for(uid: str) -> str:
    """The job's OpenTelemetry trace id (32 hex digits), derived from its uid so it survives restarts."""
    # Hashed, never the uid as it is: a UUID's variant bits pin the low 64 bits that trace-id ratio
    # samplers read to a quarter of their range, so a 10 % ratio kept no job and 80 % every job.
    return hashlib.sha256(uid.encode()).hexdigest()[:32]


def job_trace_ids(trace_id_hex: str) -> tuple[int, int]:
    root_span = int(hashlib.sha256(f"root:{trace_id_hex}".encode()).hexdigest()[:16], 16) or 1
    return int(trace_id_hex, 16), root_span


def root_sampled(trace_id_hex: str, provider: object | None = None) -> bool:
    """Whether the configured sampler keeps the job's root span. Samplers decide from the trace
    id (ratio) or always, so every pass and every operator process reaches the same answer."""
    provider = provider if provider is not None else trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        # No SDK configured: the root span is never recorded, so the Ray job must not record
        # spans under it either (they would be orphans in the SRE's backend).
        return False
    trace_id, _ = job_trace_ids(trace_id_hex)
    decision = provider.sampler.should_sample(None, trace_id, "aijob", SpanKind.SERVER).decision
    return decision is Decision.RECORD_AND_SAMPLE


def traceparent(trace_id_hex: str, sampled: bool | None = None) -> str:
    """W3C trace context for the job's root span, handed to the Ray job so its own spans join
    (and are dropped with it when the root is not sampled)."""
    _, root_span = job_trace_ids(trace_id_hex)
    keep = root_sampled(trace_id_hex) if sampled is None else sampled
    return f"00-{trace_id_hex}-{root_span:016x}-{'01' if keep else '00'}"


# Where the job's own output starts in Events and status messages: the tail of its log after a
# failure, its declared result after a success, and the log Ray quotes in a failed job's message.
# Spans stop there: what the user's job printed is for its namespace, not for the SREs' backend.
LOG_TAIL_SEPARATOR = "\n--- log tail ---\n"
RESULT_SEPARATOR = "; result: "
RAY_QUOTED_LOGS = ", last available logs"  # Ray: "... failed with exit code 1, last available logs (...):\n..."
_JOB_OUTPUT_STARTS = (LOG_TAIL_SEPARATOR, RESULT_SEPARATOR, RAY_QUOTED_LOGS, "\n")


def operator_part(message: str) -> str:
    """``message`` up to where the job's own output (or any second line) starts."""
    for start in _JOB_OUTPUT_STARTS:
        message = message.split(start, 1)[0]
    return message


OTLP_PROTOCOLS = ("grpc", "http/protobuf")
TRACES_EXPORTERS = ("otlp", "console", "none")
# The spec's default OTLP/gRPC endpoint (a node-local agent or a collector sidecar).
OTLP_GRPC_DEFAULT_ENDPOINT = "http://localhost:4317"


def _sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _exporters_from_env() -> list[SpanExporter]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names (a comma-separated list, default ``otlp``).

    ``otlp`` by default only once an endpoint is given; named explicitly, it uses the spec's
    default endpoint (localhost:4317, or :4318 over HTTP: a node-local agent or a sidecar)."""
    if _sdk_disabled():
        return []
    setting = os.environ.get("OTEL_TRACES_EXPORTER", "").strip() or None  # empty is unset, as the spec says
    names = [name.strip().lower() for name in (setting or "otlp").split(",") if name.strip()]
    unknown = [name for name in names if name not in TRACES_EXPORTERS]
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: {', '.join(map(repr, unknown))} not supported; use {TRACES_EXPORTERS}")
    if "none" in names:
        return []
    exporters: list[SpanExporter] = []
    if "console" in names:
        exporters.append(ConsoleSpanExporter())
    if "otlp" in names:
        otlp = _otlp_exporter(explicit=setting is not None)
        if otlp is not None:
            exporters.append(otlp)
    return exporters


def _otlp_exporter(explicit: bool) -> SpanExporter | None:
    # An empty variable is unset (as for every OTEL_* variable the spec defines).
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint and not explicit:
        return None
    variable = next(
        (
            name
            for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
            if os.environ.get(name)
        ),
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    )
    protocol = (os.environ.get(variable) or "grpc").strip()
    _check_otlp_headers(grpc=protocol == "grpc")
    # Each exporter reads headers, TLS settings and compression from OTEL_* itself.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        _check_otlp_grpc_timeout()

        # The endpoint given, not read by the exporter: it takes an empty OTEL_EXPORTER_OTLP_ENDPOINT
        # as set (its default only stands in for a missing one) and dials the empty target,
        # exporting nothing, where "otlp named explicitly" promises the spec's default.
        return OTLPSpanExporter(endpoint=endpoint or OTLP_GRPC_DEFAULT_ENDPOINT)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        # The HTTP exporter takes empty variables as unset itself, and appends /v1/traces to the
        # generic endpoint only (tests/aijob/test_tracing_settings.py holds it to both).
        return HttpSpanExporter()
    # Failing loudly: an exporter of the wrong protocol would fail every export in the background.
    raise ValueError(f"{variable}: {protocol!r} is not supported; use one of {OTLP_PROTOCOLS}")


def _check_otlp_grpc_timeout() -> None:
    """The gRPC exporter reads its timeout with a bare float(): its ValueError ("could not convert
    string to float: 'abc'") names no variable. The one it reads: the signal's own where set (even
    empty), the generic one where that is unset or 0. (The HTTP exporter logs a bad one and takes
    its default.)"""
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        value = os.environ.get(variable)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"{variable}: {value[:64]!r} is not a number of seconds") from None
        if seconds:
            return


# An item of OTEL_EXPORTER_OTLP_(TRACES_)HEADERS as both OTLP exporters parse it
# (opentelemetry.util.re.parse_env_headers, liberal=True): name=value, the value URL-encoded or
# plain with spaces; items are separated by commas.
_HEADER_NAME = r"[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+"
_HEADER_VALUE = r"[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"
_HEADER_ITEM = re.compile(rf"[ \t]*{_HEADER_NAME}[ \t]*=[ \t]*{_HEADER_VALUE}[ \t]*")
# Quotes left in from YAML or a shell: the SDK would take them as part of the name or the value
# and send a header the backend does not know (every export refused, nothing logged).
_QUOTED = re.compile(r"""\s*['"]|.*=\s*'.*'\s*$""")
_HEADER_DELIMITER = re.compile(r"[ \t]*,[ \t]*")
OTLP_HEADERS_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
# What each transport can send, judged on the header as the SDK hands it over: name and value
# URL-decoded (as UTF-8), the name lowercased. Anything else fails every export in the background.
# HTTP (requests, then http.client, which encodes Latin-1): the name a token; the value tab, space,
# printable ASCII or Latin-1 letters, no control character (a CR or LF makes requests refuse the
# header, and the SDK log the refusal with the value, the API key, at ERROR at every batch).
_HTTP_HEADER_NAME = re.compile(_HEADER_NAME)
_HTTP_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\xa0-\xff]*")
# gRPC metadata (validate_metadata.cc): keys of lowercase letters, digits, "-", "_" and "."; values
# of printable ASCII. A "-bin" key wants bytes, and the SDK passes text (TypeError at every export).
_GRPC_KEY = re.compile(r"[0-9a-z_.-]+")
_GRPC_VALUE = re.compile(r"[\x20-\x7e]*")


def _check_otlp_headers(grpc: bool) -> None:
    """Refuses an item the SDK would not parse, naming its variable and position only: the SDK
    logs such an item whole (an API key with it) and then exports without that header, so every
    batch fails with 401 in the background while the operator looks healthy. Refuses too a header
    the exporter (over gRPC when ``grpc``, else HTTP) cannot send once the SDK has URL-decoded it,
    naming its variable, position and name, never its value."""
    # Only the variable the exporter reads: the signal's own, else the generic one (a generic value
    # meant for other signals or SDKs must not stop the operator when the traces one is set).
    variable = next((v for v in OTLP_HEADERS_VARIABLES if os.environ.get(v)), None)
    if variable is None:
        return
    items = _HEADER_DELIMITER.split(os.environ[variable])
    for number, item in enumerate(items, 1):
        if not item.strip():
            continue
        if _HEADER_ITEM.fullmatch(item.strip()) is None or _QUOTED.match(item):
            raise ValueError(
                f"{variable}: item {number} is not name=value (value not shown); write items as "
                'name=value separated by commas, without quotes, URL-encoding any , ; \\ or "'
            )
        # Decoded by the SDK's own parser, as both exporters do: an item whose value has a space in
        # it is taken as written, any other URL-decoded (so "%0A" in the text is a line break).
        # It logs nothing here: the item passed the check above, which is its liberal pattern.
        written_name = item.split("=", 1)[0].strip()  # a token (checked above): no secret in it
        for name, value in parse_env_headers(item, liberal=True).items():
            problem = _grpc_header_problem(name, value) if grpc else _http_header_problem(name, value)
            if problem is not None:
                raise ValueError(f"{variable}: item {number} ({written_name}): {problem}; value not shown")


def _http_header_problem(name: str, value: str) -> str | None:
    if _HTTP_HEADER_NAME.fullmatch(name) is None:
        return "its URL-decoded name is not an HTTP header name"
    if _HTTP_HEADER_VALUE.fullmatch(value) is None:
        if any(ord(character) > 0xFF for character in value):
            # Also a %XX that is not UTF-8: the SDK decodes it to U+FFFD.
            return "its URL-decoded value holds a character beyond Latin-1, which HTTP headers cannot carry"
        return "its URL-decoded value holds a control character (a line break, say)"
    return None


def _grpc_header_problem(name: str, value: str) -> str | None:
    if _GRPC_KEY.fullmatch(name) is None:
        return "its URL-decoded name is not a gRPC metadata key (lowercase letters, digits, - _ .)"
    if name.endswith("-bin"):
        return "a -bin (binary) gRPC metadata key, which the exporter cannot send"
    if _GRPC_VALUE.fullmatch(value) is None:
        return "its URL-decoded value holds a character gRPC metadata cannot carry (printable ASCII only)"
    return None


# The batch span processor's parameters, each with the OTEL_BSP_* variable it is read from: the
# SDK's refusal names the parameter, the SRE wrote the variable.
_BSP_VARIABLES = {
    "max_queue_size": "OTEL_BSP_MAX_QUEUE_SIZE",
    "schedule_delay_millis": "OTEL_BSP_SCHEDULE_DELAY",
    "max_export_batch_size": "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
}


def _batch_processor(exporter: SpanExporter) -> BatchSpanProcessor:
    try:
        return BatchSpanProcessor(exporter)  # OTEL_BSP_*, read and judged by the SDK
    except ValueError as error:
        named = [variable for parameter, variable in _BSP_VARIABLES.items() if parameter in str(error)]
        settings = ", ".join(
            f"{variable}={os.environ[variable]}" if os.environ.get(variable) else f"{variable} (unset)"
            for variable in named or _BSP_VARIABLES.values()
        )
        raise ValueError(f"{settings}: refused by the batch span processor ({error})") from error


def _build_tracing(service_name: str) -> TracerProvider | None:
    """The pipeline the OTEL_* settings describe (each exporter behind a batch processor, in a
    provider with its resource, sampler and span limits), not installed; None: tracing is off.
    Both main()'s start check and kopf's startup handler build it here, so whatever the SDK
    refuses stops the operator at start instead of failing the startup handler, which kopf retries
    every minute while the operator reconciles nothing and looks alive."""
    exporters = _exporters_from_env()
    if not exporters:
        return None
    processors: list[BatchSpanProcessor] = []
    try:
        for exporter in exporters:
            processors.append(_batch_processor(exporter))
        resource = Resource.create()  # OTEL_SERVICE_NAME, then service.name in OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": service_name}))
        if "service.version" not in resource.attributes:
            resource = resource.merge(Resource({"service.version": _version()}))
        # The sampler (OTEL_TRACES_SAMPLER) and span limits (OTEL_SPAN_*) are read here.
        provider = TracerProvider(resource=resource, id_generator=JobIdGenerator())
    except BaseException:
        # Refused halfway: stop the processors' threads and the exporters' channels built so far.
        for processor in processors:
            processor.shutdown()  # type: ignore[no-untyped-call]  # its exporter too
        for exporter in exporters[len(processors) :]:
            exporter.shutdown()
        raise
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def exporter_settings_problem() -> str | None:
    """What is wrong with the OTEL_* tracing settings (None: nothing): builds, from the same code,
    the pipeline ``setup_tracing`` builds, and shuts it down."""
    try:
        provider = _build_tracing("koinon-operator")
    except Exception as error:
        # Any exception: the SDK's own refusals are not all ValueErrors (the gRPC exporter raises
        # InvalidCompressionValueException), and each would otherwise come out of kopf's startup
        # handler. Ours and the SDK's messages name their variable.
        message = str(error)
        if "OTEL_" in message:
            return message
        # A refusal that names no variable: the OTEL_* ones set, by name only (a value may be a
        # secret: OTEL_EXPORTER_OTLP_HEADERS carries API keys).
        named = sorted(name for name, value in os.environ.items() if name.startswith("OTEL_") and value)
        return f"OTEL_* settings ({', '.join(named) or 'none set'}): {type(error).__name__}: {message}"
    if provider is not None:
        provider.shutdown()
    return None


def setup_tracing(service_name: str = "koinon-operator") -> TracerProvider | None:
    """Installs the pipeline the OTEL_* settings describe. Raises nothing for settings that
    ``exporter_settings_problem`` (main()'s start check) passed: both build it in ``_build_tracing``."""
    provider = _build_tracing(service_name)
    if provider is not None:
        trace.set_tracer_provider(provider)
    return provider


async def shutdown_tracing(provider: TracerProvider, timeout_s: float) -> bool:
    """Flushes the spans still batched and stops the exporters, waiting at most ``timeout_s``
    (True: done in time). With a collector that does not answer, ``provider.shutdown()`` blocks
    30 s (the batch processor's join; its force_flush ignores any timeout), which on the event loop
    holds up the whole cleanup and a rollout until SIGKILL. A daemon thread, not the loop's
    executor: one still stuck does not keep the process, nor asyncio.run's exit, waiting."""
    thread = threading.Thread(target=provider.shutdown, name="koinon-tracing-shutdown", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return not thread.is_alive()


def _version() -> str:
    try:
        return importlib.metadata.version("koinon")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _ns(moment: datetime | None) -> int | None:
    return int(moment.timestamp() * 1e9) if moment else None


# How many jobs' root spans a JobTracer remembers having emitted (a trace id each): far more jobs
# than finish or are deleted within STALE_BODY_GRACE_SECONDS, the longest a repeat comes after.
ROOTS_REMEMBERED = 10_000


class JobTracer:
    """Turns a reconcile pass's transitions into spans of the job's trace.

    A job's root span (and its ``ray.job`` span) is emitted once per process, remembered by trace
    id: a finishing pass repeated because its status write never landed, or a deletion handler
    judging from a body older than the pass that finished the job (reconciler.stop waited for that
    pass), must not emit a second span with the root's id. Another process (after a restart or a
    change of leader) does not know: replaying a finishing pass whose write was lost emits it again.

    A job's first pass gives it its trace id (``status.traceId``); a deletion whose body predates
    that pass's status write still finds the trace (and the status that pass left) here, if a pass
    of this process emitted spans into it."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("koinon.operator") if provider else None
        self._roots_emitted: dict[int, None] = {}  # trace ids, oldest first
        # Trace id -> the status left by this process's pass that emitted the job's first spans,
        # until a body shows status.traceId (its write landed) or the root is emitted; oldest first.
        self._first_passes: dict[int, Mapping[str, Any]] = {}
        # (trace id, the run's startTime) of the runs ended by a suspension whose ray.job span this
        # process emitted (_suspended_run); oldest first.
        self._runs_emitted: dict[tuple[int, datetime], None] = {}

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def record(
        self, body: Mapping[str, Any], status_written: Mapping[str, Any], events: Sequence[tuple[str, str, str]]
    ) -> None:
        """``events`` are (type, reason, message) of the transitions this pass made."""
        if self._tracer is None or not events:
            return
        before = body.get("status") or {}
        # The pass writes a JSON merge patch (reconciler.changed_fields): nested objects hold only
        # what changed (a rerun's verification without its unchanged copies, a failover's
        # scheduling without its owners), so it is applied as the API server applies it.
        status = apply_merge_patch(before, status_written)
        # Named from the status the pass started from when the pass cleared them: the spans of a
        # failed, lost or interrupted attempt must still say where it ran.
        job = self._job(body, status, before)
        if job is None:
            return
        # A list first: every transition gets its span, and a pass without events ends nothing here.
        ends = [self._transition(job, status, event_type, reason, message) for event_type, reason, message in events]
        if before.get("traceId"):
            # The first pass's write landed: a deletion's body (taken later) carries the trace id.
            self._first_passes.pop(job.trace_id, None)
        else:
            # The pass that set status.traceId: a deletion whose body kopf took before that write
            # landed must still end this trace with its root (see deleted()).
            self._first_passes[job.trace_id] = status
            while len(self._first_passes) > ROOTS_REMEMBERED:
                del self._first_passes[next(iter(self._first_passes))]
        last_end = max(ends, default=None)
        if status_written.get("phase") == "Suspended" and before.get("phase") != "Suspended":
            self._suspended_run(job, before, status)
        # The root span once, in the pass that finished the job (not again in the TTL deletion's,
        # nor in a repeat of the pass whose status write was lost).
        finished_now = status_written.get("phase")
        if (
            finished_now in ("Succeeded", "Failed")
            and before.get("phase") != finished_now
            and not self._root_emitted(job)
        ):
            failed = finished_now == "Failed"
            self._finish(job, status, StatusCode.ERROR if failed else StatusCode.OK, last_end)

    def deleted(self, body: Mapping[str, Any], events: Sequence[tuple[str, str, str]] = ()) -> None:
        """A job deleted before it finished: its trace still gets its root span (and the Ray run's,
        if it ran), ending at the deletion, or the transitions' parent would never arrive.
        ``events`` are the deletion's own (Stopped, or a StopUnconfirmed Warning: then the root
        says ERROR, since the Ray job may still run)."""
        if self._tracer is None:
            return
        status = dict(body.get("status") or {})
        if not status.get("traceId"):
            # The deletion's body predates the first pass's status write: kopf took it while that
            # pass ran (reconciler.stop waited for it), and that pass's spans name as their parent
            # the root of the trace derived from the uid. The root is emitted with the status that
            # pass left. A job no pass of this process emitted spans for gets no trace at all
            # rather than a lone root that no status.traceId ever pointed to.
            uid = str((body.get("metadata") or {}).get("uid") or "")
            first_pass = self._first_passes.get(job_trace_ids(trace_id_for(uid))[0]) if uid else None
            if first_pass is None:
                return
            status = dict(first_pass)
        if status.get("phase") in ("Succeeded", "Failed"):
            return  # the finishing pass emitted the root
        job = self._job(body, status)
        if job is None or self._root_emitted(job):
            # Emitted already: by the pass that finished the job after kopf took this (deletion)
            # body, which the deletion handler waited for; or by this handler's earlier try.
            return
        deleted_at = (body.get("metadata") or {}).get("deletionTimestamp")
        status.update(completionTime=deleted_at or status.get("completionTime"), reason="Deleted")
        for event_type, reason, message in events:
            self._transition(job, status, event_type, reason, message)
        last_end = self._transition(
            job, status, "Normal", "Deleted", f"deleted while {status.get('phase') or 'Pending'}"
        )
        warnings = [(reason, message) for event_type, reason, message in events if event_type == "Warning"]
        if warnings:
            status.update(reason=warnings[0][0], message=warnings[0][1])
        self._finish(job, status, StatusCode.ERROR if warnings else StatusCode.UNSET, last_end)

    def _suspended_run(self, job: _TracedJob, before: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        """The ``ray.job`` span of a run that a suspension ended (its Ray job stopped), emitted with
        the Suspended transition: the suspension clears status.startTime (a resumed run's deadline
        counts from its own start), so the span ``_finish`` emits covers only the last run, and a job
        deleted while suspended would have none. Emitted in the pass that wrote the phase, as its
        ``aijob.Suspended`` span is: a later process (a restart, a new leader) sees the job
        Suspended already and emits nothing; this one emits it once per run (``_runs_emitted``),
        even when that pass is repeated after its status write was lost."""
        assert self._tracer is not None
        start = parse_time(before.get("startTime"))  # None: the run never started on Ray
        if start is None or (job.trace_id, start) in self._runs_emitted:
            return
        self._runs_emitted[(job.trace_id, start)] = None
        while len(self._runs_emitted) > ROOTS_REMEMBERED:
            del self._runs_emitted[next(iter(self._runs_emitted))]
        # When the operator suspended it, by the clock that wrote startTime (whole seconds).
        suspended = next(
            (c.get("lastTransitionTime") for c in status.get("conditions") or [] if c.get("type") == "Suspended"),
            None,
        )
        end = parse_time(suspended) or datetime.now(start.tzinfo)
        self._ray_run(job, start, end, "Suspended")

    def _ray_run(self, job: _TracedJob, start: datetime, end: datetime, phase: str, error: str | None = None) -> None:
        """One run of the job on Ray: ``phase`` is the job's when the run ended (Suspended, or the
        phase it finished or was deleted in); ``error``, the reason of a run that failed."""
        assert self._tracer is not None
        run = self._tracer.start_span(
            "ray.job", context=job.parent, kind=SpanKind.CLIENT, attributes=job.attributes, start_time=_ns(start)
        )
        run.set_attribute("koinon.phase", phase)
        if error is not None:
            run.set_status(Status(StatusCode.ERROR, error))
        # A deletion (or suspension) in the second the run started has a whole-second timestamp before it.
        run.end(end_time=_ns(max(start, end)))

    def _root_emitted(self, job: _TracedJob) -> bool:
        return job.trace_id in self._roots_emitted

    def _job(
        self, body: Mapping[str, Any], status: Mapping[str, Any], before: Mapping[str, Any] | None = None
    ) -> _TracedJob | None:
        trace_id_hex = status.get("traceId")
        if not trace_id_hex:
            return None
        meta = body.get("metadata") or {}
        trace_id, root_span = job_trace_ids(trace_id_hex)
        # The parent's flags carry the root span's sampling decision: a parent-based sampler then
        # keeps or drops the transitions with their root, never exporting orphans.
        sampled = root_sampled(trace_id_hex, self._provider)
        parent = trace.set_span_in_context(
            NonRecordingSpan(SpanContext(trace_id, root_span, is_remote=True, trace_flags=TraceFlags(int(sampled))))
        )
        placed = status if status.get("assignedNodes") or before is None else before
        attributes: dict[str, str | int] = {
            "koinon.aijob": f"{meta.get('namespace')}/{meta.get('name')}",
            "koinon.aijob.name": str(meta.get("name")),
            # Not k8s.namespace.name: that is the operator pod's (resource), and backends that merge
            # resource and span attributes would give one name two meanings.
            "koinon.aijob.namespace": str(meta.get("namespace")),
            "koinon.aijob.uid": str(meta.get("uid")),
            "koinon.attempt": int(status.get("attempts") or 0),
            "koinon.nodes": ",".join(placed.get("assignedNodes") or []),
            "koinon.owners": ",".join((placed.get("scheduling") or {}).get("owners") or []),
            "koinon.ray.submission_id": str(status.get("submissionId") or placed.get("submissionId") or ""),
        }
        verification = status.get("verification") or {}
        if verification:
            attributes["koinon.verification.copies"] = int(verification.get("copies") or 0)
            attributes["koinon.verification.agreeing"] = ",".join(verification.get("agreeing") or [])
            attributes["koinon.verification.disagreeing"] = ",".join(verification.get("disagreeing") or [])
            # Copies stopped (or whose log could not be read) once the others had decided the vote:
            # neither agreeing nor disagreeing.
            attributes["koinon.verification.stopped"] = ",".join(verification.get("stopped") or [])
        return _TracedJob(meta, attributes, parent, trace_id, root_span)

    def _transition(
        self, job: _TracedJob, status: Mapping[str, Any], event_type: str, reason: str, message: str
    ) -> int:
        """Emits the span and returns when it ended (ns), for the root span to cover it."""
        assert self._tracer is not None
        span = self._tracer.start_span(f"aijob.{reason}", context=job.parent, attributes=job.attributes)
        span.set_attribute("koinon.phase", str(status.get("phase")))
        message = operator_part(message)
        span.set_attribute("koinon.message", message[:1000])
        if event_type == "Warning":
            span.set_status(Status(StatusCode.ERROR, message[:200]))
        end = time.time_ns()
        span.end(end_time=end)
        return end

    def _finish(
        self, job: _TracedJob, status: Mapping[str, Any], outcome: StatusCode, last_child_end: int | None
    ) -> None:
        """``last_child_end``: when the last transition span of this pass ended. The root ends no
        earlier: its recorded end (completionTime, or the deletion's timestamp in whole seconds)
        comes before the spans of the pass that emits it, and backends flag children that outlive
        their parent (and cut them off in the waterfall)."""
        assert self._tracer is not None
        self._first_passes.pop(job.trace_id, None)
        self._roots_emitted[job.trace_id] = None
        while len(self._roots_emitted) > ROOTS_REMEMBERED:
            del self._roots_emitted[next(iter(self._roots_emitted))]
        start, end = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
        if start and end:  # no startTime: the job never ran, or its last run ended in a suspension
            error = str(status.get("reason")) if outcome is StatusCode.ERROR else None
            self._ray_run(job, start, end, str(status.get("phase")), error)
        token = _forced_ids.set((job.trace_id, job.root_span))
        try:
            # One name for every job's root (span names must stay low-cardinality for span metrics
            # and breakdowns); the job is in its attributes.
            root = self._tracer.start_span(
                "aijob",
                context=trace.set_span_in_context(trace.INVALID_SPAN),
                kind=SpanKind.SERVER,
                attributes={**job.attributes, "koinon.phase": str(status.get("phase")),
                            "koinon.reason": str(status.get("reason"))},
                start_time=_ns(parse_time(job.meta.get("creationTimestamp"))),
            )  # fmt: skip
        finally:
            _forced_ids.reset(token)
        if outcome is not StatusCode.UNSET:
            description = f"{status.get('reason')}: {operator_part(str(status.get('message') or ''))}"
            root.set_status(Status(outcome, description[:200]) if outcome is StatusCode.ERROR else Status(outcome))
        ends = [moment for moment in (_ns(end), last_child_end) if moment]
        root.end(end_time=max(ends) if ends else None)


def apply_merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``patch``, a JSON merge patch (RFC 7386), applied to ``target``: objects merged key by key,
    a null removes its key (in an object the patch adds, too), any other value replaces."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping):
            current = merged.get(key)
            merged[key] = apply_merge_patch(current if isinstance(current, Mapping) else {}, value)
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class _TracedJob:
    """What every span of one job's trace shares."""

    meta: Mapping[str, Any]
    attributes: dict[str, str | int]
    parent: Any  # the OpenTelemetry context whose current span is the job's root
    trace_id: int
    root_span: int
