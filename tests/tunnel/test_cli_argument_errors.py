"""Bad command-line values are refused naming the flag, before anything starts (found by review):
`koinon demo --timeout nan` brought a whole control plane up to time out at once, a missing
`--ray-auth-token-file` was a traceback, a malformed `--head-ports` did not say which flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from koinon_dev import cli
from koinon_dev.cluster import DevCluster

REPO = Path(__file__).resolve().parents[2]
GATEWAY = [
    "--store", "memory", "--insecure", "--head-address", "127.0.0.1", "--listen", "127.0.0.1:0",
    "--admin-listen", "127.0.0.1:0", "--head-proxy-listen", "127.0.0.1:0",
]  # fmt: skip


@pytest.mark.parametrize("timeout", ["nan", "0", "-5", "inf", "soon"])
def test_a_demo_timeout_that_cannot_work_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], timeout: str
) -> None:
    started: list[bool] = []

    def start_all(self: DevCluster, *args: object) -> None:
        started.append(True)
        raise RuntimeError("nothing should start")

    monkeypatch.setattr(DevCluster, "_start_all", start_all)
    example = str(REPO / "examples" / "numeric-job.yaml")
    with pytest.raises(SystemExit) as exited:
        cli.main(["--state-dir", str(tmp_path / "state"), "demo", "--timeout", timeout, "--example", example])
    assert exited.value.code == 2 and not started
    assert "--timeout" in capsys.readouterr().err


def _gateway(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from koinon_gateway.main import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *GATEWAY, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_missing_ray_auth_token_file_is_a_one_line_error_naming_the_flag(tmp_path: Path) -> None:
    done = _gateway("--ray-auth-token-file", str(tmp_path / "missing"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "--ray-auth-token-file" in done.stderr, done.stderr


def test_a_malformed_head_ports_value_names_the_flag() -> None:
    done = _gateway("--head-ports", "6380,abc")
    assert done.returncode == 2, done.stderr
    assert "--head-ports" in done.stderr and "'abc'" in done.stderr, done.stderr
