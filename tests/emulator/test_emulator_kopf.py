"""Real kopf 1.45 operator (a subprocess) against the emulator: its whole lifecycle must work."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import GROUP, EmulatorThread, Kubectl, widget, widget_crd

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

OPERATOR = textwrap.dedent("""
    import pathlib
    import kopf

    MARKS = pathlib.Path(__file__).parent

    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_):
        settings.persistence.finalizer = "test.koinon.dev/kopf"
        settings.watching.server_timeout = 30
        settings.posting.level = 0

    @kopf.on.create("test.koinon.dev", "v1", "widgets")
    def created(body, spec, patch, **_):
        patch.status["phase"] = "Running"
        patch.status["conditions"] = [{"type": "Ready", "status": "True"}]
        kopf.info(body, reason="Painted", message=f"painted {spec['color']}")

    @kopf.on.update("test.koinon.dev", "v1", "widgets", field="spec.size")
    def resized(new, patch, **_):
        patch.status["phase"] = f"Resized{new}"

    @kopf.on.delete("test.koinon.dev", "v1", "widgets")
    def deleted(name, **_):
        (MARKS / f"deleted-{name}").write_text("ok")
""")


def _eventually(probe: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {timeout}s: {probe}")
        time.sleep(0.1)


def test_kopf_lifecycle(kubectl: Kubectl, threaded_emulator: EmulatorThread, tmp_path: Path) -> None:
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(widget_crd()))
    script = tmp_path / "operator.py"
    script.write_text(OPERATOR)
    log = (tmp_path / "kopf.log").open("w")
    operator = subprocess.Popen(
        [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", "--verbose", str(script)],
        env={**kubectl.env, "PYTHONUNBUFFERED": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(widget("kopf-w", color="green")))

        def current() -> dict[str, Any]:
            return threaded_emulator.call(lambda e: e.get(f"{GROUP}/v1", "Widget", "kopf-w", "default"))

        running = _eventually(lambda: current() if current().get("status", {}).get("phase") == "Running" else None)
        assert "test.koinon.dev/kopf" in running["metadata"]["finalizers"]
        kubectl.run("wait", "--for=condition=Ready", "widget/kopf-w", "--timeout=10s")

        def painted() -> list[dict[str, Any]]:
            events = threaded_emulator.call(lambda e: e.list_objects("v1", "Event", "default"))
            return [ev for ev in events if ev["reason"] == "Painted" and ev["involvedObject"]["name"] == "kopf-w"]

        assert _eventually(painted)[0]["message"] == "painted green"
        assert "painted green" in kubectl.run("describe", "widget", "kopf-w").stdout

        kubectl.run("patch", "widget", "kopf-w", "--type=merge", "-p", '{"spec": {"size": 7}}')
        _eventually(lambda: current().get("status", {}).get("phase") == "Resized7")

        kubectl.run("delete", "widget", "kopf-w", "--timeout=30s")
        assert (tmp_path / "deleted-kopf-w").read_text() == "ok"
        assert kubectl.run("get", "widget", "kopf-w", check=False).returncode != 0
    finally:
        operator.terminate()
        try:
            operator.wait(timeout=15)
        except subprocess.TimeoutExpired:
            operator.kill()
        log.close()
    output = (tmp_path / "kopf.log").read_text()
    assert "Traceback" not in output, output[-4000:]
