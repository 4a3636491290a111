"""A checkout under /tmp reached through a symlink: the link works inside the volunteer sandbox,
and a state dir the sandbox hides stays hidden under both names (exposing the directory twice,
as two bind mounts, left it readable through the link)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)"
)


def test_hidden_state_dir_stays_hidden_when_an_ancestor_is_on_pythonpath_through_a_symlink() -> None:
    # A checkout under /tmp reached through a symlink (`cd /tmp/ck`, PYTHONPATH=$PWD: the shell's
    # logical path), its control plane's state dir inside it (the default ./.koinon/dev).
    real = Path("/tmp") / f"koinon-rv-{secrets.token_hex(3)}"
    alias = Path("/tmp") / f"koinon-rv-alias-{secrets.token_hex(3)}"
    state = real / ".koinon" / "dev"
    try:
        state.mkdir(parents=True)
        (state / "ray-auth-token").write_text("SECRET-TOKEN")
        alias.symlink_to(real)
        env = {**os.environ, "PYTHONPATH": f"{alias}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        probe = (
            "import os,sys\n"
            "for p in sys.argv[1:]:\n"
            "    try: print(p, open(p).read())\n"
            "    except OSError as e: print(p, type(e).__name__)\n"
        )
        completed = subprocess.run(
            ["unshare", "-m", "--propagation", "slave", sys.executable, "-m", "koinon_dev.volunteer_sandbox",
             f"--hide={state}", "--", sys.executable, "-c", probe,
             str(state / "ray-auth-token"), str(alias / ".koinon" / "dev" / "ray-auth-token")],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        print(completed.stdout)
        assert f"{alias / '.koinon' / 'dev' / 'ray-auth-token'} FileNotFoundError" in completed.stdout
        assert "SECRET-TOKEN" not in completed.stdout, (
            f"the hidden state dir (Ray token, kubeconfig) is readable through the alias:\n{completed.stdout}"
        )
    finally:
        alias.unlink(missing_ok=True)
        shutil.rmtree(real, ignore_errors=True)
