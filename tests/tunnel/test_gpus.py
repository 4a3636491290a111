"""GPU inventory: the real NVML binding on this GPU-less machine, and NVML's answers for GPUs.

No GPU or NVIDIA driver exists here or in CI, so the cases with GPUs use a stand-in ``pynvml``
module that answers as the binding does (names as bytes in old versions, str in new ones; memory in
bytes; NVMLError subclasses for a lost GPU).
"""

from __future__ import annotations

import ctypes.util
import logging
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from koinon_agent import gpus
from koinon_agent.ray_node import RaySettings, ray_environment, ray_start_command
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb


def test_no_driver_means_no_gpus_and_no_error() -> None:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this machine has the NVIDIA driver")
    import pynvml  # the real binding: nvmlInit fails with "NVML Shared Library Not Found"

    with pytest.raises(pynvml.NVMLError):
        pynvml.nvmlInit()
    assert gpus.detect() == []


class FakeNVMLError(Exception):
    pass


@dataclass
class Memory:
    total: int


@dataclass
class FakeGpu:
    """One card as NVML answers for it; ``mig`` lists its MIG instances when MIG mode is on."""

    name: object
    memory: int
    uuid: str
    mig: list[FakeGpu | None] | None = None  # None: no MIG; a None slot is an empty one
    memory_error: str = ""  # NVML refuses the memory query (a GPU in MIG mode, unprivileged)


NVML_DEVICE_MIG_ENABLE = 1


def fake_nvml(devices: list[FakeGpu | Exception], init_error: bool = False) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error:
            raise FakeNVMLError("Driver Not Loaded")

    def handle(index: int) -> FakeGpu:
        entry = devices[index]
        if isinstance(entry, Exception):
            raise entry
        return entry

    def memory(gpu: FakeGpu) -> Memory:
        if gpu.memory_error:
            raise FakeNVMLError(gpu.memory_error)
        return Memory(gpu.memory)

    def mig_mode(gpu: FakeGpu) -> list[int]:
        if gpu.mig is None:
            raise FakeNVMLError("Not Supported")
        return [NVML_DEVICE_MIG_ENABLE, NVML_DEVICE_MIG_ENABLE]

    def mig_handle(gpu: FakeGpu, slot: int) -> FakeGpu:
        instance = (gpu.mig or [])[slot]
        if instance is None:
            raise FakeNVMLError("Not Found")
        return instance

    module.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    module.NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda gpu: gpu.name  # type: ignore[attr-defined]
    module.nvmlDeviceGetUUID = lambda gpu: gpu.uuid  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    module.nvmlDeviceGetMigMode = mig_mode  # type: ignore[attr-defined]
    module.nvmlDeviceGetMaxMigDeviceCount = lambda gpu: len(gpu.mig or [])  # type: ignore[attr-defined]
    module.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    return module


RTX = FakeGpu(b"NVIDIA GeForce RTX 4090", 25_757_220_864, "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6")
A100 = FakeGpu("NVIDIA A100-SXM4-80GB", 85_899_345_920, "GPU-5d2a0c1e-0000-4a6b-9f00-000000000002")
L4 = FakeGpu("NVIDIA L4", 24_152_899_584, "GPU-11111111-2222-3333-4444-555555555555")


@pytest.fixture(autouse=True)
def no_visible_devices_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


def test_each_gpu_with_its_model_memory_in_mib_and_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml([RTX, A100])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpus.detect() == [
        gpus.GpuInfo("NVIDIA GeForce RTX 4090", 24564, RTX.uuid),
        gpus.GpuInfo("NVIDIA A100-SXM4-80GB", 81920, A100.uuid),
    ]
    assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]


def test_a_lost_gpu_is_skipped_and_the_others_offered(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    nvml = fake_nvml([FakeNVMLError("GPU is lost"), L4])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with caplog.at_level(logging.WARNING):
        assert gpus.detect() == [gpus.GpuInfo("NVIDIA L4", 23034, L4.uuid)]
    assert "skipping GPU 0: GPU is lost" in caplog.text
    assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]


