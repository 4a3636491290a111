"""``KubeEmulator``: the HTTP server plus an in-process API for tests and local tooling."""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from .http_api import build_app
from .patching import MERGE_PATCH
from .persistence import load_state, save_state
from .resources import CRD_RESOURCE, ResourceType
from .selectors import build_filter
from .service import ApiService, WriteOptions
from .tls import ServingCert

JsonObj = dict[str, Any]


class KubeEmulator:
    """A Kubernetes API emulator for kubectl, kopf and clients.

    With ``token``, every client must present it as a bearer token (kubeconfig ``users[].user.token``)
    and ``tls`` should be given too (HTTPS: kubectl sends no credential over plain HTTP); without
    either, plain HTTP and no authentication (in-process tests). ``start()`` returns the base URL.
    The in-process methods (``create``, ``get``, ``list``, ``patch``, ``delete``) share the
    semantics of the HTTP API and emit the same watch events. They return copies, as a client
    gets: the store's own dicts (also held by watch history) edited by a caller would change the
    server's object with no new resourceVersion and no event, and make its next patch a no-op.
    """

    def __init__(
        self,
        *,
        history_limit: int = 20_000,
        bookmark_interval_s: float = 10.0,
        state_file: str | Path | None = None,
        token: str | None = None,
        tls: ServingCert | None = None,
    ) -> None:
        from .store import ObjectStore

        self.service = ApiService(store=ObjectStore(history_limit=history_limit))
        self._bookmark_interval_s = bookmark_interval_s
        self._state_file = Path(state_file) if state_file else None
        self._token = token
        self._tls = tls
        self._runner: web.AppRunner | None = None
        self.url: str | None = None
        if self._state_file is not None:
            load_state(self.service, self._state_file)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        if self._runner is not None:
            raise RuntimeError("the emulator is already started")
        app = build_app(self.service, self._bookmark_interval_s, self._token)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        site = web.SockSite(runner, sock, ssl_context=self._tls.server_context() if self._tls else None)
        await site.start()
        self._runner = runner
        bound_port = sock.getsockname()[1]
        shown_host = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if self._tls else 'http'}://{shown_host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        # End the watch streams first so that the server's shutdown does not wait for them.
        self.service.store.close_watchers()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._state_file is not None:
            save_state(self.service, self._state_file)

    async def __aenter__(self) -> KubeEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- in-process API ------------------------------------------------------------------------

    def resource_for(self, api_version: str, kind: str) -> ResourceType:
        group, _, version = api_version.rpartition("/")
        resource = self.service.registry.find_kind(group, version, kind)
        if resource is None:
            raise LookupError(f"{kind} in {api_version} is not served (is its CRD applied?)")
        return resource

    def create(self, obj: JsonObj, *, strict: bool = True) -> JsonObj:
        resource = self.resource_for(obj["apiVersion"], obj["kind"])
        namespace = obj.get("metadata", {}).get("namespace") or ("default" if resource.namespaced else None)
        options = WriteOptions(field_validation="Strict" if strict else "Warn")
        return copy.deepcopy(self.service.create(resource, namespace, obj, options).obj)

    def apply_crd(self, crd: JsonObj) -> JsonObj:
        """Create a CRD (its resources are served at once); returns the stored CRD with status."""
        return copy.deepcopy(self.service.create(CRD_RESOURCE, None, crd).obj)

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> JsonObj:
        resource = self.resource_for(api_version, kind)
        return copy.deepcopy(self.service.get(resource, namespace if resource.namespaced else None, name))

    def list_objects(
        self, api_version: str, kind: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[JsonObj]:
        resource = self.resource_for(api_version, kind)
        selection = build_filter(namespace, label_selector, None, lambda _: True)
        return copy.deepcopy(self.service.list_objects(resource, selection)[0])

    def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: JsonObj,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> JsonObj:
        resource = self.resource_for(api_version, kind)
        result = self.service.patch(
            resource, namespace if resource.namespaced else None, name, patch, MERGE_PATCH, subresource=subresource
        )
        return copy.deepcopy(result.obj)

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> JsonObj:
        resource = self.resource_for(api_version, kind)
        return copy.deepcopy(self.service.delete(resource, namespace if resource.namespaced else None, name))
