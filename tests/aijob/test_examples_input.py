"""The examples and `koinon demo` with what a user may hand them: a wrong example file, more
volunteers than one, fewer texts than volunteers; and their spans join the AIJob's trace. No
cluster is started (Ray's calls are stood in for where the embedding model would run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import koinon_examples.embed_texts as embed_texts
import pytest
from koinon_dev.demo import read_example


def test_koinon_demo_with_a_missing_example_says_so_without_a_traceback(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-c", "from koinon_dev.cli import main; main()",
         "demo", "--example", str(tmp_path / "nonexistent.yaml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 1
    assert "koinon: cannot read the AIJob example" in ran.stderr and "Traceback" not in ran.stderr, ran.stderr


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("kind: AIJob\nspec: {}\n", "metadata.name is missing"),
        ("- a\n- b\n", "metadata.name is missing"),
        ("metadata: {name: x, namespace: 7}\n", "metadata.namespace must be a name"),
        ("metadata: [unclosed\n", "cannot read the AIJob example"),
    ],
)
def test_a_malformed_example_is_named_before_anything_starts(tmp_path: Path, text: str, complaint: str) -> None:
    example = tmp_path / "job.yaml"
    example.write_text(text)
    with pytest.raises(RuntimeError, match=complaint):
        read_example(example)


def test_the_shipped_examples_name_their_job() -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    assert read_example(examples / "numeric-job.yaml")[0] and read_example(examples / "embedding-job.yaml")[0]


def run_embedding(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], replicas: int) -> dict[str, Any]:
    """embed_texts.main() on ``replicas`` volunteers; each text's vector stands for its position, and
    texts 0 and 1 get the same vector (so their similarity is 1)."""

    def vectors(texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0] if embed_texts.DEFAULT_TEXTS.index(t) < 2 else [0.0, 1.0] for t in texts]

    monkeypatch.setenv("KOINON_NODE_ADDRESSES", ",".join(f"127.1.0.{i + 1}" for i in range(replicas)))
    monkeypatch.setenv("KOINON_GPUS_PER_REPLICA", "1")
    monkeypatch.setattr(embed_texts.ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(embed_texts.ray, "get", lambda futures: futures)
    remote = types.SimpleNamespace(remote=vectors)
    monkeypatch.setattr(embed_texts, "embed_shard", types.SimpleNamespace(options=lambda **_: remote))
    monkeypatch.setattr(sys, "argv", ["embed_texts"])
    embed_texts.main()
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("KOINON_RESULT "))
    result: dict[str, Any] = json.loads(line.split(" ", 1)[1])
    return result


def test_the_embedding_result_does_not_depend_on_the_number_of_volunteers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Round-robin shards put the vectors back as 0,2,4,1,3,5: with two volunteers the job reported
    texts 0 and 2's similarity, and a digest of its own."""
    one = run_embedding(monkeypatch, capsys, 1)
    assert one["similarity_0_1"] == 1.0 and one["texts"] == 6
    for replicas in (2, 4, 8):  # 8: more volunteers than texts
        assert run_embedding(monkeypatch, capsys, replicas) == one


def test_shards_are_consecutive_and_cover_every_text_once() -> None:
    texts = [str(i) for i in range(7)]
    for replicas in range(1, 10):
        shards = embed_texts.shard_texts(texts, replicas)
        assert len(shards) == replicas and [t for s in shards for t in s] == texts


def test_the_examples_spans_join_the_aijobs_trace_from_traceparent(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: "an instrumented job joins the trace". No SDK reads TRACEPARENT from the environment
    by itself: without the example's own extraction its spans started traces of their own."""
    from koinon_examples.tracing import job_span
    from koinon_operator.telemetry import traceparent
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace_id = "8f6e8530892f46a5a4e3ba60e32a06d0"
    monkeypatch.setenv("TRACEPARENT", traceparent(trace_id, sampled=True))  # as the operator sets it
    with job_span("sample", tracer_provider=provider):
        pass
    monkeypatch.delenv("TRACEPARENT")
    with job_span("alone", tracer_provider=provider):  # run by hand: a trace of its own
        pass
    joined, alone = exporter.get_finished_spans()
    root_span_id = int(traceparent(trace_id, sampled=True).split("-")[2], 16)
    assert joined.context.trace_id == int(trace_id, 16)
    assert joined.parent is not None and joined.parent.span_id == root_span_id
    assert alone.parent is None and alone.context.trace_id != int(trace_id, 16)


@pytest.mark.parametrize("propagators", ["none", "b3multi", "xray"])
def test_the_examples_spans_join_the_trace_whatever_propagators_the_volunteer_sets(propagators: str) -> None:
    """TRACEPARENT is W3C trace context whatever OTEL_PROPAGATORS the job inherits: read through
    the global propagator, none or b3multi split the job's span into a trace of its own, and an
    xray that is not installed made the import raise, failing the job itself."""
    code = (
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
        "from koinon_examples.tracing import job_span\n"
        "provider, exporter = TracerProvider(), InMemorySpanExporter()\n"
        "provider.add_span_processor(SimpleSpanProcessor(exporter))\n"
        "with job_span('work', tracer_provider=provider):\n"
        "    pass\n"
        "print(format(exporter.get_finished_spans()[0].context.trace_id, '032x'))\n"
    )
    trace_id = "8f6e8530892f46a5a4e3ba60e32a06d0"
    env = {**os.environ, "OTEL_PROPAGATORS": propagators, "TRACEPARENT": f"00-{trace_id}-{'2' * 16}-01"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-800:]
    assert done.stdout.strip() == trace_id
