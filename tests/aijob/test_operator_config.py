"""The operator's settings are checked when it starts, naming the variable: values that used to
pass broke it later (NaN: each job reconciled once; 0 or negative: timers spinning; a dashboard URL
without a scheme: every Ray call failing as if Ray were down)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from koinon_operator.config import OperatorConfig

from .fake_ray import Clock, FakeRay, make_body, make_reconciler, step


@pytest.mark.parametrize(
    "variable", ["KOINON_POLL_INTERVAL", "KOINON_UPTIME_SAMPLE_INTERVAL", "KOINON_ORPHAN_SWEEP_INTERVAL"]
)
@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf", "soon"])
def test_an_interval_that_is_no_positive_finite_number_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=f"^{variable}"):
        OperatorConfig.from_env()


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "soon"])
def test_an_orphan_grace_that_is_no_finite_number_of_seconds_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("KOINON_ORPHAN_GRACE", value)
    with pytest.raises(ValueError, match=r"^KOINON_ORPHAN_GRACE"):
        OperatorConfig.from_env()
    monkeypatch.setenv("KOINON_ORPHAN_GRACE", "0")
    assert OperatorConfig.from_env().orphan_grace_seconds == 0


@pytest.mark.parametrize("url", ["127.0.0.1:8265", "http//x", "ftp://ray:8265", "http://"])
def test_a_dashboard_url_without_http_and_a_host_is_refused(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("KOINON_RAY_DASHBOARD", url)
    with pytest.raises(ValueError, match=r"^KOINON_RAY_DASHBOARD"):
        OperatorConfig.from_env()


@pytest.mark.parametrize(
    "url", ["koinon:pr0xy-s3cret@ray:8265", "http//koinon:pr0xy-s3cret@ray", "ftp://koinon:pr0xy-s3cret@ray"]
)
def test_a_refused_dashboard_url_is_shown_without_its_password(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """The refusal is printed at start (the pod's log): the userinfo's password stays out of it."""
    monkeypatch.setenv("KOINON_RAY_DASHBOARD", url)
    with pytest.raises(ValueError, match=r"^KOINON_RAY_DASHBOARD") as refused:
        OperatorConfig.from_env()
    assert "pr0xy-s3cret" not in str(refused.value) and "koinon:***@" in str(refused.value)


@pytest.mark.parametrize("password", ["abc#def", "abc?def", "abc/def"])
def test_a_dashboard_url_whose_password_is_not_percent_encoded_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, password: str
) -> None:
    """'#', '?' or '/' in a password split the URL inside its userinfo (host "koinon", port "abc"):
    it passed the check, no redaction found the password, and aiohttp's InvalidUrl error quoted it
    whole into every job's RayReachable condition."""
    monkeypatch.setenv("KOINON_RAY_DASHBOARD", f"http://koinon:{password}@ray:8265")
    with pytest.raises(ValueError, match=r"^KOINON_RAY_DASHBOARD.*percent-encoded") as refused:
        OperatorConfig.from_env()
    assert "abc" not in str(refused.value) and "def" not in str(refused.value)


def test_a_dashboard_url_with_a_bad_port_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOINON_RAY_DASHBOARD", "http://ray:eighty")
    with pytest.raises(ValueError, match=r"^KOINON_RAY_DASHBOARD.*http://ray:eighty"):
        OperatorConfig.from_env()


def test_a_dashboard_url_with_a_password_and_a_ray_token_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both are an Authorization header: aiohttp refused every request to Ray that had both, so
    every pass failed; at start the operator says which two settings clash."""
    monkeypatch.setenv("KOINON_RAY_DASHBOARD", "http://koinon:pr0xy-s3cret@ray:8265")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-t0ken")
    with pytest.raises(ValueError, match=r"^KOINON_RAY_DASHBOARD.*RAY_AUTH_TOKEN") as refused:
        OperatorConfig.from_env()
    assert "pr0xy-s3cret" not in str(refused.value) and "ray-t0ken" not in str(refused.value)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert OperatorConfig.from_env().ray_dashboard_url == "http://koinon:pr0xy-s3cret@ray:8265"


def test_the_defaults_and_usual_values_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOINON_RAY_DASHBOARD", "https://ray-head.koinon-system:8265")
    monkeypatch.setenv("KOINON_POLL_INTERVAL", "0.5")
    assert OperatorConfig.from_env().poll_interval_seconds == 0.5
    assert OperatorConfig().poll_interval_seconds > 0


def test_a_submission_key_given_instead_of_the_secret_must_be_long_and_is_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """KOINON_SUBMISSION_KEY (development, tests): a short one could be guessed, and every
    attempt's Ray submission ids with it."""
    monkeypatch.setenv("KOINON_SUBMISSION_KEY", "dev")
    with pytest.raises(ValueError, match=r"^KOINON_SUBMISSION_KEY"):
        OperatorConfig.from_env()
    key = "k" * 64
    monkeypatch.setenv("KOINON_SUBMISSION_KEY", key)
    config = OperatorConfig.from_env()
    assert config.submission_key == key and key not in repr(config)
    monkeypatch.delenv("KOINON_SUBMISSION_KEY")
    assert OperatorConfig.from_env().submission_key is None  # the Secret, then


def test_bare_ray_workers_take_no_work_unless_the_operator_is_told_so(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OperatorConfig.from_env().allow_bare_ray_workers is False
    for value, allowed in (("true", True), ("1", True), ("False", False), ("0", False), ("", False)):
        monkeypatch.setenv("KOINON_ALLOW_BARE_RAY_WORKERS", value)
        assert OperatorConfig.from_env().allow_bare_ray_workers is allowed
    monkeypatch.setenv("KOINON_ALLOW_BARE_RAY_WORKERS", "ture")  # a misspelt opt-in is not taken as "no"
    with pytest.raises(ValueError, match=r"^KOINON_ALLOW_BARE_RAY_WORKERS"):
        OperatorConfig.from_env()


def test_the_operator_exits_at_start_naming_a_bad_setting() -> None:
    """`--poll-interval 0` used to be ignored (falsy), and a NaN taken."""
    ran = subprocess.run(
        [sys.executable, "-c", "from koinon_operator.main import main; main()", "--poll-interval", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 2, ran.stderr[-2000:]
    assert "koinon-operator: KOINON_POLL_INTERVAL (poll_interval_seconds): must be a finite number" in ran.stderr


def test_a_kubeconfig_flag_naming_no_file_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-kubeconfig"
    ran = subprocess.run(
        [sys.executable, "-c", "from koinon_operator.main import main; main()", "--kubeconfig", str(missing)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 2, ran.stderr[-2000:]
    assert ran.stderr.strip() == f"koinon-operator: --kubeconfig {missing}: No such file or directory"


async def test_a_job_failed_as_invalid_is_still_deleted_after_its_ttl() -> None:
    """A spec the operator cannot parse (here a blank entrypoint a real API server's RE2 `\\S` lets
    through: an ideographic space) ends the job Failed; the pass then returned before the TTL."""
    clock = Clock()
    reconciler = make_reconciler(FakeRay(), clock)
    body = make_body({"entrypoint": "\u3000", "ttlSecondsAfterFinished": 30})
    await step(reconciler, body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec")
    clock.advance(10)
    assert not (await step(reconciler, body)).delete
    clock.advance(30)
    assert (await step(reconciler, body)).delete
