"""podLabels can silently override the selector labels of the agent's pod template.

templates/workload.yaml appends .Values.podLabels after the chart's labels in the pod template, so a
key such as app.kubernetes.io/instance appears twice; YAML parsers keep the last one, the template's
labels stop matching spec.selector.matchLabels, and the API server rejects the Deployment/DaemonSet
("selector does not match template labels") at install time, with no message from the chart (which
otherwise refuses bad combinations naming the value). The chart refuses it, naming podLabels (since 2026-12-06).
"""

from __future__ import annotations

import pytest

from .helpers import Tools, helm_template, one, parse_documents

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_pod_labels_cannot_break_the_selector(tools: Tools, kind: str) -> None:
    values: dict[str, str | None] = {"kind": kind, "podLabels.app\\.kubernetes\\.io/instance": "other"}
    if kind == "DaemonSet":
        values["persistence.type"] = "hostPath"
    result = helm_template(tools, values)
    assert result.returncode != 0
    assert "podLabels: app.kubernetes.io/instance is one of the chart's selector labels" in result.stderr
    # Other labels are added to the pods, and the selector still matches them.
    values["podLabels.team"] = "ml"
    del values["podLabels.app\\.kubernetes\\.io/instance"]
    result = helm_template(tools, values)
    assert result.returncode == 0, result.stderr
    workload = one(parse_documents(result.stdout), kind)
    selector = workload["spec"]["selector"]["matchLabels"]
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items() and labels["team"] == "ml"
