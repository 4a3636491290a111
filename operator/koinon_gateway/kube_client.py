"""A small asyncio client for the Kubernetes API (aiohttp), enough for the gateway's stores.

Why not the ``kubernetes`` package: its client is synchronous and would block the gateway's event
loop, which also carries every tunnel. Configuration comes from a kubeconfig (``--kubeconfig``,
``$KUBECONFIG``, ``~/.kube/config``) or from the pod's service account (in-cluster).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

JSON = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Bound service-account tokens rotate (about hourly); re-read the file this often.
TOKEN_REREAD_S = 60.0


class KubeConfigError(ValueError):
    """The kubeconfig or in-cluster configuration cannot be used; the message names the field."""


class KubeApiError(Exception):
    """A non-2xx answer of the API server (``status``: HTTP code, ``reason``: Status.reason)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        """409: AlreadyExists on create, Conflict on a stale resourceVersion."""
        return self.status == 409

    @property
    def gone(self) -> bool:
        return self.status == 410

    @property
    def invalid(self) -> bool:
        """422: what kube-apiserver answers a JSON patch whose ``test`` op (or any op) does not apply."""
        return self.status == 422

    @property
    def refused(self) -> bool:
        """A 4xx the API server answered: the request was not applied (a write is known not to
        have landed). Not a 5xx (the server may have applied it before failing: a timeout, an etcd
        error) nor an answer that could not be read (``BadResponse``, whatever code it names)."""
        return 400 <= self.status < 500 and self.reason != "BadResponse"


@dataclass(frozen=True)
class KubeConfig:
    server: str
    namespace: str = "default"
    token: str = ""
    token_file: Path | None = None
    ca_pem: bytes | None = None
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = None
    insecure_skip_tls_verify: bool = False


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK | ERROR
    object: JSON


def _file_or_data(entry: Mapping[str, Any], key: str, base: Path, where: str) -> bytes | None:
    """kubeconfig pairs ``<key>`` (a path, relative to the kubeconfig) and ``<key>-data`` (base64)."""
    data = entry.get(f"{key}-data")
    if data:
        try:
            return base64.b64decode(data, validate=True)
        except ValueError as exc:
            raise KubeConfigError(f"{where}.{key}-data: not valid base64") from exc
    path = entry.get(key)
    if path:
        full = (base / str(path)).expanduser()
        try:
            return full.read_bytes()
        except OSError as exc:
            raise KubeConfigError(f"{where}.{key}: cannot read {full}: {exc.strerror}") from exc
    return None


def _named(document: Mapping[str, Any], section: str, name: str) -> Mapping[str, Any]:
    for item in document.get(section) or []:
        if isinstance(item, dict) and item.get("name") == name:
            value = item.get(section[:-1])
            return value if isinstance(value, dict) else {}
    raise KubeConfigError(f"{section}: no entry named {name!r}")


def default_kubeconfig_path() -> Path:
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), "")
    return Path(first) if first else Path.home() / ".kube" / "config"


