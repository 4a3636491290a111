"""Watch streams: events, resume from a resourceVersion, 410 Gone, bookmarks, timeouts, selectors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from koinon_emulator import KubeEmulator

from .helpers import widget

CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
MERGE = {"Content-Type": "application/merge-patch+json"}


async def _events(response: aiohttp.ClientResponse, count: int, timeout: float = 5) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(events) < count:
            line = await response.content.readline()
            if not line:
                break
            events.append(json.loads(line))
    return events


async def test_watch_streams_added_modified_deleted(http: aiohttp.ClientSession) -> None:
    listing = await (await http.get(CONFIGMAPS)).json()
    since = listing["metadata"]["resourceVersion"]
    async with http.get(CONFIGMAPS, params={"watch": "true", "resourceVersion": since}) as stream:
        await http.post(CONFIGMAPS, json={"metadata": {"name": "c1"}, "data": {"a": "1"}})
        await http.patch(f"{CONFIGMAPS}/c1", headers=MERGE, json={"data": {"a": "2"}})
        await http.delete(f"{CONFIGMAPS}/c1")
        events = await _events(stream, 3)
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert events[1]["object"]["data"] == {"a": "2"}
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and len(set(versions)) == 3


async def test_watch_resumes_from_history_and_reports_410_when_too_old(
    http: aiohttp.ClientSession, emulator: KubeEmulator
) -> None:
    first = await (await http.post(CONFIGMAPS, json={"metadata": {"name": "r0"}})).json()
    start = first["metadata"]["resourceVersion"]
    for index in range(1, 4):
        await http.post(CONFIGMAPS, json={"metadata": {"name": f"r{index}"}})
    async with http.get(CONFIGMAPS, params={"watch": "true", "resourceVersion": start}) as stream:
        events = await _events(stream, 3)
    assert [e["object"]["metadata"]["name"] for e in events] == ["r1", "r2", "r3"]
    for index in range(60):  # the fixture keeps 50 events of history per resource
        await http.post(CONFIGMAPS, json={"metadata": {"name": f"filler{index}"}})
    async with http.get(CONFIGMAPS, params={"watch": "true", "resourceVersion": start}) as stream:
        (error,) = await _events(stream, 1)
    assert error["type"] == "ERROR" and error["object"]["code"] == 410


async def test_watch_without_version_replays_current_objects(http: aiohttp.ClientSession) -> None:
    await http.post(CONFIGMAPS, json={"metadata": {"name": "existing"}})
    async with http.get(CONFIGMAPS, params={"watch": "true"}) as stream:
        (event,) = await _events(stream, 1)
    assert event["type"] == "ADDED" and event["object"]["metadata"]["name"] == "existing"


async def test_initial_events_end_with_annotated_bookmark(http: aiohttp.ClientSession) -> None:
    await http.post(CONFIGMAPS, json={"metadata": {"name": "one"}})
    params = {
        "watch": "true",
        "sendInitialEvents": "true",
        "allowWatchBookmarks": "true",
        "resourceVersionMatch": "NotOlderThan",
    }
    async with http.get(CONFIGMAPS, params=params) as stream:
        added, bookmark = await _events(stream, 2)
    assert added["type"] == "ADDED"
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


async def test_bookmarks_and_server_timeout(http: aiohttp.ClientSession) -> None:
    params = {"watch": "true", "resourceVersion": "1", "allowWatchBookmarks": "true", "timeoutSeconds": "1"}
    async with http.get(CONFIGMAPS, params=params) as stream:
        body = await asyncio.wait_for(stream.read(), timeout=5)  # ends by itself after timeoutSeconds
    events = [json.loads(line) for line in body.splitlines()]
    assert events and all(e["type"] == "BOOKMARK" for e in events)
    assert int(events[-1]["object"]["metadata"]["resourceVersion"]) >= 1


async def test_label_selector_transitions_become_added_and_deleted(http: aiohttp.ClientSession) -> None:
    await http.post(CONFIGMAPS, json={"metadata": {"name": "sel", "labels": {"app": "a"}}})
    listing = await (await http.get(CONFIGMAPS)).json()
    params = {"watch": "true", "labelSelector": "app=b", "resourceVersion": listing["metadata"]["resourceVersion"]}
    async with http.get(CONFIGMAPS, params=params) as stream:
        await http.patch(f"{CONFIGMAPS}/sel", headers=MERGE, json={"metadata": {"labels": {"app": "b"}}})
        await http.patch(f"{CONFIGMAPS}/sel", headers=MERGE, json={"data": {"k": "v"}})
        await http.patch(f"{CONFIGMAPS}/sel", headers=MERGE, json={"metadata": {"labels": {"app": "c"}}})
        events = await _events(stream, 3)
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]


async def test_watch_of_finalized_deletion_and_table_format(
    http: aiohttp.ClientSession, with_widgets: KubeEmulator
) -> None:
    url = "/apis/test.koinon.dev/v1/namespaces/default/widgets"
    body = widget("fin")
    body["metadata"]["finalizers"] = ["test/hold"]
    created = await (await http.post(url, json=body)).json()
    params = {"watch": "true", "resourceVersion": created["metadata"]["resourceVersion"]}
    accept = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
    async with http.get(url, params=params, headers=accept) as stream:
        await http.delete(f"{url}/fin")
        await http.patch(f"{url}/fin", headers=MERGE, json={"metadata": {"finalizers": []}})
        events = await _events(stream, 2)
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    assert events[0]["object"]["kind"] == "Table" and "columnDefinitions" in events[0]["object"]
    assert "columnDefinitions" not in events[1]["object"]  # headers only once, like kube-apiserver
    assert events[1]["object"]["rows"][0]["cells"][0] == "fin"


async def test_legacy_watch_path_and_stop_closes_streams(http: aiohttp.ClientSession, emulator: KubeEmulator) -> None:
    async with http.get("/api/v1/watch/namespaces/default/configmaps") as stream:
        await http.post(CONFIGMAPS, json={"metadata": {"name": "legacy"}})
        (event,) = await _events(stream, 1)
        assert event["object"]["metadata"]["name"] == "legacy"
        await asyncio.wait_for(emulator.stop(), timeout=5)