def test_driver_not_loaded_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([L4], init_error=True))
    assert gpus.detect() == []


@pytest.mark.parametrize(
    ("visible", "offered"),
    [
        ("1", [A100]),
        ("1,0", [A100, RTX]),
        (A100.uuid, [A100]),
        ("GPU-8932f937", [RTX]),  # a unique prefix, as CUDA takes it
        ("8932f937", [RTX]),
        ("", []),
        ("0,7,1", [RTX]),  # CUDA ignores what follows an entry that names no device
        ("GPU-", []),  # a prefix of both: names no single device
    ],
)
def test_only_the_gpus_cuda_visible_devices_names_are_offered(
    monkeypatch: pytest.MonkeyPatch, visible: str, offered: list[FakeGpu]
) -> None:
    """NVML lists every GPU of the host; a volunteer who shares only some of them says so in
    CUDA_VISIBLE_DEVICES, and offering the others made `ray start` refuse to run at all."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([RTX, A100]))
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's indices are NVML's (two models here)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [gpu.device for gpu in gpus.detect()] == [gpu.uuid for gpu in offered]


# NVML lists GPUs in PCI bus order; CUDA numbers them fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID.
# On a box with a small card in the first slot (driving the display) and a big one in the second,
# CUDA's device 1 (what the volunteer's own programs use with CUDA_VISIBLE_DEVICES=1) is the small one.
SLOW_IN_SLOT_0 = FakeGpu(b"NVIDIA GeForce GTX 1050", 2_147_483_648, "GPU-aaaaaaaa-0000-0000-0000-000000000000")
FAST_IN_SLOT_1 = FakeGpu(b"NVIDIA GeForce RTX 4090", 25_757_220_864, "GPU-bbbbbbbb-0000-0000-0000-000000000000")


@pytest.mark.parametrize("visible", ["1", "0", "1,0", f"{SLOW_IN_SLOT_0.uuid},1"])
@pytest.mark.parametrize("order", [None, "FASTEST_FIRST", "pci_bus_id"])
def test_a_device_index_on_gpus_cuda_may_number_otherwise_is_refused(
    monkeypatch: pytest.MonkeyPatch, visible: str, order: str | None
) -> None:
    """CUDA_VISIBLE_DEVICES=1 without CUDA_DEVICE_ORDER=PCI_BUS_ID was taken as NVML index 1 (the
    RTX 4090), and Ray pinned to it by UUID: job code got the GPU the volunteer meant to keep
    (CUDA's device 1 here is the GTX 1050), and the wrong model and memory were reported. CUDA's
    speed order is not guessed: the agent refuses to start, saying how to name the GPU."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([SLOW_IN_SLOT_0, FAST_IN_SLOT_1]))
    if order is not None:  # read as fastest first: only PCI_BUS_ID as spelt is taken for PCI order
        monkeypatch.setenv("CUDA_DEVICE_ORDER", order)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES") as refused:
        gpus.detect()
    message = str(refused.value)
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in message and "UUID" in message and "nvidia-smi -L" in message


@pytest.mark.parametrize(
    ("visible", "offered"),
    [
        (SLOW_IN_SLOT_0.uuid, [SLOW_IN_SLOT_0]),
        ("GPU-bbbbbbbb", [FAST_IN_SLOT_1]),
        ("", []),
        ("-1", []),  # the usual way to hide every GPU
        ("GPU-ffffffff,1", []),  # CUDA reads nothing after an entry that names no device
    ],
)
def test_uuids_on_mixed_gpus_need_no_device_order(
    monkeypatch: pytest.MonkeyPatch, visible: str, offered: list[FakeGpu]
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([SLOW_IN_SLOT_0, FAST_IN_SLOT_1]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [gpu.device for gpu in gpus.detect()] == [gpu.uuid for gpu in offered]


def test_with_pci_bus_id_order_a_device_index_is_the_nvml_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([SLOW_IN_SLOT_0, FAST_IN_SLOT_1]))
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpus.detect() == [gpus.GpuInfo("NVIDIA GeForce RTX 4090", 24564, FAST_IN_SLOT_1.uuid)]


@pytest.mark.parametrize("order", [None, "FASTEST_FIRST"])
def test_on_identical_gpus_a_device_index_is_the_nvml_index(monkeypatch: pytest.MonkeyPatch, order: str | None) -> None:
    """Same model and memory: CUDA's speed order cannot tell them apart and keeps NVML's (PCI) order.
    A single GPU is index 0 in any order."""
    other = FakeGpu(L4.name, L4.memory, "GPU-22222222-2222-3333-4444-555555555555")
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([L4, other]))
    if order is not None:
        monkeypatch.setenv("CUDA_DEVICE_ORDER", order)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert [gpu.device for gpu in gpus.detect()] == [other.uuid, L4.uuid]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([RTX]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert [gpu.device for gpu in gpus.detect()] == [RTX.uuid]


def test_a_device_index_is_refused_when_a_gpu_nvml_cannot_describe_may_differ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lost GPU, or one in MIG mode (known only by its instances), may be another model: with
    them in the list the GPUs cannot be shown identical, so CUDA's order is unknown."""
    other = FakeGpu(L4.name, L4.memory, "GPU-22222222-2222-3333-4444-555555555555")
    mig = FakeGpu("NVIDIA A100-SXM4-80GB", 0, "GPU-mig-card", mig=[], memory_error="Insufficient Permissions")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    hosts: list[list[FakeGpu | Exception]] = [[L4, FakeNVMLError("GPU is lost"), other], [L4, mig]]
    for devices in hosts:
        monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices))
        with pytest.raises(ValueError, match="CUDA_DEVICE_ORDER"):
            gpus.detect()


