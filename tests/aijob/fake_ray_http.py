"""A stateful fake of Ray's dashboard over HTTP (the Job API, the node list, driver logs), for tests
that run a real operator process against the API emulator without starting Ray. One volunteer's
Ray node, ``r1`` at 127.0.20.1 with one GPU, labelled as VolunteerNode ``vn-1`` (``volunteer``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

API = "koinon.dev/v1alpha1"
NODE = {"node_id": "r1", "node_ip": "127.0.20.1", "state": "ALIVE", "is_head_node": False,
        "resources_total": {"GPU": 1, "CPU": 4}, "labels": {"koinon.dev/node": "vn-1"}}  # fmt: skip
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def volunteer() -> tuple[dict[str, Any], dict[str, Any]]:
    """VolunteerNode vn-1 as the gateway writes it (object, then its status), for NODE."""
    node = {"apiVersion": API, "kind": "VolunteerNode",
            "metadata": {"name": "vn-1", "annotations": {"koinon.dev/connection-owner": "gateway"}},
            "spec": {"owner": "alice", "gpus": [{"model": "NVIDIA L4", "memoryMiB": 24000}]}}  # fmt: skip
    return node, {"status": {"phase": "Ready", "address": NODE["node_ip"], "rayNodeId": NODE["node_id"]}}


@dataclass
class FakeRayHTTP:
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # by submission id, as Ray's records
    submits: list[str] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    log: str = "KOINON_RESULT 42\n"
    url: str = ""

    def set(self, submission_id: str, status: str) -> None:
        job = self.jobs[submission_id]
        job["status"] = status
        if status in ("RUNNING", "SUCCEEDED"):
            job["driver_node_id"] = NODE["node_id"]
        if status in TERMINAL:
            job["end_time"] = int(time.time() * 1000)

    async def handle(self, request: web.Request) -> web.Response:
        path, method = request.path, request.method
        if path == "/api/v0/nodes":
            return web.json_response({"data": {"result": {"result": [NODE]}}})
        if path == "/api/v0/logs/file":
            return web.Response(text=self.log)
        if path == "/api/jobs/" and method == "GET":
            return web.json_response(list(self.jobs.values()))
        if path == "/api/jobs/" and method == "POST":
            body = await request.json()
            submission_id = body["submission_id"]
            self.submits.append(submission_id)
            if submission_id in self.jobs:
                return web.Response(status=400, text=f"Job with submission_id {submission_id} already exists.")
            self.jobs[submission_id] = {
                "type": "SUBMISSION", "submission_id": submission_id, "status": "PENDING", "message": "",
                "driver_node_id": None, "start_time": int(time.time() * 1000), "end_time": None,
                "driver_exit_code": None, "error_type": None, "entrypoint": body["entrypoint"],
                "runtime_env": body.get("runtime_env"), "metadata": body.get("metadata"),
            }  # fmt: skip
            return web.json_response({"submission_id": submission_id})
        rest = path.removeprefix("/api/jobs/")
        if rest.endswith("/stop") and method == "POST":
            submission_id = rest.removesuffix("/stop")
            self.stops.append(submission_id)
            if submission_id not in self.jobs:
                return web.Response(status=404)
            if self.jobs[submission_id]["status"] in TERMINAL:
                return web.json_response({"stopped": False})
            self.set(submission_id, "STOPPED")
            return web.json_response({"stopped": True})
        if rest.endswith("/logs"):
            return web.json_response({"logs": self.log})
        if rest in self.jobs:
            return web.json_response(self.jobs[rest])
        return web.Response(status=404)


@asynccontextmanager
async def fake_ray_http() -> AsyncIterator[FakeRayHTTP]:
    ray = FakeRayHTTP()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ray.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    ray.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield ray
    finally:
        await runner.cleanup()
