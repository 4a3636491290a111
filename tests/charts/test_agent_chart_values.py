"""Chart values that rendered into something the agent or Kubernetes refuses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import ray._common.utils as ray_common_utils
import ray._private.services as ray_services
import ray._private.utils as ray_utils
from koinon_agent import cli

from .helpers import CHART, Manifest, Tools, agent_container, env_map, helm_template, one, parse_documents

pytestmark = pytest.mark.timeout(60)


def test_num_cpus_from_a_values_file_reaches_the_agent_as_an_integer(tools: Tools, tmp_path: Path) -> None:
    """Values files give helm float64 numbers; `quote` prints 1000000 as "1e+06", which the agent
    refuses (int("1e+06")) and exits 2 in a crash loop. objectStoreMemory uses int64; numCpus,
    gpus.simulate and proxyPort do not."""
    values = tmp_path / "values.yaml"
    values.write_text("agent:\n  numCpus: 1000000\n")
    result = helm_template(tools, extra=["-f", str(values)])
    assert result.returncode == 0, result.stderr
    env = env_map(agent_container(one(parse_documents(result.stdout), "Deployment")))
    assert env["KOINON_NUM_CPUS"]["value"] == "1000000"
    cli.build_parser().parse_args(["join", "--num-cpus", env["KOINON_NUM_CPUS"]["value"]])


@pytest.mark.parametrize("mount_path", ["/tmp", "/tmp/ray", "/dev/shm", "/etc/koinon/gateway-ca/x", "/etc/koinon"])
def test_a_state_mount_path_that_collides_with_tmp_is_refused_by_the_chart(tools: Tools, mount_path: str) -> None:
    """/tmp: two volumeMounts at one path (the API server refuses the pod, the Deployment shows
    nothing wrong); /tmp/ray: the agent exits 2 about KOINON_TEMP_DIR, a variable the volunteer never set."""
    result = helm_template(tools, {"persistence.mountPath": mount_path})
    assert result.returncode != 0
    assert "persistence.mountPath" in result.stderr


def test_a_state_mount_path_of_its_own_is_taken(tools: Tools) -> None:
    result = helm_template(tools, {"persistence.mountPath": "/var/lib/koinon"})
    assert result.returncode == 0, result.stderr


_QUANTITY_UNITS = {
    **{"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12},
    **{"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40},
}


def _bytes(quantity: str | int) -> int:
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity))
    assert match is not None, quantity
    return int(float(match[1]) * _QUANTITY_UNITS[match[2]])


def _ray_plasma_directory(
    monkeypatch: pytest.MonkeyPatch, *, limit: int, used: int, shm: int, store: int | None, temp_dir: Path
) -> str:
    """Where `ray start` puts its object store in the agent's container, by Ray's own code: the
    container's cgroup memory limit and use, and the free space of its /dev/shm (the chart's tmpfs
    of sizeLimit shmSize). store None: Ray's default size (no --object-store-memory)."""
    for module in (ray_common_utils, ray_utils):  # ray_utils imported it by name
        monkeypatch.setattr(module, "get_system_memory", lambda *a, **k: limit)
    monkeypatch.setattr(ray_utils, "get_used_memory", lambda: used)
    monkeypatch.setattr(ray_utils, "get_shared_memory_bytes", lambda: shm)
    if store is None:
        available: int = ray_utils.estimate_available_memory()  # type: ignore[no-untyped-call]
        store = ray_utils.resolve_object_store_memory(available)
    plasma_dir, _, _ = ray_services.determine_plasma_store_config(store, temp_dir=str(temp_dir))
    return str(plasma_dir)


def _pod(tools: Tools, values: dict[str, str | None] | None = None) -> Manifest:
    result = helm_template(tools, values)
    assert result.returncode == 0, result.stderr
    pod: Manifest = one(parse_documents(result.stdout), "Deployment")["spec"]["template"]["spec"]
    return pod


# Forms Kubernetes accepts for a memory limit (its docs list 129e6 and 128974848000m beside 129M),
# plus a sign, an upper-case exponent, a trailing point and more than int64 bytes (16Ei): the
# chart reads the limit for the object store's size, and refused these, which rendered before.
@pytest.mark.parametrize("limit", ["8e9", "1290e7", "8589934592000m", "8E9", "+8Gi", "8.Gi", "8000000000.", "16Ei"])
def test_every_memory_limit_kubernetes_accepts_renders(tools: Tools, limit: str) -> None:
    result = helm_template(tools, {"resources.limits.memory": limit})
    assert result.returncode == 0, result.stderr
    env = env_map(agent_container(one(parse_documents(result.stdout), "Deployment")))
    # 80 % of the 2Gi /dev/shm: each limit's 30 % is more.
    assert int(env["KOINON_OBJECT_STORE_MEMORY"]["value"]) == int(0.8 * 2 * 2**30)


