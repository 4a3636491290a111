"""The 1,000-agent gateway figures: measured with the issue's 5 s heartbeat (the figures of record)
and with the one the gateway ships with, the README saying which is which; and the load
generator's agents send what a real agent sends."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from koinon_agent.agent import Agent
from koinon_agent.config import VERSION, AgentConfig
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

from bench.tunnel import many_agents, run

REPO = Path(__file__).resolve().parents[2]


class _Captured(Exception):
    pass


def _gateway_flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def _deployed_flags() -> dict[str, str]:
    text = (REPO / "manifests" / "gateway" / "deployment.yaml").read_text()
    return dict(re.findall(r"^\s*- --(heartbeat-[a-z]+)=(\S+)", text, re.M))


def test_the_1000_agent_gateway_is_measured_with_the_issues_and_the_deployed_heartbeat(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    captured: list[list[str]] = []

    def popen(argv: list[str], **_: Any) -> Any:
        captured.append(list(argv))
        raise _Captured

    def gateway_with_agents(workdir: Path, count: int, window_s: float, interval: float, timeout: float) -> Any:
        # The real one, as far as the gateway's command line: that is what the flags are read from.
        with pytest.raises(_Captured):
            real(workdir, count, window_s, interval, timeout)
        return {"connected": count, "rss_mb": 100.0 + interval, "cpu_pct": 10.0 / interval}

    real = run._gateway_with_agents
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(run, "_gateway_with_agents", gateway_with_agents)
    figures = run.bench_agents(tmp_path, 1000, 30)
    issue, deployed = (_gateway_flags(argv) for argv in captured)
    assert _deployed_flags() == {"heartbeat-interval": "2", "heartbeat-timeout": "8"}
    assert {k: issue[k] for k in _deployed_flags()} == {"heartbeat-interval": "5", "heartbeat-timeout": "15"}
    assert {k: deployed[k] for k in _deployed_flags()} == _deployed_flags()
    assert figures["gateway_cpu_pct_1000_agents"] == 2.0
    assert figures["gateway_cpu_pct_1000_agents_deployed_heartbeat"] == 5.0
    assert (figures["agents_heartbeat_interval_s"], figures["agents_deployed_heartbeat_interval_s"]) == (5, 2)
    assert {"gateway_rss_mb_1000_agents_deployed_heartbeat", "gateway_cpu_pct_1000_agents_deployed_heartbeat"} <= set(
        run.REQUIRED_KEYS
    )


def test_the_readme_row_says_which_heartbeat_each_figure_has() -> None:
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| | 1,000 agents on one gateway"))
    assert re.search(r"heartbeat every 5 s", row) and re.search(r"deployed heartbeat every 2 s", row), row[:200]


def test_the_load_generators_heartbeat_carries_what_a_real_agents_does(tmp_path: Path) -> None:
    agent = Agent(AgentConfig(gateway="127.0.0.1:1", insecure=True, state_dir=tmp_path, simulate_gpus=2))

    class RunningRay:  # the agent's Ray node, up
        running = True

        def node_id(self) -> str:
            return "ab" * 28

    agent.ray = RunningRay()  # type: ignore[assignment]
    ping = pb.Ping(seq=7, gateway_time_ns=123)
    real = agent._heartbeat(ping)
    load = many_agents.heartbeat_message(many_agents.ray_node_id(3), ping)
    assert {f.name for f, _ in load.ListFields()} == {f.name for f, _ in real.ListFields()}
    assert {f.name for f, _ in real.ListFields()} == {f.name for f in pb.Heartbeat.DESCRIPTOR.fields}
    assert load.ray_state == real.ray_state == "running"
    assert len(load.ray_node_id) == len(real.ray_node_id) and load.gpus and load.seq == load.echo_seq == 7
    assert many_agents.ray_node_id(3) != many_agents.ray_node_id(4)
    assert VERSION  # what the load's Join and Register send as agent_version
