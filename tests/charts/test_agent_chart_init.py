"""The agent container's PID 1, as the chart renders it, run for real in a PID namespace of its own:
it reaps orphans (Ray's processes and users' job code leave some behind; the agent reaps only its own
children) and passes the kubelet's SIGTERM on to the agent, which drains on it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from .helpers import Tools, agent_container, helm_template, one, parse_documents

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a PID namespace"),
]

# Stands in for the agent (the command after the init): starts a child the way the agent starts
# `ray start` (an asyncio subprocess on the agent's event loop); the child leaves a grandchild
# behind, as a Ray worker orphaned by a raylet that stopped first does. Once the orphan has exited,
# it counts the zombies in the namespace, then waits for SIGTERM.
STAND_IN = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from koinon_gateway import event_loop

    def zombies():
        found = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            found += state == "Z"
        return found

    async def main():
        proc = await asyncio.create_subprocess_exec("sh", "-c", "sleep 0.3 & exit 0")
        await proc.wait()
        await asyncio.sleep(1.5)  # the orphaned grandchild has exited by now
        print("pid", os.getpid(), "zombies", zombies(), flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("waiting for SIGTERM", flush=True)
        await stop.wait()
        print("drained on SIGTERM", flush=True)

    event_loop.run(main())
    """
)


def _init_command(tools: Tools) -> list[str]:
    command: list[str] = agent_container(one(parse_documents(helm_template(tools).stdout), "Deployment"))["command"]
    assert command[-2:] == ["koinon-agent", "join"]
    return command[:-2]


def test_the_agent_containers_init_reaps_orphans_and_passes_sigterm_on(tools: Tools) -> None:
    init = _init_command(tools)
    assert init, "the agent runs as PID 1 itself, and it does not reap orphans"
    if shutil.which(init[0]) is None:
        pytest.skip(f"{init[0]} (the image's init) is not installed here")
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *init, sys.executable, "-c", STAND_IN],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if not first:
            stderr = proc.communicate(timeout=10)[1]
            if "Operation not permitted" in stderr:
                pytest.skip("no PID namespaces here")
            raise AssertionError(stderr)
        # PID 1 is the init, the agent a child of it; no exited orphan is left unreaped.
        assert first.split()[1] != "1" and first.split()[3] == "0", first
        assert proc.stdout.readline().strip() == "waiting for SIGTERM"
        # The kubelet signals PID 1 of the container: the init, the only child of unshare here.
        init_pid = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()[0])
        time.sleep(0.1)
        subprocess.run(["kill", "-TERM", str(init_pid)], check=True)
        out, err = proc.communicate(timeout=20)
        assert "drained on SIGTERM" in out, err
    finally:
        if proc.poll() is None:  # --kill-child: the namespace's PID 1 dies with unshare
            proc.send_signal(signal.SIGKILL)
            proc.wait()