def test_a_memory_limit_written_as_a_number_above_int64_is_read_too(tools: Tools, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("resources:\n  limits:\n    memory: 1e19\n")  # a number, not text, in YAML
    result = helm_template(tools, {}, extra=["-f", str(values)])
    assert result.returncode == 0, result.stderr
    env = env_map(agent_container(one(parse_documents(result.stdout), "Deployment")))
    assert int(env["KOINON_OBJECT_STORE_MEMORY"]["value"]) == int(0.8 * 2 * 2**30)


@pytest.mark.parametrize(
    "values",
    [
        {},  # the defaults: 8Gi limit, 2Gi /dev/shm
        {"shmSize": "1.5Gi", "resources.limits.memory": "64Gi"},
        {"shmSize": "3G", "resources.limits.memory": "6000M"},
        {"resources.limits.memory": "2Gi"},  # /dev/shm as large as the memory: Ray's 30 % of it
        {"shmSize": "100Mi"},
    ],
)
def test_the_default_object_store_fits_the_charts_dev_shm(
    tools: Tools, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, values: dict[str, str | None]
) -> None:
    """README: "Ray's object store uses /dev/shm". Left to Ray, the store is 30 % of the container's
    free memory (~2.2-2.5 GiB with the defaults), more than the chart's 2Gi /dev/shm, and Ray puts
    it on /tmp (disk) with a warning. The chart passes a size that fits, no more than Ray's 30 % of
    the memory limit (the store's pages count against it)."""
    pod = _pod(tools, values)
    container = pod["containers"][0]
    limit = _bytes(container["resources"]["limits"]["memory"])
    shm = _bytes(next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"])
    rendered = env_map(container).get("KOINON_OBJECT_STORE_MEMORY", {}).get("value")
    store = None if rendered is None else int(rendered)
    # Even if the agent and `ray start` already used 1 GiB of the container's memory:
    assert _ray_plasma_directory(monkeypatch, limit=limit, used=2**30, shm=shm, store=store, temp_dir=tmp_path) == (
        "/dev/shm"
    )
    assert store is not None and store <= 0.3 * limit
    cli.build_parser().parse_args(["join", "--object-store-memory", str(store)])  # the agent takes it


def test_without_a_dev_shm_volume_ray_sizes_its_object_store(tools: Tools) -> None:
    pod = _pod(tools, {"shmSize": "null"})
    assert "dshm" not in [v["name"] for v in pod["volumes"]]
    assert "KOINON_OBJECT_STORE_MEMORY" not in env_map(pod["containers"][0])


def test_a_dev_shm_too_small_for_rays_smallest_object_store_is_refused(tools: Tools) -> None:
    result = helm_template(tools, {"shmSize": "64Mi"})
    assert result.returncode != 0
    assert "shmSize: 64Mi" in result.stderr and "agent.objectStoreMemory" in result.stderr, result.stderr


def test_an_object_store_larger_than_dev_shm_is_refused_by_the_chart(
    tools: Tools, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Above 10 GB `ray start` raises ("The configured object store size ... exceeds /dev/shm size")
    at every try: the agent restarts the Ray node for ever and the volunteer never becomes Ready.
    Below, Ray silently puts the store on /tmp (disk)."""
    twelve_gib = 12 * 2**30
    with pytest.raises(ValueError, match="exceeds /dev/shm size"):
        _ray_plasma_directory(
            monkeypatch, limit=32 * 2**30, used=2**30, shm=2 * 2**30, store=twelve_gib, temp_dir=tmp_path
        )
    for store in (twelve_gib, 2 * 2**30 + 1):
        result = helm_template(tools, {"agent.objectStoreMemory": str(store), "resources.limits.memory": "32Gi"})
        assert result.returncode != 0, f"chart accepted agent.objectStoreMemory={store} > shmSize"
        assert f"agent.objectStoreMemory: {store}" in result.stderr and "shmSize: 2Gi" in result.stderr, result.stderr
    exactly = helm_template(tools, {"agent.objectStoreMemory": str(2 * 2**30)})
    assert exactly.returncode == 0, exactly.stderr


@pytest.mark.parametrize("key", ["shmSize", "persistence.size"])
def test_sizes_take_the_suffixes_of_kubernetes_quantities(tools: Tools, key: str) -> None:
    """ "102400K" is no Kubernetes quantity (the API server: "unable to parse quantity's suffix") but
    was taken; "102400k" is one but was refused."""
    extra: dict[str, str | None] = {"persistence.type": "pvc"} if key == "persistence.size" else {}
    for refused in ("102400K", "100Gb", "100gi", "Gi"):
        result = helm_template(tools, {key: refused, **extra})
        assert result.returncode != 0, f"schema accepted {key}={refused}, which Kubernetes refuses"
        assert "/" + key.replace(".", "/") in result.stderr, result.stderr
    for taken in ("102400k", "100Mi", "1.5Gi", "2G", "1Ti"):
        result = helm_template(tools, {key: taken, **extra})
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("section", ["node", "probes", "serviceAccount"])
def test_an_emptied_values_section_is_refused_naming_it(tools: Tools, tmp_path: Path, section: str) -> None:
    """values.yaml: "Every value is checked by values.schema.json ... refuse bad input with a message
    naming the value". A section whose keys are all commented out is YAML null, which failed deep
    in the template instead ("nil pointer evaluating interface {}.name")."""
    values = tmp_path / "values.yaml"
    values.write_text(f"{section}:\n  # name: alice\n")
    result = helm_template(tools, extra=["-f", str(values)])
    assert result.returncode != 0
    assert "nil pointer" not in result.stderr, result.stderr
    assert section in result.stderr, result.stderr


def test_services_in_the_namespace_cannot_set_the_agents_variables(tools: Tools) -> None:
    """With service links on (Kubernetes' default) a Service named `koinon-proxy` in the release's
    namespace makes the kubelet set KOINON_PROXY_PORT=tcp://<ip>:<port> in the agent container (the
    chart sets that variable only for agent.proxyPort != 0), and the agent exits 2 in a crash loop.
    The same links hand every Service address in the namespace to job code."""
    pod = _pod(tools)
    assert "KOINON_PROXY_PORT" not in env_map(pod["containers"][0])
    with pytest.raises(SystemExit) as exit_info:  # what the kubelet would set for koinon-proxy:3128
        cli.build_parser().parse_args(["join", "--proxy-port", "tcp://10.43.0.7:3128"])
    assert exit_info.value.code == 2
    assert pod["enableServiceLinks"] is False


# What the agent refuses as bad configuration (exit 2, koinon_gateway.limits): the schema must
# refuse it too, else `helm install` succeeds and the pod crash-loops.
_AGENT_LIMITS = [
    ("gpus.simulate", "64", "65"),
    ("gpus.simulatedMemoryMiB", str(1 << 24), str((1 << 24) + 1)),
    ("node.region", "r" * 128, "r" * 129),
]


@pytest.mark.parametrize(("key", "largest", "refused"), _AGENT_LIMITS)
def test_the_chart_refuses_what_the_agent_refuses(tools: Tools, key: str, largest: str, refused: str) -> None:
    result = helm_template(tools, {"gpus.simulate": "1", key: refused})
    assert result.returncode != 0, f"{key}={refused[:20]}... renders; the agent exits 2 on it"
    assert key.split(".")[-1] in result.stderr
    result = helm_template(tools, {"gpus.simulate": "1", key: largest})
    assert result.returncode == 0, result.stderr


def test_a_long_kubernetes_node_name_is_taken(tools: Tools) -> None:
    """The agent cuts a long name hint short for its join; any legal node name is taken."""
    name = ".".join(["n" * 63] * 4)[:253]
    result = helm_template(tools, {"node.name": name})
    assert result.returncode == 0, result.stderr


def test_the_schemas_limits_are_the_gateways() -> None:
    from koinon_gateway.limits import MAX_GPU_MEMORY_MIB, MAX_GPUS, MAX_TEXT

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    gpus = schema["gpus"]["properties"]
    assert gpus["simulate"]["maximum"] == MAX_GPUS
    assert gpus["count"]["maximum"] == MAX_GPUS  # the agent offers no more (the rest left out)
    assert gpus["simulatedMemoryMiB"]["maximum"] == MAX_GPU_MEMORY_MIB
    assert schema["node"]["properties"]["region"]["maxLength"] == MAX_TEXT
