"""The local control plane's Ray head and volunteer agents get an allowlist of the environment of
the shell that ran `up`, not all of it: the agent passes its environment on to Ray and so to job
code, and a developer's shell holds cloud keys, tokens and a real cluster's kubeconfig."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
from koinon_dev import tunnel_plane
from koinon_dev.ray_cluster import LocalRayHead, ray_environment, shell_environment_for_ray
from koinon_dev.tunnel_plane import LocalAgent, LocalGateway

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "GITHUB_TOKEN": "ghp_secret",
    "KUBECONFIG": "/home/dev/.kube/production",
    "https_proxy": "http://user:password@proxy:3128",
    "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=secret",
    "RAY_AUTH_TOKEN": "a-real-clusters-ray-token",
    # The operator's: `up` gives the operator the shell's whole environment, Ray none of this.
    "KOINON_SUBMISSION_KEY": "k" * 40,
    "KOINON_SOME_FUTURE_SECRET": "s" * 40,
}
NEEDED = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/dev",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONPATH": "operator:workers",
    "VIRTUAL_ENV": "/work/.venv",
    "RAY_health_check_period_ms": "500",
    "KOINON_DRAIN_GRACE": "5",
    "GRPC_VERBOSITY": "ERROR",
    "CUDA_VISIBLE_DEVICES": "0",
}


def test_only_what_the_agent_ray_and_python_need_is_kept() -> None:
    assert shell_environment_for_ray({**SECRETS, **NEEDED}) == NEEDED


def test_a_volunteer_agent_gets_none_of_the_shells_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    started: list[dict[str, str]] = []

    class Recorder:
        def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
            started.append(env)

        def start(self) -> None:
            pass

    monkeypatch.setattr(tunnel_plane, "ManagedProcess", Recorder)
    head = cast(LocalRayHead, None)  # the agent's environment needs none of it
    gateway = LocalGateway(head, tmp_path, tmp_path, tmp_path / "kubeconfig", agent_target="unix:x", ca_path="ca")
    agent = LocalAgent("v1", gateway, join_token="join-secret", log_dir=tmp_path, extra_env={"KOINON_TEST_X": "1"})
    agent.start()
    [env] = started
    assert not set(SECRETS) & set(env), env
    # What the control plane gives it still does.
    assert env["KOINON_TOKEN"] == "join-secret" and env["KOINON_TEST_X"] == "1"
    assert "PATH" in env


def test_the_ray_head_gets_none_of_the_shells_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Volunteers (and job code as a Ray driver) can place tasks on the head: it runs with this."""
    for name, value in {**SECRETS, "KOINON_TOKEN": "a-volunteers-join-token"}.items():
        monkeypatch.setenv(name, value)
    env = ray_environment("dev-token")
    assert not (set(SECRETS) - {"RAY_AUTH_TOKEN"}) & set(env), env
    assert "KOINON_TOKEN" not in env
    assert env["RAY_AUTH_TOKEN"] == "dev-token"  # the control plane's, not the shell's


def test_the_operators_submission_key_does_not_reach_the_volunteers_ray() -> None:
    """The agent passes what it gets on to its Ray (less its own settings): every job could read
    the key that makes the operator's attempt ids unguessable."""
    assert "KOINON_SUBMISSION_KEY" not in shell_environment_for_ray({"KOINON_SUBMISSION_KEY": "k" * 40, "PATH": "/bin"})


def test_the_operators_submission_key_does_not_reach_the_heads_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOINON_SUBMISSION_KEY", "k" * 40)
    assert "KOINON_SUBMISSION_KEY" not in ray_environment("token")
