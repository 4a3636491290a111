"""Run the real helm/kubectl binaries on the chart and manifests, and parse what they render."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "koinon-agent"
MANIFESTS = REPO / "manifests"
TOKEN = "abcdef.0123456789abcdef"
GATEWAY = "gateway.example.org:7443"

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Tools:
    helm: Path
    kubectl: Path
    home: Path  # HOME/XDG dirs of helm and kubectl, so no user config leaks in

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.home / "cache"),
            "XDG_CONFIG_HOME": str(self.home / "config"),
            "XDG_DATA_HOME": str(self.home / "data"),
        }
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        return env

    def run(
        self, binary: Path, *args: str, stdin: str | None = None, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binary), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(kubeconfig),
            timeout=60,
            check=False,
        )


def set_args(values: dict[str, str]) -> list[str]:
    args: list[str] = []
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


def helm_template(
    tools: Tools,
    values: dict[str, str | None] | None = None,
    *,
    extra: Sequence[str] = (),
    namespace: str = "koinon-volunteer",
) -> subprocess.CompletedProcess[str]:
    base = {"gateway.address": GATEWAY, "joinToken.value": TOKEN}
    # A value of None drops one of the base values (to test what is missing).
    merged = {k: v for k, v in {**base, **(values or {})}.items() if v is not None}
    return tools.run(tools.helm, "template", "vol", str(CHART), "--namespace", namespace, *set_args(merged), *extra)


def parse_documents(text: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(tools: Tools, values: dict[str, str | None] | None = None, *, extra: Sequence[str] = ()) -> list[Manifest]:
    """The chart's manifests for ``values`` (see helm_template), which helm must render."""
    result = helm_template(tools, values, extra=extra)
    assert result.returncode == 0, result.stderr
    return parse_documents(result.stdout)


def by_kind(documents: list[Manifest], kind: str) -> list[Manifest]:
    return [doc for doc in documents if doc["kind"] == kind]


def one(documents: list[Manifest], kind: str) -> Manifest:
    found = by_kind(documents, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def agent_container(workload: Manifest) -> Manifest:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["agent"]
    container: Manifest = containers[0]
    return container


def env_map(container: Manifest) -> dict[str, Manifest]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def assert_refused(tools: Tools, values: dict[str, str | None], expected: str) -> None:
    """helm refuses to render the chart with ``values`` (see helm_template), saying ``expected``,
    and renders nothing."""
    result = helm_template(tools, values)
    assert result.returncode != 0, f"accepted bad values {values}"
    assert expected in result.stderr, result.stderr
    assert result.stdout == ""
