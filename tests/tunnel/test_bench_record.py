"""What the tunnel benchmark records: the agent's own memory (not its sandbox wrapper's), one unit
for every "_mb" figure, gateway figures only while every agent is connected, and a run of record
only from a complete, full run."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from koinon_dev.tunnel_plane import create_netns, delete_netns, netns_available

from bench.tunnel import run
from tests.tunnel.ray_harness import kill_tree

# Stands in for the agent: holds 200 MiB, and its command line names koinon_agent.cli as the
# agent's does (python -m koinon_agent.cli ...).
HOLDER = "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); input()"


@pytest.mark.skipif(not netns_available(), reason="needs root and ip netns")
def test_the_agents_memory_is_read_from_the_agent_inside_its_sandbox() -> None:
    netns = f"kbr-{secrets.token_hex(3)}"
    create_netns(netns)
    process = None
    try:
        # How the harness starts a volunteer in a namespace: ip netns exec -> sandbox -> init -> agent.
        process = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "koinon_dev.volunteer_sandbox", "--",
             str(Path(sys.executable).resolve()), "-c", HOLDER, "koinon_agent.cli"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        agent = run.agent_process(process.pid)
        assert agent.pid != process.pid
        assert run._rss_mb({"agent": agent})["agent"] >= 195  # MiB; the wrapper holds ~20
        assert run._rss_mb({"wrapper": psutil.Process(process.pid)})["wrapper"] < 100
    finally:
        if process is not None:
            kill_tree(process.pid)
            process.wait()
        delete_netns(netns)


def test_every_mb_figure_is_in_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    process: Any = SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=100 * 2**20))
    assert run._rss_mb({"gateway": process}) == {"gateway": 100.0}


def test_gateway_figures_need_every_agent_connected_through_the_window(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_popen = subprocess.Popen

    def popen(argv: list[str], **kwargs: Any) -> Any:
        if "bench.tunnel.many_agents" in argv:  # a load whose agents all went away after registering
            argv = [sys.executable, "-c", "print('connected 3', flush=True)"]
        return real_popen(argv, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(RuntimeError, match="agents connected at the gateway: 0 before the window"):
        run.bench_agents(tmp_path, 3, 0.5)


def test_three_real_agents_are_counted_through_the_window(tmp_path: Path) -> None:
    figures = run.bench_agents(tmp_path, 3, 0.5)
    assert figures["agents_connected"] == 3 and figures["gateway_rss_mb_1000_agents"] > 0


def _main(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *argv: str, network: dict[str, Any] | None = None
) -> tuple[int, Path, dict[str, Any]]:
    monkeypatch.setattr(run, "REPO", tmp_path)  # the record is REPO/bench/results/tunnel.json
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    figures = network if network is not None else {k: 1.0 for k in run.REQUIRED_KEYS[:7]}
    monkeypatch.setattr(run, "bench_network", lambda workdir, quick: figures)
    monkeypatch.setattr(run, "bench_ray", lambda rounds: {"ray_tasks_ratio": 1.0, "ray_object_ratio": 1.0})
    monkeypatch.setattr(run, "bench_agents", lambda workdir, count, window: {k: 1.0 for k in run.REQUIRED_KEYS[9:]})
    monkeypatch.setattr(sys, "argv", ["run", *argv])
    code = run.main()
    record = tmp_path / "bench" / "results" / "tunnel.json"
    return code, record, json.loads(record.read_text()) if record.exists() else {}


def test_a_full_run_is_the_record(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(run, "netns_available", lambda: True)
    code, _, data = _main(monkeypatch, tmp_path)
    assert code == 0 and "partial" not in data and all(key in data for key in run.REQUIRED_KEYS)


def test_a_quick_run_never_replaces_the_record(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(run, "netns_available", lambda: True)
    code, record, _ = _main(monkeypatch, tmp_path, "--quick")
    assert code == 0 and not record.exists()
    partial = json.loads((tmp_path / "tmp" / "koinon-bench-tunnel-partial.json").read_text())
    assert partial["partial"] == {"skipped": ["quick"], "missing": []}


def test_a_run_without_netns_says_why_ray_is_missing_and_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(run, "netns_available", lambda: False)
    code, record, _ = _main(monkeypatch, tmp_path)
    assert code == 1 and not record.exists()
    partial = json.loads((tmp_path / "tmp" / "koinon-bench-tunnel-partial.json").read_text())
    assert "network namespaces unavailable" in partial["ray_error"]
    assert partial["partial"]["missing"] == ["ray_tasks_ratio", "ray_object_ratio"]


def test_a_run_that_could_not_measure_ssh_is_no_record(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ssh -L not set up: its figures are there as None, and the run used to be saved as the record."""
    monkeypatch.setattr(run, "netns_available", lambda: True)
    no_ssh = {k: 1.0 for k in run.REQUIRED_KEYS[:7]} | {"ssh_mbps": None, "tunnel_vs_ssh": None}
    code, record, _ = _main(monkeypatch, tmp_path, network=no_ssh | {"ssh_error": "OpenSSH not installed"})
    assert code == 1 and not record.exists()
    partial = json.loads((tmp_path / "tmp" / "koinon-bench-tunnel-partial.json").read_text())
    assert partial["partial"]["missing"] == ["ssh_mbps", "tunnel_vs_ssh"]


def test_a_run_with_another_agent_count_is_no_record(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(run, "netns_available", lambda: True)
    code, record, _ = _main(monkeypatch, tmp_path, "--agents", "5")
    assert code == 0 and not record.exists()
    partial = json.loads((tmp_path / "tmp" / "koinon-bench-tunnel-partial.json").read_text())
    assert partial["partial"]["skipped"] == ["agents=5"]


def test_percentiles_are_nearest_rank() -> None:
    from bench.percentiles import percentile

    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([5.0], 0.5) == 5.0 and percentile([3.0, 1.0, 2.0], 1.0) == 3.0
