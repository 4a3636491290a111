"""Chart values that rendered into something the agent or Kubernetes refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from koinon_agent import cli

from .helpers import Tools, agent_container, env_map, helm_template, one, parse_documents

pytestmark = pytest.mark.timeout(60)


def test_num_cpus_from_a_values_file_reaches_the_agent_as_an_integer(tools: Tools, tmp_path: Path) -> None:
    """Values files give helm float64 numbers; `quote` prints 1000000 as "1e+06", which the agent
    refuses (int("1e+06")) and exits 2 in a crash loop. objectStoreMemory uses int64; numCpus,
    gpus.simulate and proxyPort do not."""
    values = tmp_path / "values.yaml"
    values.write_text("agent:\n  numCpus: 1000000\n")
    result = helm_template(tools, extra=["-f", str(values)])
    assert result.returncode == 0, result.stderr
    env = env_map(agent_container(one(parse_documents(result.stdout), "Deployment")))
    assert env["KOINON_NUM_CPUS"]["value"] == "1000000"
    cli.build_parser().parse_args(["join", "--num-cpus", env["KOINON_NUM_CPUS"]["value"]])


@pytest.mark.parametrize("mount_path", ["/tmp", "/tmp/ray", "/dev/shm", "/etc/koinon/gateway-ca/x", "/etc/koinon"])
def test_a_state_mount_path_that_collides_with_tmp_is_refused_by_the_chart(tools: Tools, mount_path: str) -> None:
    """/tmp: two volumeMounts at one path (the API server refuses the pod, the Deployment shows
    nothing wrong); /tmp/ray: the agent exits 2 about KOINON_TEMP_DIR, a variable the volunteer never set."""
    result = helm_template(tools, {"persistence.mountPath": mount_path})
    assert result.returncode != 0
    assert "persistence.mountPath" in result.stderr


def test_a_state_mount_path_of_its_own_is_taken(tools: Tools) -> None:
    result = helm_template(tools, {"persistence.mountPath": "/var/lib/koinon"})
    assert result.returncode == 0, result.stderr
