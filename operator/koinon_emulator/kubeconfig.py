"""A kubeconfig pointing kubectl, kopf and the kubernetes client at a running emulator."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

CONTEXT_NAME = "koinon-local"


def kubeconfig_document(server_url: str, namespace: str = "default") -> dict[str, object]:
    # Plain HTTP and no credentials: the emulator implements no authentication (local use only).
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT_NAME, "cluster": {"server": server_url}}],
        "users": [{"name": CONTEXT_NAME, "user": {}}],
        "contexts": [
            {"name": CONTEXT_NAME, "context": {"cluster": CONTEXT_NAME, "user": CONTEXT_NAME, "namespace": namespace}}
        ],
        "current-context": CONTEXT_NAME,
        "preferences": {},
    }


def write_kubeconfig(path: str | os.PathLike[str], server_url: str, namespace: str = "default") -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(yaml.safe_dump(kubeconfig_document(server_url, namespace), sort_keys=False))
    temporary.replace(target)  # atomic: readers never see a half-written kubeconfig
    return target
