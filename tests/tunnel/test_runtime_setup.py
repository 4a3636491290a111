"""Process-level tuning done by the gateway's and the agent's entry points (event_loop)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from koinon_gateway import event_loop


@pytest.mark.parametrize("entry_point", ["koinon_gateway.main", "koinon_agent.cli"])
def test_entry_points_select_grpc_endpoints_before_grpc_is_imported(entry_point: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    script = f"import {entry_point}, os, sys; assert 'grpc' in sys.modules; print(os.environ['GRPC_EXPERIMENTS'])"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == event_loop.GRPC_EXPERIMENTS


def test_explicit_grpc_experiments_win() -> None:
    env = dict(os.environ, GRPC_EXPERIMENTS="tcp_rcv_lowat")
    script = "import koinon_gateway.main, os; print(os.environ['GRPC_EXPERIMENTS'])"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "tcp_rcv_lowat"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_allocator_tuning_applies_on_glibc() -> None:
    script = "from koinon_gateway import event_loop; print(event_loop.tune_allocator())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ("True", "False")  # False on a non-glibc libc (musl)
    env["MALLOC_TRIM_THRESHOLD_"] = str(1 << 20)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
