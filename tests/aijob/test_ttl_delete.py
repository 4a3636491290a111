"""The TTL deletion of a finished AIJob deletes that object only: one deleted and created again
under the same name meanwhile is another job (the delete used to go by name alone)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from koinon_operator.kube import delete_aijob

from tests.emulator.helpers import emulator_for_kube_client

CRD = Path(__file__).resolve().parents[2] / "manifests" / "crds" / "aijobs.koinon.dev.yaml"
API = "koinon.dev/v1alpha1"
JOB = {
    "apiVersion": API,
    "kind": "AIJob",
    "metadata": {"name": "j", "namespace": "default"},
    "spec": {"entrypoint": "x"},
}


async def test_a_ttl_delete_spares_a_job_created_again_under_the_same_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with emulator_for_kube_client(tmp_path, monkeypatch, yaml.safe_load(CRD.read_text())) as cluster:
        old_uid = cluster.call(lambda e: e.create(JOB))["metadata"]["uid"]
        cluster.call(lambda e: e.delete(API, "AIJob", "j", "default"))
        new_uid = cluster.call(lambda e: e.create(JOB))["metadata"]["uid"]
        await delete_aijob("default", "j", old_uid)  # the finished one's TTL, decided before
        assert cluster.call(lambda e: e.get(API, "AIJob", "j", "default"))["metadata"]["uid"] == new_uid
        await delete_aijob("default", "j", new_uid)
        with pytest.raises(Exception, match="not found"):
            cluster.call(lambda e: e.get(API, "AIJob", "j", "default"))
        await delete_aijob("default", "j", new_uid)  # already gone: nothing to do
