"""The agent's supervision of ``ray start``, with a stand-in that hangs instead of serving.

A Ray node that never gets to serve (no raylet, no node id) cannot be made from real Ray on
demand, so ``--ray-bin`` points at a script that records each start and then sleeps; the agent,
gateway and tunnel are the real ones.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import psutil

from .helpers import cluster


async def test_a_ray_start_that_never_serves_is_replaced(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    hung_ray = tmp_path / "ray"
    hung_ray.write_text(f"#!/bin/sh\necho $$ >> {starts}\nexec sleep 600\n")
    hung_ray.chmod(0o755)
    async with cluster(tmp_path) as c:
        agent = await c.start_agent("hung", start_ray=True, ray_bin=str(hung_ray), ray_start_timeout_s=1.0)
        deadline = asyncio.get_running_loop().time() + 15
        while not starts.exists() or len(starts.read_text().split()) < 2:
            assert asyncio.get_running_loop().time() < deadline, "the hung start was never replaced"
            await asyncio.sleep(0.1)
        first, second = (int(pid) for pid in starts.read_text().split()[:2])
        assert first != second
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
        # Meanwhile the node is connected and says why it is not Ready.
        assert agent.identity is not None
        node = await c.registry.get(agent.identity.node_name)
        assert node is not None
        status = node["status"]
        assert status["phase"] == "NotReady" and status["connected"] is True
        ready = next(cond for cond in status["conditions"] if cond["type"] == "Ready")
        assert ready["reason"] == "RayNotRunning"
        os.kill(second, 0)  # the replacement is the one running now
