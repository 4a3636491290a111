"""List pagination and watch resumption as kube-apiserver (v1.30) has them.

Each test states what the real API server does (the emulator differed before 2026-12-06)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from koinon_emulator import KubeEmulator

CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
MERGE = {"Content-Type": "application/merge-patch+json"}


async def _json(response: aiohttp.ClientResponse) -> Any:
    return await response.json(content_type=None)


async def test_continue_pages_are_one_snapshot(http: aiohttp.ClientSession) -> None:
    """A paginated list is a consistent snapshot: every page (continue token) is served at the
    resourceVersion of the first page and carries that same metadata.resourceVersion
    (API concepts, "Retrieving large results sets in chunks": "the list ... will be served at
    the same resourceVersion"). KubeClient.list_all (gateway) returns the *last* page's
    resourceVersion and watches from it. Before 2026-12-06 the emulator served later pages at the current version,
    so a change to an item of page 1 made while paging is neither in the list nor in the watch
    started from the last page's version: the change is lost (the real server would deliver it)."""
    for name in ("a", "b", "c"):
        await http.post(CONFIGMAPS, json={"metadata": {"name": name}, "data": {"v": "1"}})
    first = await _json(await http.get(CONFIGMAPS, params={"limit": "2"}))
    assert [i["metadata"]["name"] for i in first["items"]] == ["a", "b"]
    await http.patch(f"{CONFIGMAPS}/a", headers=MERGE, json={"data": {"v": "2"}})
    second = await _json(await http.get(CONFIGMAPS, params={"limit": "2", "continue": first["metadata"]["continue"]}))
    assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]


async def test_remaining_item_count_counts_what_is_left(http: aiohttp.ClientSession) -> None:
    """ListMeta.remainingItemCount is "the number of subsequent items in the list which are not
    included in this list response" (1 here: 3 objects, limit 2). Before 2026-12-06 the emulator always said 0,
    which tells a client such as kubectl (which prints it for `--chunk-size`) that nothing is left."""
    for name in ("a", "b", "c"):
        await http.post(CONFIGMAPS, json={"metadata": {"name": name}})
    first = await _json(await http.get(CONFIGMAPS, params={"limit": "2"}))
    assert first["metadata"].get("remainingItemCount") == 1


async def test_watch_from_a_list_version_after_paging_sees_concurrent_change(http: aiohttp.ClientSession) -> None:
    """The consequence for KubeClient.list_all + watch (kube_registry.deleted_nodes): start the watch
    from the version list_all returns and expect to see an update made to an item of page 1 while
    the later pages were read. kube-apiserver delivers it (the list snapshot predates it)."""
    for name in ("a", "b", "c"):
        await http.post(CONFIGMAPS, json={"metadata": {"name": name}, "data": {"v": "1"}})
    first = await _json(await http.get(CONFIGMAPS, params={"limit": "2"}))
    await http.patch(f"{CONFIGMAPS}/a", headers=MERGE, json={"data": {"v": "2"}})
    last = await _json(await http.get(CONFIGMAPS, params={"limit": "2", "continue": first["metadata"]["continue"]}))
    since = last["metadata"]["resourceVersion"]  # what list_all hands to watch()
    params = {"watch": "true", "resourceVersion": since, "timeoutSeconds": "1"}
    async with http.get(CONFIGMAPS, params=params) as stream:
        body = await asyncio.wait_for(stream.read(), timeout=5)
    events = [json.loads(line) for line in body.splitlines()]
    assert any(e["type"] == "MODIFIED" and e["object"]["metadata"]["name"] == "a" for e in events), events


async def test_watch_from_before_a_restart_is_410_or_replayed(tmp_path: Path) -> None:
    """After a restart kube-apiserver's watch cache starts at the current revision; a watch from an
    older resourceVersion either replays the missed events (from etcd history) or gets an ERROR
    event with a 410 Expired Status, so that the client lists again. Before 2026-12-06 the emulator restored from its
    state file has no history and no compaction mark: the watch is accepted and the changes made
    after that version are silently never delivered."""
    state = tmp_path / "state.json"
    first = KubeEmulator(state_file=state)
    url = await first.start()
    async with aiohttp.ClientSession(base_url=url) as http:
        created = await _json(await http.post(CONFIGMAPS, json={"metadata": {"name": "r"}, "data": {"v": "1"}}))
        since = created["metadata"]["resourceVersion"]
        await http.patch(f"{CONFIGMAPS}/r", headers=MERGE, json={"data": {"v": "2"}})
    await first.stop()

    second = KubeEmulator(state_file=state, bookmark_interval_s=0.2)
    url = await second.start()
    try:
        async with aiohttp.ClientSession(base_url=url) as http:
            params = {"watch": "true", "resourceVersion": since, "timeoutSeconds": "1"}
            async with http.get(CONFIGMAPS, params=params) as stream:
                body = await asyncio.wait_for(stream.read(), timeout=5)
    finally:
        await second.stop()
    events = [json.loads(line) for line in body.splitlines()]
    told = [e for e in events if e["type"] == "MODIFIED" or (e["type"] == "ERROR" and e["object"]["code"] == 410)]
    assert told, f"the watch from {since} neither replayed the change nor answered 410: {events}"


async def test_a_selector_watch_sees_a_deletion_whose_last_update_changed_the_label(
    http: aiohttp.ClientSession,
) -> None:
    """kube-apiserver's cacher decides a DELETED event on the object as it was stored: a watcher whose
    labelSelector matched it hears of the deletion. Before 2026-12-07 the emulator filtered on the
    final state: a patch that removed the last finalizer and changed the label deleted the object,
    and a `tier=gold` watcher never heard of it (its cache kept a ghost forever)."""
    body = {"metadata": {"name": "fin", "labels": {"tier": "gold"}, "finalizers": ["x.io/hold"]}}
    assert (await http.post(CONFIGMAPS, json=body)).status == 201
    assert (await http.delete(f"{CONFIGMAPS}/fin")).status == 200
    marked = await _json(await http.get(f"{CONFIGMAPS}/fin"))
    since = marked["metadata"]["resourceVersion"]
    params = {"watch": "true", "resourceVersion": since, "labelSelector": "tier=gold", "timeoutSeconds": "2"}
    async with http.get(CONFIGMAPS, params=params) as stream:
        patch = {"metadata": {"finalizers": None, "labels": {"tier": "silver"}}}
        assert (await http.patch(f"{CONFIGMAPS}/fin", data=json.dumps(patch), headers=MERGE)).status == 200
        assert (await http.get(f"{CONFIGMAPS}/fin")).status == 404  # really deleted
        events = []
        async with asyncio.timeout(5):
            while line := await stream.content.readline():
                events.append(json.loads(line))
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("DELETED", "fin")]
    # A watcher that never selected it (silver) hears nothing, as there.
    params = {"watch": "true", "resourceVersion": since, "labelSelector": "tier=silver", "timeoutSeconds": "1"}
    async with http.get(CONFIGMAPS, params=params) as stream:
        assert [json.loads(line)["type"] async for line in stream.content] == []
