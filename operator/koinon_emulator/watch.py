"""Watch streams: newline-delimited JSON events over a chunked HTTP response, one queue per watcher."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .errors import ApiError
from .resources import ResourceType
from .selectors import ObjectFilter
from .service import ApiService
from .tables import table

JsonObj = dict[str, Any]

DEFAULT_TIMEOUT_S = 1800.0
_BATCH = 500  # events written per chunk when a burst is queued


@dataclass(frozen=True)
class WatchRequest:
    resource: ResourceType
    selection: ObjectFilter
    since: int | None
    send_initial_events: bool
    bookmarks: bool
    timeout_s: float
    table_version: str | None
    include_object: str


def _line(event_type: str, obj: JsonObj) -> bytes:
    return json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"


async def serve_watch(
    request: web.Request, service: ApiService, watch: WatchRequest, bookmark_interval_s: float
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-cache, private"}
    )
    response.enable_chunked_encoding()
    resource = watch.resource
    try:
        watcher = service.store.watch(resource.storage_key, watch.selection, watch.since)
    except ApiError as error:
        # Too old a resourceVersion: Kubernetes streams a single ERROR event carrying a 410 Status.
        await response.prepare(request)
        await response.write(_line("ERROR", error.status()))
        await response.write_eof()
        return response
    initial_pending = watcher.queue.qsize() if watch.send_initial_events else -1
    initial_version = service.store.resource_version
    first_table = True

    def render(event_type: str, obj: JsonObj) -> bytes:
        nonlocal first_table
        obj = service.as_version(resource, obj)
        if watch.table_version is not None:
            obj = table(
                resource,
                [obj],
                api_version=watch.table_version,
                include_object=watch.include_object,
                with_columns=first_table,
            )
            first_table = False
        return _line(event_type, obj)

    def bookmark(version: int, initial_end: bool = False) -> bytes:
        metadata: JsonObj = {"resourceVersion": str(version)}
        if initial_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        return _line("BOOKMARK", {"kind": resource.kind, "apiVersion": resource.api_version, "metadata": metadata})

    deadline = time.monotonic() + watch.timeout_s
    try:
        await response.prepare(request)
        if initial_pending == 0:
            await response.write(bookmark(initial_version, initial_end=True))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = await asyncio.wait_for(watcher.queue.get(), timeout=min(remaining, bookmark_interval_s))
            except TimeoutError:
                if watch.bookmarks and watcher.queue.empty():
                    # Everything up to the current version has been delivered to this watcher.
                    await response.write(bookmark(service.store.resource_version))
                continue
            chunk: list[bytes] = []
            closed = False
            while item is not None:
                chunk.append(render(*item))
                if initial_pending > 0:
                    initial_pending -= 1
                    if initial_pending == 0:
                        chunk.append(bookmark(initial_version, initial_end=True))
                if len(chunk) >= _BATCH or watcher.queue.empty():
                    break
                item = watcher.queue.get_nowait()
            else:
                closed = True
            if chunk:
                await response.write(b"".join(chunk))
            if closed:
                break
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
    except ConnectionError:
        # The client went away; nothing more to send.
        pass
    finally:
        service.store.unwatch(watcher)
    return response
