"""The aiohttp application: routes Kubernetes API URLs to the service and renders responses."""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
from bisect import bisect_right
from collections import OrderedDict
from typing import Any

from aiohttp import web

from . import discovery, errors, openapi
from .errors import ApiError
from .patching import APPLY_PATCH, JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH
from .requests import (
    MAX_REQUEST_BODY_BYTES,
    ResourcePath,
    decode_continue,
    delete_options,
    delete_preconditions,
    encode_continue,
    json_body,
    object_filter,
    parse_resource_path,
    parse_uint,
    partial_metadata_request,
    query_int,
    table_request,
    write_options,
)
from .service import ApiService, WriteResult
from .store import object_key
from .tables import table
from .watch import DEFAULT_TIMEOUT_S, WatchRequest, serve_watch

JsonObj = dict[str, Any]
# Paginated lists whose later pages can still be read (kube-apiserver: until etcd compacts).
LIST_SNAPSHOTS_KEPT = 64
OPENAPI_V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
# What kube-apiserver serves to anonymous clients by default (system:public-info-viewer): health
# checks and the version, which tell nothing of the objects.
PUBLIC_PATHS = ("version", "healthz", "livez", "readyz")
logger = logging.getLogger(__name__)

SERVICE_KEY: web.AppKey[ApiService] = web.AppKey("service", ApiService)
BOOKMARK_KEY: web.AppKey[float] = web.AppKey("bookmark_interval", float)


_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _json(body: JsonObj, status: int = 200, warnings: list[str] | None = None) -> web.Response:
    response = web.Response(
        body=json.dumps(body, separators=(",", ":"), allow_nan=False).encode(),
        status=status,
        content_type="application/json",
    )
    for warning in warnings or ():
        # RFC 7234 warn-text is a quoted-string: escape quotes, as kube-apiserver does. Other
        # control characters (a client's field name may hold any) become spaces: a header with
        # one is refused by aiohttp after the write it reports was made, and the client saw a
        # dropped connection for a change that happened.
        text = _CONTROL_CHARACTERS.sub(" ", warning.replace("\\", "\\\\").replace('"', '\\"'))
        response.headers.add("Warning", f'299 - "{text}"')
    return response


def _render_error(error: ApiError) -> web.Response:
    return _json(error.status(), status=error.code)


def _partial(obj: JsonObj) -> JsonObj:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}


