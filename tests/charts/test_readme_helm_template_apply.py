"""README.md ("Keep a control plane up"): `helm template ... | kubectl apply -f -` "works for the
chart's default Deployment with an emptyDir" against the local control plane's emulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import Tools, helm_template

pytestmark = pytest.mark.timeout(60)


def test_default_chart_render_applies_to_emulator(tools: Tools, emulator_kubeconfig: Path) -> None:
    result = helm_template(tools, {}, namespace="default")  # the chart's defaults: Deployment, emptyDir
    assert result.returncode == 0, result.stderr
    applied = tools.run(tools.kubectl, "apply", "-f", "-", stdin=result.stdout, kubeconfig=emulator_kubeconfig)
    assert applied.returncode == 0, applied.stderr
