"""Operator settings, from command-line flags or environment variables (for the Deployment)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorConfig:
    ray_dashboard_url: str = "http://127.0.0.1:8265"
    poll_interval_seconds: float = 2.0
    uptime_sample_seconds: float = 60.0  # how often each VolunteerNode's uptime evidence is recorded
    namespace: str | None = None  # None: all namespaces
    ray_auth_token: str | None = None  # Ray token authentication (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)

    @classmethod
    def from_env(cls) -> OperatorConfig:
        return cls(
            ray_dashboard_url=os.environ.get("KOINON_RAY_DASHBOARD", cls.ray_dashboard_url),
            poll_interval_seconds=float(os.environ.get("KOINON_POLL_INTERVAL", cls.poll_interval_seconds)),
            uptime_sample_seconds=float(os.environ.get("KOINON_UPTIME_SAMPLE_INTERVAL", cls.uptime_sample_seconds)),
            namespace=os.environ.get("KOINON_NAMESPACE") or None,
            ray_auth_token=ray_auth_token_from_env(),
        )


def ray_auth_token_from_env() -> str | None:
    """Ray's own variables: the token itself, or a file that holds it."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and os.path.exists(path):
        with open(path) as handle:
            return handle.read().strip() or None
    return None