class ApiHandlers:
    def __init__(self, service: ApiService, bookmark_interval_s: float, token: str | None = None) -> None:
        self.service = service
        self.bookmark_interval_s = bookmark_interval_s
        self._token = token.encode() if token is not None else None
        # Paginated lists still being read: snapshot id -> (resourceVersion, items).
        self._snapshots: OrderedDict[str, tuple[int, list[JsonObj]]] = OrderedDict()

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            self._authenticate(request)
            return await self._dispatch(request)
        except ApiError as error:
            return _render_error(error)
        except web.HTTPRequestEntityTooLarge:
            # What kube-apiserver answers past its request body limit (3 MiB).
            return _render_error(ApiError(413, "RequestEntityTooLarge", f"limit is {MAX_REQUEST_BODY_BYTES}", None))
        except Exception:
            logger.exception("emulator failure on %s %s", request.method, request.path_qs)
            return _render_error(ApiError(500, "InternalError", "an internal error occurred in the emulator"))

    def _authenticate(self, request: web.Request) -> None:
        """With a token, every request but an anonymous one for a public path must present it as
        ``Authorization: Bearer <token>``; anything else is 401, as kube-apiserver answers."""
        if self._token is None:
            return
        header = request.headers.get("Authorization")
        if header is None and request.path.strip("/").split("/")[0] in PUBLIC_PATHS:
            return
        scheme, _, presented = (header or "").partition(" ")
        # Compared in constant time: a client must not learn the token from response times.
        valid = hmac.compare_digest(presented.strip().encode(errors="backslashreplace"), self._token)
        if scheme.lower() != "bearer" or not valid:
            raise ApiError(401, "Unauthorized", "Unauthorized")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        registry = self.service.registry
        if request.method == "GET":
            document = self._discovery(parts, request)
            if document is not None:
                return _json(document)
            if parts and parts[0] in ("healthz", "livez", "readyz"):
                return web.Response(text="ok")
            if parts == ["openapi", "v2"]:
                # kubectl reads this (as protobuf) only to validate `kind: List` files client-side.
                # An empty protobuf message is a valid, empty swagger Document: items of kinds it does
                # not describe are skipped there and validated by this server (fieldValidation).
                return web.Response(body=b"", content_type=OPENAPI_V2_PROTOBUF)
        path = parse_resource_path(parts, registry)
        if path is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return await self._resource(request, path)

    def _discovery(self, parts: list[str], request: web.Request) -> JsonObj | None:
        registry = self.service.registry
        if parts == ["version"]:
            return discovery.version_info()
        if parts == ["api"]:
            return discovery.api_versions(request.host)
        if parts == ["apis"]:
            return discovery.api_group_list(registry)
        if len(parts) == 2 and parts[0] == "api":
            return discovery.api_resource_list(registry, "", parts[1])
        if len(parts) == 2 and parts[0] == "apis":
            return discovery.api_group(registry, parts[1])
        if len(parts) == 3 and parts[0] == "apis":
            return discovery.api_resource_list(registry, parts[1], parts[2])
        if parts == ["openapi", "v3"]:
            return openapi.index(registry)
        if parts[:2] == ["openapi", "v3"] and len(parts) in (4, 5):
            group, version = ("", parts[3]) if parts[2] == "api" else (parts[3], parts[4] if len(parts) > 4 else "")
            return openapi.group_version_document(registry, group, version)
        return None

    async def _resource(self, request: web.Request, path: ResourcePath) -> web.StreamResponse:
        service = self.service
        resource = service.resolve(path.group, path.version, path.plural)
        namespace = path.namespace if resource.namespaced else None
        if path.subresource not in (None, "status"):
            raise ApiError(
                404,
                "NotFound",
                f"the server could not find the requested resource (subresource {path.subresource!r} is not emulated)",
            )
        method = request.method
        watching = path.legacy_watch or request.query.get("watch") in ("true", "1")
        if path.name is None:
            if method == "GET" and watching:
                return await self._watch(request, resource, namespace)
            if method == "GET":
                return self._list(request, resource, namespace)
            if method == "POST":
                if resource.namespaced and namespace is None:
                    raise errors.method_not_allowed("POST on a namespaced resource needs a namespace in the URL")
                result = service.create(resource, namespace, await json_body(request), write_options(request))
                return self._write_response(result)
            if method == "DELETE":
                return await self._delete_collection(request, resource, namespace)
            raise errors.method_not_allowed(f"{method} is not supported on a collection")
        if resource.namespaced and namespace is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if method == "GET" and watching:
            return await self._watch(request, resource, namespace, path.name)
        if method == "GET":
            obj = service.get(resource, namespace, path.name)
            return self._render_objects(request, resource, [obj], single=True)
        if method == "PUT":
            result = service.update(
                resource, namespace, path.name, await json_body(request), write_options(request), path.subresource
            )
            return self._write_response(result)
        if method == "PATCH":
            return await self._patch(request, resource, namespace, path)
        if method == "DELETE":
            body = await json_body(request) or {}
            options = delete_options(request, body)
            obj = service.delete(resource, namespace, path.name, options, delete_preconditions(body))
            return _json(obj)
        raise errors.method_not_allowed(f"{method} is not supported")

    @staticmethod
    def _write_response(result: WriteResult) -> web.Response:
        return _json(result.obj, 201 if result.created else 200, result.warnings)

    async def _patch(
        self, request: web.Request, resource: Any, namespace: str | None, path: ResourcePath
    ) -> web.Response:
        content_type = request.content_type
        if content_type == APPLY_PATCH or content_type not in (MERGE_PATCH, JSON_PATCH, STRATEGIC_MERGE_PATCH):
            raise errors.unsupported_media_type(content_type)
        if content_type == STRATEGIC_MERGE_PATCH and resource.crd_name is not None:
            # Custom resources carry no merge-key metadata: kube-apiserver refuses this patch type
            # for them (kubectl patch needs --type=merge or --type=json).
            raise errors.unsupported_media_type(content_type, custom_resource=True)
        assert path.name is not None
        patch = await json_body(request)
        if patch is None and not await request.read():
            # No body is not the JSON `null` (a JSON patch of no operations: a no-op): kube-apiserver
            # cannot decode it, whatever the patch type.
            raise errors.bad_request("error decoding patch: unexpected end of JSON input")
        result = self.service.patch(
            resource,
            namespace,
            path.name,
            patch,
            content_type,
            write_options(request),
            path.subresource,
        )
        return self._write_response(result)

    def _list(self, request: web.Request, resource: Any, namespace: str | None) -> web.Response:
        limit = query_int(request, "limit", 0)
        if token := request.query.get("continue"):
            # Every page is served from the first page's snapshot, at its resourceVersion.
            snapshot_id, start = decode_continue(token)
            snapshot = self._snapshots.get(snapshot_id)
            if snapshot is None:
                raise errors.gone(
                    "The provided continue parameter is too old to display a consistent list result. "
                    "You can start a new list without the continue parameter."
                )
            version, items = snapshot
            keys = [object_key(obj) for obj in items]
            items = items[bisect_right(keys, start) :]
        else:
            selection = object_filter(request, resource, namespace)
            items, version = self.service.list_objects(resource, selection)
            snapshot_id = ""
        list_meta: JsonObj = {"resourceVersion": str(version)}
        if limit > 0 and len(items) > limit:
            if not snapshot_id:
                snapshot_id = self._keep_snapshot(version, items)
            page = items[:limit]
            list_meta["continue"] = encode_continue(snapshot_id, object_key(page[-1]))
            list_meta["remainingItemCount"] = len(items) - limit
            items = page
        return self._render_objects(request, resource, items, single=False, list_meta=list_meta)

    def _keep_snapshot(self, version: int, items: list[JsonObj]) -> str:
        """Keeps a paginated list's items for its later pages (stored objects are replaced on
        write, never changed in place, so these references stay as they were)."""
        snapshot_id = secrets.token_hex(8)
        self._snapshots[snapshot_id] = (version, list(items))
        while len(self._snapshots) > LIST_SNAPSHOTS_KEPT:
            self._snapshots.popitem(last=False)  # the oldest: its continue token gets 410, as compacted
        return snapshot_id

    def _render_objects(
        self,
        request: web.Request,
        resource: Any,
        items: list[JsonObj],
        *,
        single: bool,
        list_meta: JsonObj | None = None,
    ) -> web.Response:
        accept = request.headers.get("Accept", "")
        table_version = table_request(accept)
        if table_version is not None:
            include = request.query.get("includeObject", "Metadata")
            return _json(
                table(resource, items, api_version=table_version, include_object=include, list_metadata=list_meta)
            )
        if partial_metadata_request(accept):
            if single:
                return _json(_partial(items[0]))
            return _json(
                {
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": list_meta or {},
                    "items": [_partial(obj) for obj in items],
                }
            )
        if single:
            return _json(items[0])
        return _json(
            {
                "kind": resource.list_kind,
                "apiVersion": resource.api_version,
                "metadata": list_meta or {},
                "items": items,
            }
        )

    async def _watch(
        self, request: web.Request, resource: Any, namespace: str | None, name: str | None = None
    ) -> web.StreamResponse:
        selection = object_filter(request, resource, namespace)
        if name is not None:
            selection = selection.with_field("metadata.name", name)
        version = request.query.get("resourceVersion", "")
        initial = request.query.get("sendInitialEvents") == "true"
        if initial or version in ("", "0"):
            since = None
        else:
            # The storage's ParseResourceVersion (strconv.ParseUint, 64 bits): a sign ("-5") or
            # anything else that is not one is a 400 there, never a too-old version's 410.
            since = parse_uint(version, 2**64 - 1)
            if since is None:
                raise errors.bad_request(f"invalid resourceVersion {version[:64]!r}")
        timeout = float(query_int(request, "timeoutSeconds", 0) or DEFAULT_TIMEOUT_S)
        accept = request.headers.get("Accept", "")
        watch = WatchRequest(
            resource=resource,
            selection=selection,
            since=since,
            send_initial_events=initial,
            bookmarks=request.query.get("allowWatchBookmarks") == "true",
            timeout_s=timeout,
            table_version=table_request(accept),
            include_object=request.query.get("includeObject", "Metadata"),
        )
        return await serve_watch(request, self.service, watch, self.bookmark_interval_s)

    async def _delete_collection(self, request: web.Request, resource: Any, namespace: str | None) -> web.Response:
        options = delete_options(request, await json_body(request) or {})
        items, _ = self.service.list_objects(resource, object_filter(request, resource, namespace))
        deleted = []
        for obj in items:
            metadata = obj["metadata"]
            try:
                deleted.append(self.service.delete(resource, metadata.get("namespace"), metadata["name"], options))
            except ApiError as error:
                if error.code != 404:
                    raise
        return _json(
            {
                "kind": resource.list_kind,
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(self.service.store.resource_version)},
                "items": deleted,
            }
        )


def build_app(service: ApiService, bookmark_interval_s: float = 10.0, token: str | None = None) -> web.Application:
    """The API; with ``token``, clients must present it as a bearer token (None: no authentication)."""
    app = web.Application(client_max_size=MAX_REQUEST_BODY_BYTES)
    handlers = ApiHandlers(service, bookmark_interval_s, token)
    app[SERVICE_KEY] = service
    app.router.add_route("*", "/{tail:.*}", handlers.dispatch)
    return app
