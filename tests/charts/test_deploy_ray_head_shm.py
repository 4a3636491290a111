"""The Ray head container in the koinon-gateway pod gets a memory-backed /dev/shm volume (since 2026-12-06).

A container's /dev/shm is 64 MiB by default (containerd/CRI-O). Ray sizes the head's object store
at 30 % of the container's memory (limit 4Gi -> about 1.2 GiB); that exceeds /dev/shm, so Ray puts
the object store on --temp-dir instead (/tmp = the ray-tmp emptyDir on the node's disk) and warns
"This will harm performance". The manifest's own comment budgets memory for "its object store
(/dev/shm)", and the agent chart mounts a memory-backed /dev/shm for exactly this reason
(values.yaml shmSize). Job drivers run on this head, so every object a driver puts or gets back
goes through the slow, disk-backed store (and fills node ephemeral storage that is neither
requested nor limited).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ray._private import services, utils

from .helpers import MANIFESTS, Manifest, Tools, parse_documents

pytestmark = pytest.mark.timeout(60)
CONTAINER_DEFAULT_SHM = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def head(tools: Tools) -> tuple[Manifest, Manifest]:
    result = tools.run(tools.kubectl, "kustomize", str(MANIFESTS))
    assert result.returncode == 0, result.stderr
    deployment = next(
        d
        for d in parse_documents(result.stdout)
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "koinon-gateway"
    )
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "ray-head")
    return pod, container


def test_ray_head_object_store_would_not_be_in_shared_memory_without_a_dev_shm_volume(
    head: tuple[Manifest, Manifest], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, container = head
    limit_gi = int(container["resources"]["limits"]["memory"].removesuffix("Gi"))
    # What Ray itself decides for this container with the default 64 MiB /dev/shm.
    monkeypatch.setattr(utils, "get_shared_memory_bytes", lambda: CONTAINER_DEFAULT_SHM)
    store = utils.resolve_object_store_memory(limit_gi * 2**30)
    # Ray's --temp-dir (/tmp/ray in the container); Ray requires it to exist, and on a clean machine
    # /tmp/ray does not (the test passed only where an earlier Ray run had left one).
    plasma_dir, _, _ = services.determine_plasma_store_config(store, str(tmp_path))
    assert plasma_dir != "/dev/shm"  # the premise: without a bigger /dev/shm the store lands on disk


def test_ray_head_mounts_a_memory_backed_dev_shm(head: tuple[Manifest, Manifest]) -> None:
    pod, container = head
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert "/dev/shm" in mounts, (
        "ray-head has no /dev/shm volume: Ray's object store falls back to /tmp (disk-backed emptyDir)"
    )
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])
    assert volume.get("emptyDir", {}).get("medium") == "Memory"
