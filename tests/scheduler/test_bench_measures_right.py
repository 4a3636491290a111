"""The admission benchmark counts only decided jobs and keeps its record for the cited run; the
percentile helper picks the nearest rank exactly."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import pytest

# `bench` is a folder at the repository root, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from koinon_dev.cluster import STATE_FILE, DevClusterConfig, DevClusterInfo, down_command
from koinon_operator.ray_jobs import RayNodeInfo, RayUnavailableError

from bench.admission import __main__ as admission
from bench.percentiles import percentile
from tests.aijob.fake_ray import Clock, FakeRay, make_body, make_reconciler, step


class NoNodeList(FakeRay):
    async def nodes(self) -> list[RayNodeInfo]:
        raise RayUnavailableError("Ray dashboard unreachable: connection refused")


async def test_a_job_still_waiting_for_placement_is_not_decided() -> None:
    """A first pass that could not ask Ray leaves Pending/Accepted: the bench called that decided,
    so a run in which nothing was placed looked fast."""
    body = make_body({"entrypoint": "python -c pass", "resources": {"gpus": 1, "cpus": 0.1}})
    await step(make_reconciler(NoNodeList(), Clock()), body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "Accepted")
    assert not admission.decided(body["status"])
    assert admission.decided({"phase": "Pending", "reason": "Unschedulable", "message": "0/4 nodes"})
    assert admission.decided({"phase": "Scheduled"})


def test_an_admission_run_of_another_size_does_not_replace_the_record(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async def measured(count: int, timeout: float) -> dict[str, object]:
        return {"jobs": count}

    record = tmp_path / "admission.json"
    monkeypatch.setattr(admission, "RESULTS", record)
    monkeypatch.setattr(admission, "run", measured)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench.admission", "--jobs", "5"])
    admission.main()
    assert not record.exists() and (tmp_path / "koinon-bench-admission-5.json").exists()
    monkeypatch.setattr(sys, "argv", ["bench.admission"])
    admission.main()
    assert record.exists()


class FakeCluster:
    """Stands in for DevCluster: writes what `up` leaves in the state dir (logs, the lock, the state
    file recording what it started) and, as the real `down` (and a failed `up`'s own teardown),
    removes only the files it names, the state file last, not the directory."""

    fail_up = False
    downs = 0

    def __init__(self, config: DevClusterConfig) -> None:
        self.state_dir = config.state_dir
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs" / "operator.log").write_text("started\n")
        (self.state_dir / "dev.lock").write_text("1\n")

    def up(self, progress: bool = True) -> DevClusterInfo:
        (self.state_dir / STATE_FILE).write_text('{"process_groups": {}}')
        if FakeCluster.fail_up:
            (self.state_dir / STATE_FILE).unlink()  # its teardown completed
            raise RuntimeError("the Ray head did not start")
        (self.state_dir / "kubeconfig").write_text("{}")
        return DevClusterInfo(
            kubeconfig=self.state_dir / "kubeconfig", api_url="", ray_dashboard_url="", ray_address="",
            process_groups={"operator": os.getpid()}, log_dir=self.state_dir / "logs",
        )  # fmt: skip

    def down(self) -> list[str]:
        FakeCluster.downs += 1
        (self.state_dir / "kubeconfig").unlink(missing_ok=True)
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        return []


@pytest.mark.parametrize("fail_up", [True, False])
def test_an_admission_run_leaves_no_state_dir_behind_even_when_it_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fail_up: bool
) -> None:
    """Each run made a koinon-bench-admission-* state dir in /tmp (its components' logs, the lock:
    ~36 KiB) and left it there; a run that failed, in `up` or midway, too. Results are not in it."""

    def kubectl_fails(*args: object, **kwargs: object) -> str:
        raise RuntimeError("kubectl apply failed")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(admission, "DevCluster", FakeCluster)
    monkeypatch.setattr(admission, "kubectl", kubectl_fails)
    monkeypatch.setattr(FakeCluster, "fail_up", fail_up)
    monkeypatch.setattr(FakeCluster, "downs", 0)
    kept = tmp_path / "koinon-bench-admission-5.json"  # a trial's results, where main() writes them
    kept.write_text("{}")
    with pytest.raises(RuntimeError):
        asyncio.run(admission.run(5, timeout=1))
    assert FakeCluster.downs == (0 if fail_up else 1)  # a failed `up` stops what it started itself
    assert list(tmp_path.iterdir()) == [kept]


class PartlyStoppedCluster(FakeCluster):
    """As DevCluster when a second Ctrl-C lands during `down` (cluster.py _teardown): the state file,
    which records the process groups still running, is left in place, the user is told to finish
    with `koinon --state-dir DIR dev down`, and KeyboardInterrupt propagates."""

    def down(self) -> list[str]:
        print(f"koinon: the local control plane is only partly stopped; finish with: {down_command(self.state_dir)}")
        raise KeyboardInterrupt


class DamagedStateCluster(FakeCluster):
    """As DevCluster's `down` when the state file does not parse: moved aside, its processes (if
    any) not stopped, and `down` returns normally."""

    def down(self) -> list[str]:
        (self.state_dir / STATE_FILE).replace(self.state_dir / f"{STATE_FILE}.damaged-1")
        return []


@pytest.mark.parametrize("cluster", [PartlyStoppedCluster, DamagedStateCluster])
def test_a_control_plane_not_stopped_cleanly_keeps_its_state_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], cluster: type[FakeCluster]
) -> None:
    """The state dir was removed whatever happened: after a second Ctrl-C during `down` the printed
    `koinon --state-dir ... dev down` found no state file and what still ran was left running; the
    logs of the failed run went too. It is kept, and said where, unless the stop was clean."""

    def kubectl_fails(*args: object, **kwargs: object) -> str:
        raise RuntimeError("kubectl apply failed")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(admission, "DevCluster", cluster)
    monkeypatch.setattr(admission, "kubectl", kubectl_fails)
    monkeypatch.setattr(FakeCluster, "fail_up", False)
    with pytest.raises((KeyboardInterrupt, RuntimeError)):
        asyncio.run(admission.run(5, timeout=1))
    [state_dir] = tmp_path.glob("koinon-bench-admission-*")
    assert (state_dir / "logs" / "operator.log").exists()
    assert list(state_dir.glob(f"{STATE_FILE}*")), "what the finish command (or the user) needs to stop the rest"
    assert f"kept in {state_dir}" in capsys.readouterr().err


def test_nearest_rank_is_not_thrown_off_by_float_rounding() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert percentile(samples, 0.5) == 50.0 and percentile(samples, 0.99) == 99.0
    assert percentile(samples, 0.07) == 7.0  # 0.07 * 100 = 7.000000000000001
    assert percentile([float(i) for i in range(1, 51)], 0.14) == 7.0
    assert percentile(samples, 1.0) == 100.0 and percentile(samples, 0.001) == 1.0