def test_the_agent_exits_2_on_a_device_index_it_cannot_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused at start, as bad configuration: offering no GPUs instead would keep a volunteer who
    meant to lend one unaware, and offering one lends a GPU they may have meant to keep."""
    from koinon_agent import cli

    nvml = fake_nvml([SLOW_IN_SLOT_0, FAST_IN_SLOT_1])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert cli.main(["join", "--gateway", "gw:1", "--insecure", "--state-dir", str(tmp_path / "state")]) == 2
    assert "koinon-agent: CUDA_VISIBLE_DEVICES: entry '1'" in capsys.readouterr().err
    assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]


def test_a_gpu_in_mig_mode_offers_its_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML answers an unprivileged caller nothing about a MIG-mode card's memory: the card used
    to be skipped (0 GPUs offered), or, privileged, offered whole instead of its instances."""
    instances: list[FakeGpu | None] = [
        FakeGpu("NVIDIA A100-SXM4-80GB MIG 1g.10gb", 10_200_547_328, "MIG-aaaaaaaa-1111-2222-3333-444444444444"),
        None,
        FakeGpu("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 42_314_694_656, "MIG-bbbbbbbb-1111-2222-3333-444444444444"),
    ]
    card = FakeGpu("NVIDIA A100-SXM4-80GB", 0, "GPU-mig-card", mig=instances, memory_error="Insufficient Permissions")
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([card, L4]))
    assert gpus.detect() == [
        gpus.GpuInfo("NVIDIA A100-SXM4-80GB MIG 1g.10gb", 9728, "MIG-aaaaaaaa-1111-2222-3333-444444444444"),
        gpus.GpuInfo("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40354, "MIG-bbbbbbbb-1111-2222-3333-444444444444"),
        gpus.GpuInfo("NVIDIA L4", 23034, L4.uuid),
    ]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-bbbbbbbb")
    assert [gpu.device for gpu in gpus.detect()] == ["MIG-bbbbbbbb-1111-2222-3333-444444444444"]


def test_ray_is_given_exactly_the_detected_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """With GPU 0 lost, Ray numbered the one GPU it was given 0 and handed tasks the lost card."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([FakeNVMLError("GPU is lost"), L4]))
    found = gpus.detect()
    settings = RaySettings(
        "/opt/ray/bin/ray", Path("/tmp/ray"), "http://127.0.0.1:1", None, len(found), 23034, None,
        gpu_devices=tuple(g.device for g in found),
    )  # fmt: skip
    assert "--num-gpus=1" in ray_start_command(settings, pb.Assignment(address="127.0.20.1"))
    assert ray_environment(settings, pb.Assignment(address="127.0.20.1"))["CUDA_VISIBLE_DEVICES"] == L4.uuid


def test_simulated_gpus_start_ray_whatever_cuda_visible_devices_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CPU-only host hiding every device
    settings = RaySettings("/opt/ray/bin/ray", Path("/tmp/ray"), "http://127.0.0.1:1", None, 2, 16384, None)
    assert "CUDA_VISIBLE_DEVICES" not in ray_environment(settings, pb.Assignment(address="127.0.20.1"))


def test_a_gpu_name_that_is_not_utf8_keeps_the_gpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real binding decodes names with bytes.decode() (pynvml.convertStrBytes): a name NVML
    gives that is not UTF-8 raised UnicodeDecodeError, which detect() let through: Agent() failed
    and the CLI exited 2 ("bad configuration") with a codec message."""
    bad = FakeGpu("unused", 1 << 34, "GPU-bad")
    nvml = fake_nvml([bad, L4])

    def name(gpu: FakeGpu) -> object:
        if gpu is bad:
            return b"NVIDIA \xff\xfe".decode()  # what convertStrBytes does with such bytes
        return gpu.name

    nvml.nvmlDeviceGetName = name  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with caplog.at_level(logging.WARNING):
        assert gpus.detect() == [
            gpus.GpuInfo("NVIDIA \ufffd\ufffd", 16384, "GPU-bad"),
            gpus.GpuInfo("NVIDIA L4", 23034, L4.uuid),
        ]
    assert "not UTF-8" in caplog.text


def test_a_uuid_that_is_not_utf8_skips_that_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The UUID is what CUDA_VISIBLE_DEVICES names the GPU by: without it the GPU cannot be handed
    to Ray, so it is skipped like a lost one (not the whole agent stopped)."""
    bad = FakeGpu("NVIDIA L4", 1 << 34, "GPU-bad")
    nvml = fake_nvml([bad, L4])

    def uuid(gpu: FakeGpu) -> object:
        return b"GPU-\xff".decode() if gpu is bad else gpu.uuid

    nvml.nvmlDeviceGetUUID = uuid  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert [g.device for g in gpus.detect()] == [L4.uuid]


def test_a_gpu_the_gateway_would_refuse_is_left_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway takes 1..16 TiB per GPU (koinon_gateway.limits): one GPU reporting memory
    outside that failed the whole join (exit 3, as for a bad token). A name past the gateway's
    length is cut to it."""
    from koinon_gateway.limits import MAX_GPU_MEMORY_MIB, MAX_TEXT

    tiny = FakeGpu("tiny", 1 << 19, "GPU-tiny")  # half a MiB: 0 MiB
    huge = FakeGpu("huge", (MAX_GPU_MEMORY_MIB + 1) << 20, "GPU-huge")
    long = FakeGpu("N" * 300, 1 << 34, "GPU-long")
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([tiny, huge, L4, long]))
    with caplog.at_level(logging.WARNING):
        found = gpus.detect()
    assert found == [gpus.GpuInfo("NVIDIA L4", 23034, L4.uuid), gpus.GpuInfo("N" * MAX_TEXT, 16384, "GPU-long")]
    assert "leaving out GPU GPU-tiny" in caplog.text and "leaving out GPU GPU-huge" in caplog.text
    # Left out after CUDA_VISIBLE_DEVICES chose: GPUs named after it are still offered.
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert [g.device for g in gpus.detect()] == [L4.uuid]


def test_no_more_gpus_than_the_gateway_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    from koinon_gateway.limits import MAX_GPUS

    many: list[FakeGpu | Exception] = [FakeGpu("NVIDIA L4", 1 << 34, f"GPU-{i:04d}") for i in range(MAX_GPUS + 3)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(many))
    assert [g.device for g in gpus.detect()] == [f"GPU-{i:04d}" for i in range(MAX_GPUS)]
