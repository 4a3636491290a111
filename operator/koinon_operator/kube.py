"""The few direct Kubernetes API calls the operator makes outside kopf (kopf has no delete)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config import kube_config

from koinon_operator.api.constants import AIJOB_PLURAL, GROUP, VERSION

# The kubernetes client writes a kubeconfig's certificate-authority-data (and client cert/key data)
# to a mkstemp file at each load, and removes at exit only the one file it remembers per content:
# its bookkeeping is not thread-safe, so loads racing in worker threads (the Lease, the reputation
# book, the result recheck) each left a file in $TMPDIR for good. Every load in this process goes
# through this lock, kopf's login included (see login), and happens once per configuration source.
_config_lock = threading.Lock()
_loaded_from: tuple[object, ...] | None = None


def _config_source() -> tuple[object, ...]:
    """What a load would read: the in-cluster environment and the kubeconfig files, by content (a
    kubeconfig rewritten in place, or the client's default location pointed elsewhere as the tests
    do, is loaded again)."""
    location = str(kube_config.KUBE_CONFIG_DEFAULT_LOCATION)
    contents: list[bytes | None] = []
    for path in location.split(kube_config.ENV_KUBECONFIG_PATH_SEPARATOR):
        try:
            contents.append(Path(path).expanduser().read_bytes())
        except OSError:
            contents.append(None)
    environ = (os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT"))
    return (*environ, location, tuple(contents))


def load_config() -> None:
    """Points the kubernetes client's default configuration at the cluster: in-cluster, else the
    kubeconfig. Thread-safe; loads again only when the source changed (tokens that expire are
    refreshed by the hooks the client sets on the configuration, not by loading again)."""
    global _loaded_from
    with _config_lock:
        source = _config_source()
        if source == _loaded_from:
            return
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        _loaded_from = source


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's own login through the kubernetes client (what it uses when no login handler is
    registered), under the lock above: kopf logs in from a thread while the Lease's first step
    loads the configuration in another, and the two raced for the CA file like any two loads."""
    global _loaded_from
    with _config_lock:
        source = _config_source()
        info = kopf.login_via_client(**kwargs)
        _loaded_from = source  # the default configuration is now this source's
        return info


async def delete_aijob(namespace: str, name: str, uid: str) -> None:
    """Deletes the AIJob ``namespace/name`` if it is still the object ``uid``: one deleted and
    created again under the same name meanwhile is another job, and stays."""

    def call() -> None:
        load_config()
        api = client.CustomObjectsApi()
        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid))
        try:
            api.delete_namespaced_custom_object(GROUP, VERSION, namespace, AIJOB_PLURAL, name, body=options)
        except ApiException as error:
            if error.status not in (404, 409):  # gone, or another object under that name now
                raise

    await asyncio.to_thread(call)
