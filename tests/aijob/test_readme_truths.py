"""What the READMEs name must exist, and what the commands they show print must work as written."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
READMES = [
    "README.md",
    "workers/koinon_agent/README.md",
    "charts/koinon-agent/README.md",
    "operator/koinon_emulator/README.md",
    "operator/koinon_operator/scheduler/README.md",
]
FILE_SUFFIX = re.compile(r"\.(py|ya?ml|json|proto|png|md|toml|tpl)$")


def _mentioned_files() -> list[tuple[str, int, str]]:
    found = []
    for readme in READMES:
        text = (ROOT / readme).read_text()
        for match in re.finditer(r"`([^`\s]+)`", text):
            token = match.group(1)
            # A repository file path: has a directory part and a file suffix; not a URL, glob or API path.
            if (
                "/" not in token
                or not FILE_SUFFIX.search(token)
                or "*" in token
                or "<" in token
                or token.startswith(("/", "http"))
            ):
                continue
            found.append((readme, text[: match.start()].count("\n") + 1, token))
    return found


@pytest.mark.parametrize(("readme", "line", "path"), _mentioned_files())
def test_every_file_path_in_the_readmes_exists(readme: str, line: int, path: str) -> None:
    """A reader finds a path from the repository root, the README's own folder, or a source root
    (operator/, workers/: package-relative names such as `koinon_gateway/tcp_pipe.py`)."""
    candidates = [ROOT / path, (ROOT / readme).parent / path]
    if readme != "README.md":  # the top README's reader stands at the root and is given root paths
        candidates += [ROOT / "operator" / path, ROOT / "workers" / path]
    assert any(c.exists() for c in candidates), f"{readme}:{line} names `{path}`, which does not exist"


def test_up_tells_how_to_stop_the_control_plane_it_started(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`koinon --state-dir X dev up` must not tell the user to run a plain `koinon dev down`, which
    stops (nothing in) ./.koinon/dev and leaves the control plane in X running."""
    from koinon_dev import cli

    state_dir = tmp_path / "elsewhere"
    fake = SimpleNamespace(up=lambda: SimpleNamespace(kubeconfig=state_dir / "kubeconfig"))
    monkeypatch.setattr("koinon_dev.cli._cluster", lambda args: fake)
    cli.cmd_up(argparse.Namespace(state_dir=str(state_dir), volunteers=2, no_netns=False))
    out = capsys.readouterr().out
    stop_hint = next(line for line in out.splitlines() if "dev down" in line)
    assert str(state_dir) in stop_hint, f"stop hint ignores --state-dir: {stop_hint!r}"


def test_bad_traces_protocol_is_reported_under_its_own_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """README Tracing: 'with http/json the operator exits 2 at start, naming the variable'."""
    from koinon_operator.telemetry import exporter_settings_problem

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    problem = exporter_settings_problem()
    assert problem is not None
    assert problem.startswith("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"), problem
