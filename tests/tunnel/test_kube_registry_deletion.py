"""A VolunteerNode counts as deleted once it has a deletionTimestamp: a finalizer that holds the object
(an operator that is down, a person's) must not keep a revoked volunteer connected."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_agent.agent import Agent, JoinRefused
from koinon_emulator.kubeconfig import write_kubeconfig
from koinon_emulator.server import KubeEmulator
from koinon_gateway.kube_ca import KubeCAStore
from koinon_gateway.kube_client import JSON, KubeApiError, KubeClient, WatchEvent, load_kubeconfig
from koinon_gateway.kube_registry import KubeNodeRegistry
from koinon_gateway.kube_tokens import KubeTokenStore
from koinon_gateway.registry import DeletedNode
from koinon_gateway.server import Gateway

from .helpers import echo_server
from .test_kube_stores import NAMESPACE, REPO, Kube, KubeGateway, gateway_config, kubectl_vn

VN = "koinon.dev/v1alpha1", "VolunteerNode"
HOLD = {"metadata": {"finalizers": ["test.koinon.dev/hold"]}}
RELEASE = {"metadata": {"finalizers": None}}


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[Kube]:
    emulator = KubeEmulator()
    url = await emulator.start()
    for path in sorted((REPO / "manifests" / "crds").glob("*.yaml")):
        emulator.apply_crd(yaml.safe_load(path.read_text()))
    emulator.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url, namespace=NAMESPACE)
    client = KubeClient(load_kubeconfig(kubeconfig))
    try:
        yield Kube(emulator, kubeconfig, client)
    finally:
        await client.close()
        await emulator.stop()


async def _collect(registry: KubeNodeRegistry, into: asyncio.Queue[DeletedNode]) -> None:
    async for node in registry.deleted_nodes():
        await into.put(node)


async def _held_node(kube: Kube, registry: KubeNodeRegistry, name: str, address: str) -> None:
    await registry.create(name, {"owner": "alice"}, {})
    await registry.patch_status(name, {"phase": "Ready", "connected": True, "address": address})
    kube.emulator.patch(*VN, name, HOLD)


async def test_a_node_held_by_a_finalizer_is_reported_deleted_once(kube: Kube) -> None:
    registry = KubeNodeRegistry(kube.client)
    await _held_node(kube, registry, "vn-early", "127.0.20.9")
    assert await registry.delete("vn-early")  # already terminating when the watch starts
    deleted: asyncio.Queue[DeletedNode] = asyncio.Queue()
    watcher = asyncio.ensure_future(_collect(registry, deleted))
    try:
        assert await asyncio.wait_for(deleted.get(), 10) == DeletedNode("vn-early", "127.0.20.9")

        await _held_node(kube, registry, "vn-a", "127.0.20.1")
        assert await registry.delete("vn-a")
        assert await asyncio.wait_for(deleted.get(), 10) == DeletedNode("vn-a", "127.0.20.1")
        stored = kube.emulator.get(*VN, "vn-a")
        assert stored["metadata"]["deletionTimestamp"]  # the object is still there

        # Further writes to the terminating object and its final removal report nothing new ...
        await registry.patch_status("vn-a", {"phase": "NotReady", "connected": False})
        kube.emulator.patch(*VN, "vn-a", RELEASE)
        kube.emulator.patch(*VN, "vn-early", RELEASE)
        # ... while a plain deletion still is reported, and after them (the watch keeps its order).
        await registry.create("vn-b", {"owner": "bob"}, {})
        assert await registry.delete("vn-b")
        assert await asyncio.wait_for(deleted.get(), 10) == DeletedNode("vn-b", "")
        assert deleted.empty()
        assert kube.emulator.list_objects(*VN) == []
    finally:
        watcher.cancel()


@pytest.fixture
async def kgw(kube: Kube) -> AsyncIterator[KubeGateway]:
    async with echo_server() as head_port:
        tokens, registry = KubeTokenStore(kube.client, NAMESPACE), KubeNodeRegistry(kube.client, 0.5)
        gateway = Gateway(gateway_config(head_port), tokens, registry, KubeCAStore(kube.client, NAMESPACE))
        await gateway.start()
        try:
            yield KubeGateway(gateway, tokens, registry)
        finally:
            await gateway.stop(0)


async def test_deleting_a_volunteernode_held_by_a_finalizer_revokes_the_agent(
    kube: Kube, kgw: KubeGateway, tmp_path: Path
) -> None:
    config = await kgw.agent_config(tmp_path / "agent")
    agent = Agent(config)
    task = asyncio.ensure_future(agent.run())
    try:
        await asyncio.wait_for(agent.connected.wait(), 15)
        assert agent.identity is not None
        name = agent.identity.node_name
        # The finalizer an operator that is down would leave on the object.
        kube.emulator.patch(*VN, name, HOLD)
        await kube.akubectl("delete", "vn", name, "--wait=false")
        with pytest.raises(JoinRefused, match="no longer exists"):
            await asyncio.wait_for(task, 15)
        assert name not in kgw.gateway.sessions.by_name
        assert kgw.gateway.metrics.refused_streams["node-deleted-while-connected"] == 1
        node = await kubectl_vn(kube, name)
        assert node["metadata"]["deletionTimestamp"]  # still held, yet the volunteer is gone
        assert await kgw.gateway.sessions.flush()
        node = await kubectl_vn(kube, name)
        assert (node["status"]["phase"], node["status"]["connected"]) == ("NotReady", False)
        assert node["status"]["conditions"][0]["reason"] == "Deleted"
        # Its credential stays refused while the object lingers.
        with pytest.raises(JoinRefused, match="no longer exists"):
            await asyncio.wait_for(Agent(config).run(), 15)
    finally:
        task.cancel()


async def test_status_of_a_deleted_node_is_not_written_into_an_object_recreated_under_its_name(
    kube: Kube, kgw: KubeGateway, tmp_path: Path
) -> None:
    """`kubectl replace --force -f vn.yaml` (delete + create, new uid) while the agent is connected:
    the gateway revoked the old session and then merge-patched its final "Deleted" NotReady (and
    any heartbeat write in flight) by name, into the NEW object."""
    config = await kgw.agent_config(tmp_path / "agent")
    agent = Agent(config)
    task = asyncio.ensure_future(agent.run())
    try:
        await asyncio.wait_for(agent.connected.wait(), 15)
        assert agent.identity is not None
        name = agent.identity.node_name
        assert await kgw.gateway.sessions.flush()
        old = kube.emulator.get(*VN, name)
        assert old["status"]["connected"] is True
        # delete + create, as kubectl replace --force does (no await in between)
        kube.emulator.delete(*VN, name)
        new = kube.emulator.create(
            {"apiVersion": "koinon.dev/v1alpha1", "kind": "VolunteerNode",
             "metadata": {"name": name}, "spec": dict(old["spec"])}
        )  # fmt: skip
        assert new["metadata"]["uid"] != old["metadata"]["uid"]
        with pytest.raises(JoinRefused, match="no longer exists"):
            await asyncio.wait_for(task, 15)
        assert await kgw.gateway.sessions.flush()  # refused as for a gone node: no retrying for good
        await asyncio.sleep(0.5)
        stored = kube.emulator.get(*VN, name)
        assert stored["metadata"]["uid"] == new["metadata"]["uid"]
        assert not stored.get("status"), f"the new object got the old session's status: {stored.get('status')}"
    finally:
        task.cancel()


async def test_status_writes_for_an_object_land_only_on_that_object(kube: Kube) -> None:
    """The first write (the object has no status yet, so a JSON patch cannot add fields to it) and
    the later ones land; a write naming a uid the name no longer has is refused as for a gone node,
    and leaves the object under the name untouched."""
    registry = KubeNodeRegistry(kube.client, heartbeat_write_interval_s=0)
    uid = await registry.create("vn-a", {"owner": "alice"}, {})
    kube.emulator.patch(*VN, "vn-a", {"status": {"reputation": {"score": 0.7}}}, subresource="status")
    await registry.patch_status("vn-a", {"phase": "Ready", "connected": True, "rayNodeId": "n1"}, uid=uid)
    await registry.patch_status("vn-a", {"phase": "NotReady", "rayNodeId": None}, uid=uid)
    status = kube.emulator.get(*VN, "vn-a")["status"]
    assert status == {"phase": "NotReady", "connected": True, "reputation": {"score": 0.7}}
    kube.emulator.delete(*VN, "vn-a")
    kube.emulator.create(
        {
            "apiVersion": "koinon.dev/v1alpha1",
            "kind": "VolunteerNode",
            "metadata": {"name": "vn-a"},
            "spec": {"owner": "b"},
        }
    )
    with pytest.raises(KeyError):
        await registry.patch_status("vn-a", {"phase": "Ready", "connected": True}, uid=uid)
    kube.emulator.patch(*VN, "vn-a", {"status": {"reputation": {"score": 1}}}, subresource="status")
    with pytest.raises(KeyError):  # the new object has a status now: refused by the uid test alone
        await registry.patch_status("vn-a", {"phase": "Ready", "connected": True}, uid=uid)
    assert kube.emulator.get(*VN, "vn-a")["status"] == {"reputation": {"score": 1}}


class CountingClient(KubeClient):
    """Counts the requests sent to the API server."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[str] = []

    async def request(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        self.requests.append(method)
        return await super().request(method, path, *args, **kwargs)


async def test_a_joins_first_status_write_is_one_api_call(kube: Kube) -> None:
    """The object a join creates has no status yet, to which a JSON patch cannot add fields: the
    first write was refused (422), read, and sent again, three calls on every join."""
    client = CountingClient(load_kubeconfig(kube.kubeconfig))
    try:
        registry = KubeNodeRegistry(client, heartbeat_write_interval_s=0)
        uid = await registry.create("vn-a", {"owner": "alice"}, {})
        client.requests.clear()
        await registry.patch_status("vn-a", {"phase": "Pending", "connected": False, "address": "127.0.20.2"}, uid=uid)
        assert client.requests == ["PATCH"]
        await registry.patch_status("vn-a", {"phase": "Ready", "connected": True}, uid=uid)
        assert client.requests == ["PATCH", "PATCH"]
        status = kube.emulator.get(*VN, "vn-a")["status"]
        assert status == {"phase": "Ready", "connected": True, "address": "127.0.20.2"}
    finally:
        await client.close()


class GappyWatchClient(KubeClient):
    """A watch that goes quiet while ``stalled`` is set and, once ``released``, ends with 410 Gone:
    a watch resumed from a resourceVersion a restarted API server no longer has."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.watching, self.stalled, self.released = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def watch(self, path: str, resource_version: str, timeout_s: int = 300) -> AsyncIterator[WatchEvent]:
        self.watching.set()
        async for event in super().watch(path, resource_version, timeout_s):
            if self.stalled.is_set():
                await self.released.wait()
                self.stalled.clear()
                raise KubeApiError(410, "Expired", "too old resource version")
            yield event


async def test_nodes_deleted_while_the_watch_was_down_are_reported_after_the_relist(kube: Kube) -> None:
    """Created here and deleted during a watch gap (the watch never saw them), or listed by the
    gateway at start and deleted before its watch began: both are reported, with their address."""
    client = GappyWatchClient(load_kubeconfig(kube.kubeconfig))
    registry = KubeNodeRegistry(client)
    deleted: asyncio.Queue[DeletedNode] = asyncio.Queue()
    try:
        await registry.create("vn-listed", {"owner": "alice"}, {})
        await registry.patch_status("vn-listed", {"phase": "NotReady", "address": "127.0.20.3"})
        await registry.list()  # what Gateway.start() does before it watches
        kube.emulator.delete(*VN, "vn-listed")
        watcher = asyncio.ensure_future(_collect(registry, deleted))
        try:
            assert await asyncio.wait_for(deleted.get(), 10) == DeletedNode("vn-listed", "127.0.20.3")
            await asyncio.wait_for(client.watching.wait(), 10)
            client.stalled.set()
            await registry.create("vn-gap", {"owner": "alice"}, {})
            await registry.patch_status("vn-gap", {"phase": "Ready", "address": "127.0.20.4"})
            kube.emulator.delete(*VN, "vn-gap")  # someone revokes it meanwhile
            client.released.set()
            assert await asyncio.wait_for(deleted.get(), 10) == DeletedNode("vn-gap", "127.0.20.4")
            assert deleted.empty()
        finally:
            watcher.cancel()
    finally:
        await client.close()


async def test_a_node_reported_gone_after_a_relist_leaves_no_last_write_behind(kube: Kube) -> None:
    """A watch DELETED event drops the node's last-write record; the relist after a watch gap
    dropped only its _seen entry, so every node deleted during a gap stayed in _last for good."""
    registry = KubeNodeRegistry(kube.client)
    deleted: asyncio.Queue[DeletedNode] = asyncio.Queue()
    await registry.create("vn-gone", {"owner": "alice"}, {})
    await registry.patch_status("vn-gone", {"phase": "NotReady", "address": "127.0.20.3"})
    assert "vn-gone" in registry._last
    await registry.list()  # what Gateway.start() does before it watches
    kube.emulator.delete(*VN, "vn-gone")  # before the watch's first list: found gone by that list
    watcher = asyncio.ensure_future(_collect(registry, deleted))
    try:
        assert await asyncio.wait_for(deleted.get(), 10) == DeletedNode("vn-gone", "127.0.20.3")
        assert "vn-gone" not in registry._last and "vn-gone" not in registry._seen
    finally:
        watcher.cancel()


async def test_a_node_created_here_and_deleted_before_its_first_status_leaves_nothing_behind(kube: Kube) -> None:
    """A node this registry created keeps its (uid, resourceVersion) for a one-call first status
    write; deleted by someone else before that write (a join cancelled, an admin), the entry stayed
    for the life of the process, on the watch's and on the relist's paths alike."""
    registry = KubeNodeRegistry(kube.client)
    deleted: asyncio.Queue[DeletedNode] = asyncio.Queue()
    await registry.create("vn-watched", {"owner": "alice"}, {})
    await registry.create("vn-relisted", {"owner": "bob"}, {})
    assert {"vn-watched", "vn-relisted"} <= registry._created.keys()
    await registry.list()
    kube.emulator.delete(*VN, "vn-relisted")  # before the watch's first list: found gone by that list
    watcher = asyncio.ensure_future(_collect(registry, deleted))
    try:
        assert (await asyncio.wait_for(deleted.get(), 10)).name == "vn-relisted"
        kube.emulator.delete(*VN, "vn-watched")  # seen by the watch
        assert (await asyncio.wait_for(deleted.get(), 10)).name == "vn-watched"
        assert not registry._created and not registry._last and not registry._seen
    finally:
        watcher.cancel()


class ListThenCreateClient(KubeClient):
    """Joins that land while the first list is under way: ``before_first_list`` runs once the
    registry has asked for the list but before the API takes it, ``during_first_list`` after the
    list was taken and before its answer arrives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before_first_list: Callable[[], Awaitable[None]] | None = None
        self.during_first_list: Callable[[], Awaitable[None]] | None = None

    async def list_all(self, path: str, label_selector: str | None = None, page: int = 500) -> tuple[list[JSON], str]:
        if self.before_first_list is not None:
            action, self.before_first_list = self.before_first_list, None
            await action()
        listed = await super().list_all(path, label_selector, page)
        if self.during_first_list is not None:
            action, self.during_first_list = self.during_first_list, None
            await action()
        return listed


async def test_a_node_created_while_the_watch_lists_is_not_reported_deleted(kube: Kube) -> None:
    client = ListThenCreateClient(load_kubeconfig(kube.kubeconfig))
    registry = KubeNodeRegistry(client)

    async def join() -> None:
        await registry.create("vn-live", {"owner": "alice"}, {})
        await registry.patch_status("vn-live", {"phase": "NotReady", "address": "127.0.20.5"})

    client.during_first_list = join
    deleted: asyncio.Queue[DeletedNode] = asyncio.Queue()
    watcher = asyncio.ensure_future(_collect(registry, deleted))
    try:
        await registry.create("vn-gone", {"owner": "alice"}, {})  # and one that really goes
        kube.emulator.delete(*VN, "vn-gone")
        assert await asyncio.wait_for(deleted.get(), 10) == DeletedNode("vn-gone", "")
        await asyncio.sleep(0.5)
        assert deleted.empty() and kube.emulator.get(*VN, "vn-live") is not None
    finally:
        watcher.cancel()
        await client.close()


async def test_a_node_created_and_deleted_while_the_watch_lists_is_reported(kube: Kube) -> None:
    """Deleted before the list's version: neither in the list nor ever in the watch."""
    client = ListThenCreateClient(load_kubeconfig(kube.kubeconfig))
    registry = KubeNodeRegistry(client)

    async def join_then_delete() -> None:
        await registry.create("vn-brief", {"owner": "alice"}, {})
        await registry.patch_status("vn-brief", {"phase": "NotReady", "address": "127.0.20.6"})
        kube.emulator.delete(*VN, "vn-brief")

    client.before_first_list = join_then_delete
    deleted: asyncio.Queue[DeletedNode] = asyncio.Queue()
    watcher = asyncio.ensure_future(_collect(registry, deleted))
    try:
        assert await asyncio.wait_for(deleted.get(), 10) == DeletedNode("vn-brief", "127.0.20.6")
    finally:
        watcher.cancel()
        await client.close()


async def test_a_failing_api_server_is_asked_less_and_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """An API server that fails every request got a LIST of every VolunteerNode each second, for
    as long as it failed; the watch now backs off as client-go's reflector does (to 30 s)."""

    class FailingClient:
        async def list_all(self, path: str, label_selector: str | None = None) -> tuple[list[JSON], str]:
            raise KubeApiError(503, "ServiceUnavailable", "etcd is away")

    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float) -> None:
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", record)
    client: Any = FailingClient()
    registry = KubeNodeRegistry(client)
    watching = asyncio.create_task(_collect(registry, asyncio.Queue()))
    while len(waits) < 8:
        await real_sleep(0)
    watching.cancel()
    assert waits[:8] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def _vn(name: str, uid: str, address: str) -> JSON:
    return {"metadata": {"name": name, "uid": uid, "resourceVersion": "1"}, "status": {"address": address}}


