"""GPU speed: model names map to relative speeds, and long jobs go to fast GPUs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from koinon_operator.scheduler import DEFAULT_CONFIG, Gpu, JobRequest, NodeSnapshot, ReputationEvidence, schedule
from koinon_operator.scheduler.speed import gpu_speed, node_speed, slowest_per_node

NOW = 50_000.0
SC = DEFAULT_CONFIG.scoring


@pytest.mark.parametrize(
    ("nvml_name", "speed"),
    [
        ("NVIDIA GeForce RTX 4090", 1.0),
        ("Tesla T4", 0.2),
        ("NVIDIA A100-SXM4-80GB", 1.2),
        ("NVIDIA A10G", 0.45),
        ("NVIDIA H100 80GB HBM3", 2.0),
        ("NVIDIA GeForce RTX 3060", 0.3),
        ("RTX3080", 0.55),
        ("NVIDIA GeForce RTX 3080 Ti", 0.55),
        # Other model numbers that hold a key: each used to get that key's speed.
        ("NVIDIA RTX A1000", SC.unknown_gpu_speed),  # not an A100 (1.2)
        ("NVIDIA L40S", SC.unknown_gpu_speed),  # not an L4 (0.35)
        ("NVIDIA L40", SC.unknown_gpu_speed),
        ("NVIDIA A40", SC.unknown_gpu_speed),
        ("NVIDIA GeForce GTX 1080 Ti", SC.unknown_gpu_speed),
    ],
)
def test_nvml_names_map_to_the_table_by_their_model_number(nvml_name: str, speed: float) -> None:
    assert gpu_speed(nvml_name, SC.gpu_speeds, SC.unknown_gpu_speed) == speed


def test_an_unknown_model_gets_the_neutral_speed_and_a_node_is_as_fast_as_its_slowest_gpu() -> None:
    assert gpu_speed("Voodoo 5 5500", SC.gpu_speeds, 0.7) == 0.7
    assert node_speed(["RTX 4090", "Tesla T4"], SC.gpu_speeds, 1.0) == 0.2
    assert node_speed([], SC.gpu_speeds, 0.9) == 0.9


MODELS = ("RTX 4090", "Tesla T4", "A100", "Voodoo 5 5500", "RTX 3060")


@given(st.lists(st.lists(st.sampled_from(MODELS), max_size=4), max_size=12))
def test_the_fleet_wide_speeds_equal_each_nodes_own(fleet: list[list[str]]) -> None:
    """`build_index` reads speeds for the whole fleet at once, nodes without GPUs included."""
    flat = [model for models in fleet for model in models]
    counts = np.array([len(models) for models in fleet], dtype=np.int64)
    expected = [node_speed(models, SC.gpu_speeds, 0.7) for models in fleet]
    assert slowest_per_node(flat, counts, SC.gpu_speeds, 0.7).tolist() == expected


def node(name: str, model: str) -> NodeSnapshot:
    return NodeSnapshot(
        name=name,
        owner=f"owner-{name}",
        region="eu",
        ready=True,
        cordoned=False,
        gpus=(Gpu(model, 24576),),
        free_gpus=1,
        cpus_free=8.0,
        rtt_ms=20.0,
        rtt_updated_at=NOW,
        reputation=ReputationEvidence(last_updated=NOW),
    )


def test_a_long_job_goes_to_the_fast_gpu_even_when_the_slow_one_comes_first_by_name() -> None:
    nodes = [node("a-slow", "Tesla T4"), node("b-fast", "NVIDIA GeForce RTX 4090")]
    job = JobRequest(key="ns/long", expected_duration_s=4 * 3600.0)
    (placement,) = schedule([job], nodes, NOW).placements
    assert placement.nodes == ("b-fast",)


def test_without_the_runtime_term_and_with_equal_models_the_first_node_by_name_wins() -> None:
    """The speed term is what moves the job: equal speeds fall back to the name tie-break."""
    nodes = [node("a-slow", "Tesla T4"), node("b-fast", "Tesla T4")]
    job = JobRequest(key="ns/long", expected_duration_s=4 * 3600.0)
    assert schedule([job], nodes, NOW).placements[0].nodes == ("a-slow",)
    neutral = replace(DEFAULT_CONFIG, scoring=replace(SC, runtime_weight=0.0, reliability_weight=0.0))
    mixed = [node("a-slow", "Tesla T4"), node("b-fast", "NVIDIA GeForce RTX 4090")]
    assert schedule([job], mixed, NOW, neutral).placements[0].nodes == ("a-slow",)
