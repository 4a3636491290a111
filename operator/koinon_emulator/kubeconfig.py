"""A kubeconfig pointing kubectl, kopf and the kubernetes client at a running emulator."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import yaml

from .files import write_private

CONTEXT_NAME = "koinon-local"


def kubeconfig_document(
    server_url: str, namespace: str = "default", token: str | None = None, ca_pem: bytes | None = None
) -> dict[str, object]:
    """The credential is the emulator's bearer token and the CA its certificate, if it has them."""
    cluster: dict[str, str] = {"server": server_url}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT_NAME, "cluster": cluster}],
        "users": [{"name": CONTEXT_NAME, "user": {"token": token} if token else {}}],
        "contexts": [
            {"name": CONTEXT_NAME, "context": {"cluster": CONTEXT_NAME, "user": CONTEXT_NAME, "namespace": namespace}}
        ],
        "current-context": CONTEXT_NAME,
        "preferences": {},
    }


def write_kubeconfig(
    path: str | os.PathLike[str],
    server_url: str,
    namespace: str = "default",
    token: str | None = None,
    ca_pem: bytes | None = None,
) -> Path:
    """Writes the kubeconfig readable by its owner only (0600): its token lets anyone act on the API."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_private(target, yaml.safe_dump(kubeconfig_document(server_url, namespace, token, ca_pem), sort_keys=False))
    return target