def load_kubeconfig(path: Path | None = None, context: str | None = None) -> KubeConfig:
    path = path or default_kubeconfig_path()
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise KubeConfigError(f"kubeconfig: cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise KubeConfigError(f"kubeconfig: {path} is not valid YAML") from exc
    if not isinstance(document, dict):
        raise KubeConfigError(f"kubeconfig: {path} is not a mapping")
    context_name = context or document.get("current-context")
    if not context_name:
        raise KubeConfigError("kubeconfig: current-context is not set")
    ctx = _named(document, "contexts", str(context_name))
    cluster = _named(document, "clusters", str(ctx.get("cluster", "")))
    user = _named(document, "users", str(ctx.get("user", ""))) if ctx.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        raise KubeConfigError("kubeconfig: users[].user.exec/auth-provider are not supported; use a token or cert")
    server = str(cluster.get("server") or "")
    if not server.startswith(("http://", "https://")):
        raise KubeConfigError(f"kubeconfig: clusters[].cluster.server: expected an http(s) URL, got {server!r}")
    base = path.parent
    token_file = user.get("tokenFile")
    return KubeConfig(
        server=server.rstrip("/"),
        namespace=str(ctx.get("namespace") or "default"),
        token=str(user.get("token") or ""),
        token_file=(base / str(token_file)) if token_file else None,
        ca_pem=_file_or_data(cluster, "certificate-authority", base, "clusters[].cluster"),
        client_cert_pem=_file_or_data(user, "client-certificate", base, "users[].user"),
        client_key_pem=_file_or_data(user, "client-key", base, "users[].user"),
        insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify", False)),
    )


def load_incluster_config(
    environ: Mapping[str, str] | None = None, account_dir: Path = SERVICE_ACCOUNT_DIR
) -> KubeConfig:
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise KubeConfigError("in-cluster: KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set")
    token_file = account_dir / "token"
    if not token_file.exists():
        raise KubeConfigError(f"in-cluster: service-account token {token_file} is missing")
    namespace_file = account_dir / "namespace"
    ca_file = account_dir / "ca.crt"
    return KubeConfig(
        server=f"https://{'[' + host + ']' if ':' in host else host}:{port}",
        namespace=namespace_file.read_text().strip() if namespace_file.exists() else "default",
        token_file=token_file,
        ca_pem=ca_file.read_bytes() if ca_file.exists() else None,
    )


def load_config(kubeconfig: Path | None = None) -> KubeConfig:
    """An explicit kubeconfig wins; otherwise in-cluster when running in a pod; else the default kubeconfig."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return load_incluster_config()
    return load_kubeconfig(kubeconfig)


def _ssl_context(config: KubeConfig) -> ssl.SSLContext | bool:
    if not config.server.startswith("https://"):
        return True
    if config.insecure_skip_tls_verify:
        # As kubectl: the server is not verified, but a client certificate is still presented
        # (aiohttp's ssl=False would drop it, and the API server would see system:anonymous).
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cadata=config.ca_pem.decode() if config.ca_pem else None)
    if config.client_cert_pem and config.client_key_pem:
        # ssl loads client certificates only from files: write them to a private temporary directory.
        with tempfile.TemporaryDirectory(prefix="koinon-kube-") as directory:
            cert, key = Path(directory) / "client.crt", Path(directory) / "client.key"
            for target, data in ((cert, config.client_cert_pem), (key, config.client_key_pem)):
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
            context.load_cert_chain(cert, key)
    return context


def _error_from(status: int, body: bytes) -> KubeApiError:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and document.get("kind") == "Status":
        return KubeApiError(status, str(document.get("reason", "")), str(document.get("message", "")))
    return KubeApiError(status, "", body[:200].decode(errors="replace"))


def secret_path(namespace: str, name: str | None = None) -> str:
    path = f"/api/v1/namespaces/{quote(namespace)}/secrets"
    return f"{path}/{quote(name)}" if name else path


def configmap_path(namespace: str, name: str | None = None) -> str:
    path = f"/api/v1/namespaces/{quote(namespace)}/configmaps"
    return f"{path}/{quote(name)}" if name else path


def custom_path(
    group: str,
    version: str,
    plural: str,
    name: str | None = None,
    namespace: str | None = None,
    subresource: str | None = None,
) -> str:
    path = f"/apis/{group}/{version}"
    if namespace:
        path += f"/namespaces/{quote(namespace)}"
    path += f"/{plural}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeClient:
    """One aiohttp session per client; create it in the event loop that will use it, ``close()`` at the end."""

    def __init__(self, config: KubeConfig, request_timeout_s: float = 30.0) -> None:
        self.config = config
        self.namespace = config.namespace
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._token = config.token
        self._token_read_at: float | None = None  # not read yet (monotonic() may be < 60 s after boot)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_ssl_context(self.config)))
        return self._session

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.config.token_file is not None and (
            self._token_read_at is None or time.monotonic() - self._token_read_at > TOKEN_REREAD_S
        ):
            self._token = self.config.token_file.read_text().strip()
            self._token_read_at = time.monotonic()
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> JSON:
        data = None if body is None else json.dumps(body).encode()
        with _no_request_headers_in_errors():
            async with self._http().request(
                method,
                self.config.server + path,
                data=data,
                params=params,
                headers=self._headers(content_type or ("application/json" if data is not None else None)),
                timeout=self._timeout,
            ) as response:
                payload = await response.read()
                if response.status >= 300:
                    raise _error_from(response.status, payload)
        result = json.loads(payload) if payload else {}
        if not isinstance(result, dict):
            raise KubeApiError(response.status, "BadResponse", "expected a JSON object")
        return result

    async def get(self, path: str) -> JSON:
        return await self.request("GET", path)

    async def get_or_none(self, path: str) -> JSON | None:
        try:
            return await self.get(path)
        except KubeApiError as exc:
            if exc.not_found:
                return None
            raise

    async def list_all(self, path: str, label_selector: str | None = None, page: int = 500) -> tuple[list[JSON], str]:
        """All items (following ``continue``) and the list's resourceVersion (to start a watch from)."""
        items: list[JSON] = []
        params = {"limit": str(page)}
        if label_selector:
            params["labelSelector"] = label_selector
        while True:
            listed = await self.request("GET", path, params=params)
            items.extend(listed.get("items") or [])
            metadata = listed.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                return items, str(metadata.get("resourceVersion", ""))
            params["continue"] = str(token)

    async def create(self, collection_path: str, body: JSON) -> JSON:
        return await self.request("POST", collection_path, body)

    async def replace(self, path: str, body: JSON) -> JSON:
        """PUT; with ``metadata.resourceVersion`` set, a concurrent change answers 409 (optimistic locking)."""
        return await self.request("PUT", path, body)

    async def merge_patch(self, path: str, patch: JSON) -> JSON:
        return await self.request("PATCH", path, patch, content_type=MERGE_PATCH)

    async def json_patch(self, path: str, operations: list[JSON]) -> JSON:
        """RFC 6902 operations, applied all or none: a ``test`` that fails answers 422."""
        return await self.request("PATCH", path, operations, content_type=JSON_PATCH)

    async def delete(self, path: str, preconditions: Mapping[str, str] | None = None) -> JSON:
        """Deletes; with ``preconditions`` (uid, resourceVersion) only the very object that was read
        (409 Conflict if it changed meanwhile)."""
        if not preconditions:
            return await self.request("DELETE", path)
        options = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": dict(preconditions)}
        return await self.request("DELETE", path, options)

    async def watch(self, path: str, resource_version: str, timeout_s: int = 300) -> AsyncIterator[WatchEvent]:
        """Events after ``resource_version`` until the server ends the watch; an ERROR event raises.

        A 410 (history too old) raises KubeApiError with ``gone``; the caller lists again.
        """
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_s + 30)
        with _no_request_headers_in_errors():
            async with self._http().get(
                self.config.server + path, params=params, headers=self._headers(None), timeout=timeout
            ) as response:
                if response.status >= 300:
                    raise _error_from(response.status, await response.read())
                async for line in response.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = str(event.get("type", "")), event.get("object") or {}
                    if kind == "ERROR":
                        raise KubeApiError(
                            int(obj.get("code", 500)), str(obj.get("reason", "")), str(obj.get("message"))
                        )
                    yield WatchEvent(kind, obj)


@contextlib.contextmanager
def _no_request_headers_in_errors() -> Iterator[None]:
    """A reply aiohttp cannot parse (a proxy answering garbage, a header cut short) raises
    ClientResponseError, whose repr carries the request's headers, our bearer token among them;
    callers log API errors with %r. It becomes a KubeApiError that carries no headers."""
    try:
        yield
    except aiohttp.ClientResponseError as exc:
        raise KubeApiError(exc.status or 502, "BadResponse", str(exc.message)[:200]) from None


@contextlib.asynccontextmanager
async def kube_client(config: KubeConfig) -> AsyncIterator[KubeClient]:
    client = KubeClient(config)
    try:
        yield client
    finally:
        await client.close()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()
