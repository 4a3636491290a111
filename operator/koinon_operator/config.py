"""Operator settings, from command-line flags or environment variables (for the Deployment)."""

from __future__ import annotations

import math
import os
import urllib.parse
from dataclasses import dataclass, field

from koinon_operator.ray_jobs import redact_url

# KOINON_SUBMISSION_KEY's least length: as hard to guess as the key the operator makes (32 bytes).
MIN_SUBMISSION_KEY_BYTES = 32


@dataclass(frozen=True)
class OperatorConfig:
    ray_dashboard_url: str = "http://127.0.0.1:8265"
    poll_interval_seconds: float = 2.0
    uptime_sample_seconds: float = 60.0  # how often each VolunteerNode's uptime evidence is recorded
    namespace: str | None = None  # None: all namespaces
    ray_auth_token: str | None = None  # Ray token authentication (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)
    # How long a deleted AIJob keeps its finalizer while Ray cannot be asked to stop its job. Past
    # it the AIJob goes and a Warning names the Ray jobs that may still run: `kubectl delete` and
    # namespace deletion must not hang for as long as the Ray head is gone (KubeRay's RayJob gives
    # up at once; a restarting head gets this long to come back).
    stop_grace_seconds: float = 120.0
    # How often the leader looks for Ray jobs whose AIJob is gone without its finalizer having
    # stopped them (orphans.py), and how old such a job must be before it is stopped: the worst
    # case is the later of the two after its submission, one interval after the AIJob went. Each
    # sweep reads Ray's record of every job since its head started (Ray's Job API has no filter).
    orphan_sweep_seconds: float = 60.0
    orphan_grace_seconds: float = 60.0
    # Unlabelled Ray nodes (no koinon.dev/node, so no VolunteerNode) take AIJobs only when set:
    # anyone who can start a raylet could otherwise take work as an owner of its own that no
    # evidence reaches. For development pools of bare `ray start` workers.
    allow_bare_ray_workers: bool = False
    # The key of each attempt's submission ids (reconciler.keyed_submission_nonce), given instead
    # of the Secret the operator keeps it in (kube.get_or_create_submission_key): for development
    # and tests. Every operator of one pool must be given the same, for good (KOINON_SUBMISSION_KEY).
    submission_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Refused here, at start: NaN made kopf's timer never fire again (each job reconciled once),
        # 0 or a negative interval made it spin, a URL without a scheme failed every Ray call.
        for name, env, value in (
            ("poll_interval_seconds", "KOINON_POLL_INTERVAL", self.poll_interval_seconds),
            ("uptime_sample_seconds", "KOINON_UPTIME_SAMPLE_INTERVAL", self.uptime_sample_seconds),
            ("orphan_sweep_seconds", "KOINON_ORPHAN_SWEEP_INTERVAL", self.orphan_sweep_seconds),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{env} ({name}): must be a finite number of seconds > 0, got {value}")
        if not (math.isfinite(self.stop_grace_seconds) and self.stop_grace_seconds >= 0):
            raise ValueError(
                f"KOINON_STOP_GRACE (stop_grace_seconds): must be a finite number of seconds >= 0, "
                f"got {self.stop_grace_seconds}"
            )
        if not (math.isfinite(self.orphan_grace_seconds) and self.orphan_grace_seconds >= 0):
            raise ValueError(
                f"KOINON_ORPHAN_GRACE (orphan_grace_seconds): must be a finite number of seconds >= 0, "
                f"got {self.orphan_grace_seconds}"
            )
        if self.submission_key is not None and len(self.submission_key.encode()) < MIN_SUBMISSION_KEY_BYTES:
            # A short key could be guessed, and with it every attempt's submission ids.
            raise ValueError(
                f"KOINON_SUBMISSION_KEY: must be at least {MIN_SUBMISSION_KEY_BYTES} characters "
                "(e.g. `openssl rand -hex 32`), or unset to keep the key in a Secret"
            )
        url = urllib.parse.urlsplit(self.ray_dashboard_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(
                f"KOINON_RAY_DASHBOARD (--ray-dashboard): must be an http(s) URL with a host, "
                f"got {redact_url(self.ray_dashboard_url)!r}"  # printed at start: no password in it
            )
        try:
            port_ok = url.port is None or url.port > 0
        except ValueError:  # "http://user:pa#ss@ray:8265" splits as host "user", port "pa"
            port_ok = False
        if "@" in url.path + url.query + url.fragment or ("@" in self.ray_dashboard_url and not port_ok):
            # A password with '#', '?' or '/' not percent-encoded: the URL splits inside the userinfo,
            # so no redaction can find the password: it is not shown at all.
            raise ValueError(
                "KOINON_RAY_DASHBOARD (--ray-dashboard): not a valid URL (not shown: it may hold a "
                "password); a user name or password in it must be percent-encoded ('#', '?', '/')"
            )
        if not port_ok:
            raise ValueError(f"KOINON_RAY_DASHBOARD (--ray-dashboard): bad port in {self.ray_dashboard_url!r}")
        if self.ray_auth_token and (url.username is not None or url.password is not None):
            # Both are one Authorization header: aiohttp refuses every request that has both.
            raise ValueError(
                "KOINON_RAY_DASHBOARD (--ray-dashboard): a user name or password in the URL (Basic "
                "auth) cannot be combined with Ray token authentication (RAY_AUTH_TOKEN or "
                f"RAY_AUTH_TOKEN_PATH), got {redact_url(self.ray_dashboard_url)!r}"
            )

    @classmethod
    def from_env(cls) -> OperatorConfig:
        return cls(
            ray_dashboard_url=os.environ.get("KOINON_RAY_DASHBOARD", cls.ray_dashboard_url),
            poll_interval_seconds=_seconds("KOINON_POLL_INTERVAL", cls.poll_interval_seconds),
            uptime_sample_seconds=_seconds("KOINON_UPTIME_SAMPLE_INTERVAL", cls.uptime_sample_seconds),
            namespace=os.environ.get("KOINON_NAMESPACE") or None,
            stop_grace_seconds=_seconds("KOINON_STOP_GRACE", cls.stop_grace_seconds),
            orphan_sweep_seconds=_seconds("KOINON_ORPHAN_SWEEP_INTERVAL", cls.orphan_sweep_seconds),
            orphan_grace_seconds=_seconds("KOINON_ORPHAN_GRACE", cls.orphan_grace_seconds),
            ray_auth_token=ray_auth_token_from_env(),
            allow_bare_ray_workers=_flag("KOINON_ALLOW_BARE_RAY_WORKERS", cls.allow_bare_ray_workers),
            submission_key=os.environ.get("KOINON_SUBMISSION_KEY") or None,
        )


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{env}: must be a number of seconds, got {raw[:64]!r}") from None


def _flag(env: str, default: bool) -> bool:
    raw = os.environ.get(env)
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    # Refused rather than read as false: a misspelt opt-in must not look like it was honoured.
    raise ValueError(f"{env}: must be true or false, got {raw[:64]!r}")


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
