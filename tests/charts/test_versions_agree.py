"""One version names the project everywhere a user meets it: the package, the agent's `--version`
(sent to the gateway at join), the chart's appVersion (its default image tag) and the image the
manifests and the README build and run. An image built from an older Dockerfile lacks what the
manifests now run (tini), so a tag left behind on a change would deploy the wrong image."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from koinon_agent.config import VERSION

REPO = Path(__file__).resolve().parents[2]


def image_tags(text: str) -> set[str]:
    return set(re.findall(r"\bkoinon:(\d+\.\d+\.\d+(?:-[0-9A-Za-z.]+)?)", text))


def test_package_agent_chart_and_images_name_one_version() -> None:
    package = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((REPO / "charts" / "koinon-agent" / "Chart.yaml").read_text())
    assert package == VERSION
    assert chart["appVersion"] == package
    for relative in (
        "Dockerfile",
        "README.md",
        "manifests/gateway/deployment.yaml",
        "manifests/operator/deployment.yaml",
    ):
        tags = image_tags((REPO / relative).read_text())
        assert tags == {package}, f"{relative} names image tags {sorted(tags)}, the project is {package}"