async def test_a_node_created_again_while_the_watch_was_down_counts_as_deleted(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kubectl delete vn vn-a && kubectl apply -f vn-a.yaml` while the watch was down (an API
    hiccup, 410 Gone, the backoff): the relist compared names only, so the deleted object's session
    stayed connected and wrote its status into the new object."""
    lists = [[_vn("vn-a", "uid-old", "127.0.20.1")], [_vn("vn-a", "uid-new", "")]]

    class Client:
        async def list_all(self, path: str, label_selector: str | None = None) -> tuple[list[JSON], str]:
            return (lists.pop(0) if len(lists) > 1 else lists[0]), "10"

        async def watch(self, path: str, resource_version: str, timeout_s: int = 300) -> AsyncIterator[WatchEvent]:
            raise KubeApiError(503, "ServiceUnavailable", "API server restarting")
            yield  # an async generator, as the client's

        async def get_or_none(self, path: str) -> JSON | None:
            return None

    real_sleep = asyncio.sleep

    async def no_wait(delay: float) -> None:
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", no_wait)
    client: Any = Client()
    reported: asyncio.Queue[DeletedNode] = asyncio.Queue()
    watching = asyncio.create_task(_collect(KubeNodeRegistry(client), reported))
    try:
        assert await asyncio.wait_for(reported.get(), 5) == DeletedNode("vn-a", "127.0.20.1", replaced=True)
        for _ in range(50):
            await real_sleep(0)
        assert reported.empty()  # the new object is not reported in turn
    finally:
        watching.cancel()


async def test_the_backoff_starts_over_after_a_watch_that_served_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """After an outage (backoff at 30 s), a watch that then served quietly for minutes and dropped
    waited the stale 30 s before listing again: deletions went unnoticed meanwhile."""
    lists = 0
    offset = 0.0

    class Client:
        async def list_all(self, path: str, label_selector: str | None = None) -> tuple[list[JSON], str]:
            nonlocal lists
            lists += 1
            if lists <= 6:
                raise KubeApiError(503, "ServiceUnavailable", "etcd is away")
            return [], "10"

        async def watch(self, path: str, resource_version: str, timeout_s: int = 300) -> AsyncIterator[WatchEvent]:
            nonlocal offset
            offset += 240.0  # four quiet minutes of a working watch
            raise OSError("connection reset by peer")
            yield  # an async generator, as the client's

    waits: list[float] = []
    real_sleep, real_monotonic = asyncio.sleep, time.monotonic

    async def record(delay: float) -> None:
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", record)
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + offset)
    client: Any = Client()
    watching = asyncio.create_task(_collect(KubeNodeRegistry(client), asyncio.Queue()))
    while len(waits) < 8:
        await real_sleep(0)
    watching.cancel()
    assert waits[:8] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 1.0, 1.0]
