"""The real kubectl v1.35 binary against a running emulator."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import EmulatorThread, Kubectl, widget, widget_crd

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def widget_crd_applied(kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(widget_crd()))
    kubectl.run("wait", "--for=condition=Established", "crd/widgets.test.koinon.dev", "--timeout=10s")


def _manifest(name: str, **spec: Any) -> str:
    return yaml.safe_dump(widget(name, **spec))


def test_apply_creates_then_updates(kubectl: Kubectl) -> None:
    assert "widget.test.koinon.dev/k1 created" in kubectl.run("apply", "-f", "-", stdin=_manifest("k1")).stdout
    updated = kubectl.run("apply", "-f", "-", stdin=_manifest("k1", color="blue", size=5))
    assert "widget.test.koinon.dev/k1 configured" in updated.stdout
    obj = yaml.safe_load(kubectl.run("get", "widget", "k1", "-o", "yaml").stdout)
    assert obj["spec"] == {"color": "blue", "size": 5, "limits": {"cpu": 0.5}}
    assert obj["metadata"]["generation"] == 2
    assert "kubectl.kubernetes.io/last-applied-configuration" in obj["metadata"]["annotations"]
    unchanged = kubectl.run("apply", "-f", "-", stdin=_manifest("k1", color="blue", size=5))
    assert "unchanged" in unchanged.stdout


def test_get_short_name_shows_printer_columns(kubectl: Kubectl, threaded_emulator: EmulatorThread) -> None:
    kubectl.run("apply", "-f", "-", stdin=_manifest("k2", size=4))
    threaded_emulator.call(
        lambda e: e.patch(
            "test.koinon.dev/v1",
            "Widget",
            "k2",
            {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
            namespace="default",
            subresource="status",
        )
    )
    lines = kubectl.run("get", "wdg", "k2").stdout.splitlines()
    assert lines[0].split() == ["NAME", "COLOR", "SIZE", "PHASE", "READY", "AGE"]
    assert lines[1].split()[:5] == ["k2", "red", "4", "Running", "True"]
    listed = json.loads(kubectl.run("get", "koinon", "-o", "json").stdout)  # category
    assert "k2" in [item["metadata"]["name"] for item in listed["items"]]


def test_schema_violation_names_the_field(kubectl: Kubectl) -> None:
    result = kubectl.run("apply", "-f", "-", stdin=_manifest("k3", size=0), check=False)
    assert result.returncode != 0
    assert "spec.size" in result.stderr and "greater than or equal to 1" in result.stderr
    unknown = kubectl.run("apply", "-f", "-", stdin=_manifest("k3", nonsense=True), check=False)
    assert unknown.returncode != 0 and "spec.nonsense" in unknown.stderr
    assert kubectl.run("get", "widget", "k3", check=False).returncode != 0


def test_describe_shows_events(kubectl: Kubectl, threaded_emulator: EmulatorThread) -> None:
    obj = yaml.safe_load(kubectl.run("apply", "-f", "-", "-o", "yaml", stdin=_manifest("k4")).stdout)
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": "k4-", "namespace": "default"},
        "type": "Normal",
        "reason": "Scheduled",
        "message": "placed on volunteer-7",
        "source": {"component": "koinon-test"},
        "involvedObject": {
            "apiVersion": "test.koinon.dev/v1",
            "kind": "Widget",
            "name": "k4",
            "namespace": "default",
            "uid": obj["metadata"]["uid"],
        },
    }
    threaded_emulator.call(lambda e: e.create(event))
    described = kubectl.run("describe", "widget", "k4").stdout
    assert "Scheduled" in described and "placed on volunteer-7" in described


def test_wait_for_condition_and_jsonpath(kubectl: Kubectl, threaded_emulator: EmulatorThread) -> None:
    kubectl.run("apply", "-f", "-", stdin=_manifest("k5"))
    waiter = subprocess.Popen(
        [str(kubectl.binary), "wait", "--for=condition=Ready", "widget/k5", "--timeout=20s"],
        env=kubectl.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    assert waiter.poll() is None  # still waiting: not Ready yet
    threaded_emulator.call(
        lambda e: e.patch(
            "test.koinon.dev/v1",
            "Widget",
            "k5",
            {"status": {"phase": "Done", "conditions": [{"type": "Ready", "status": "True"}]}},
            namespace="default",
            subresource="status",
        )
    )
    out, err = waiter.communicate(timeout=25)
    assert waiter.returncode == 0, err
    assert "condition met" in out
    kubectl.run("wait", "--for=jsonpath={.status.phase}=Done", "widget/k5", "--timeout=10s")


def test_delete_waits_for_finalizer(kubectl: Kubectl, threaded_emulator: EmulatorThread) -> None:
    manifest = widget("k6")
    manifest["metadata"]["finalizers"] = ["test.koinon.dev/hold"]
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    deleter = subprocess.Popen(
        [str(kubectl.binary), "delete", "widget", "k6", "--timeout=20s"],
        env=kubectl.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        current = threaded_emulator.call(lambda e: e.get("test.koinon.dev/v1", "Widget", "k6", "default"))
        if current["metadata"].get("deletionTimestamp"):
            break
        time.sleep(0.1)
    assert deleter.poll() is None  # kubectl waits while the finalizer holds the object
    threaded_emulator.call(
        lambda e: e.patch("test.koinon.dev/v1", "Widget", "k6", {"metadata": {"finalizers": None}}, namespace="default")
    )
    _, err = deleter.communicate(timeout=25)
    assert deleter.returncode == 0, err
    assert kubectl.run("get", "widget", "k6", check=False).returncode != 0


def test_explain_uses_crd_schema(kubectl: Kubectl) -> None:
    explained = kubectl.run("explain", "widget.spec").stdout
    assert "The desired widget." in explained and "color" in explained and "Size in units." in explained


def test_builtin_resources_via_apply(kubectl: Kubectl) -> None:
    def manifest(value: str) -> str:
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}},
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {"name": "cfg", "namespace": "team-a"},
                        "data": {"k": value},
                    },
                ],
            }
        )

    kubectl.run("apply", "-f", "-", stdin=manifest("v"))
    kubectl.run("apply", "-f", "-", stdin=manifest("w"))
    assert kubectl.run("get", "cm", "cfg", "-n", "team-a", "-o", "jsonpath={.data.k}").stdout == "w"
    kubectl.run("delete", "namespace", "team-a", "--timeout=20s")
    assert kubectl.run("get", "ns", "team-a", check=False).returncode != 0


def test_get_watch_prints_table_rows(kubectl: Kubectl, threaded_emulator: EmulatorThread) -> None:
    watcher = subprocess.Popen(
        [str(kubectl.binary), "get", "wdg", "-w", "--request-timeout=20s"],
        env=kubectl.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        kubectl.run("apply", "-f", "-", stdin=_manifest("k7", color="green"))
        threaded_emulator.call(
            lambda e: e.patch(
                "test.koinon.dev/v1",
                "Widget",
                "k7",
                {"status": {"phase": "Watched"}},
                namespace="default",
                subresource="status",
            )
        )
        time.sleep(1.0)
    finally:
        watcher.terminate()
        out, _ = watcher.communicate(timeout=10)
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "COLOR", "SIZE", "PHASE", "READY", "AGE"]
    assert sum(line.startswith("NAME") for line in lines) == 1
    assert any(line.split()[:4] == ["k7", "green", "3", "Watched"] for line in lines)


def test_kubectl_get_vn_says_which_volunteers_are_cordoned(kubectl: Kubectl, threaded_emulator: EmulatorThread) -> None:
    """As `kubectl get nodes` says SchedulingDisabled: a cordoned Ready volunteer read just "Ready"."""
    crd = yaml.safe_load((REPO / "manifests" / "crds" / "volunteernodes.koinon.dev.yaml").read_text())
    threaded_emulator.call(lambda e: e.apply_crd(crd))
    for name, cordoned in (("vn-open", False), ("vn-cordoned", True)):
        node = {"apiVersion": "koinon.dev/v1alpha1", "kind": "VolunteerNode", "metadata": {"name": name},
                "spec": {"owner": "alice", "cordoned": cordoned}}  # fmt: skip
        kubectl.run("apply", "-f", "-", stdin=json.dumps(node))
    lines = kubectl.run("get", "vn").stdout.splitlines()
    start = lines[0].index("CORDONED")  # columns are aligned; empty cells (no status yet) are blank
    cells = {line.split()[0]: line[start:].split()[0] for line in lines[1:]}
    assert cells == {"vn-cordoned": "true", "vn-open": "false"}
