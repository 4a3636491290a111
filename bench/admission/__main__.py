"""Apply N AIJobs at once to the local control plane and measure how fast the operator decides.

Measured (real emulator, real kopf operator process, real Ray head and volunteers):
- seconds_to_all_decided: from the start of ``kubectl apply`` until every AIJob is Scheduled (or
  further) or Pending as Unschedulable (a job still "Accepted", waiting for placement, is not
  decided: that is what a pass leaves when Ray could not be asked);
- first_status_p50_ms / p99: per job, from the watch event that shows its creation to the first
  watch event that carries a status phase written by the operator;
- operator_peak_rss_mb: peak resident memory of the operator process, sampled every 50 ms.

A run is a figure only if the fleet placed a job on each of its GPUs (volunteer_gpus, from the
control plane's config): with its volunteers not Ready, every job is Unschedulable at once, which
is "decided" fast and would be no measure of the operator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from koinon_dev.cluster import STATE_FILE, DevCluster, DevClusterConfig, kubectl
from koinon_gateway.kube_client import kube_client, load_kubeconfig

from bench.percentiles import percentile
from bench.provenance import provenance, utc_now

RESULTS = Path(__file__).resolve().parents[1] / "results" / "admission.json"
DEFAULT_JOBS = 500


def job_documents(count: int, namespace: str) -> str:
    docs = [
        {
            "apiVersion": "koinon.dev/v1alpha1",
            "kind": "AIJob",
            "metadata": {"name": f"bench-{i:04d}", "namespace": namespace},
            "spec": {"entrypoint": "python -c pass", "resources": {"gpus": 1, "cpus": 0.1}},
        }
        for i in range(count)
    ]
    return yaml.safe_dump_all(docs)


def decided(status: dict[str, Any]) -> bool:
    phase = status.get("phase")
    return phase not in (None, "Pending") or status.get("reason") == "Unschedulable"


async def watch_jobs(kubeconfig: Path, namespace: str, count: int, created: dict[str, float],
                     first_status: dict[str, float], all_decided: asyncio.Event) -> None:  # fmt: skip
    path = f"/apis/koinon.dev/v1alpha1/namespaces/{namespace}/aijobs"
    decided_names: set[str] = set()
    # The API wants the kubeconfig's certificate and token (the emulator of `koinon dev up` does).
    async with kube_client(load_kubeconfig(kubeconfig)) as client:
        async for event in client.watch(path, "", timeout_s=3600):
            obj = event.object
            name = obj.get("metadata", {}).get("name")
            if not name:
                continue
            now = time.perf_counter()
            created.setdefault(name, now)
            status = obj.get("status") or {}
            if status.get("phase") and name not in first_status:
                first_status[name] = now
            if decided(status):
                decided_names.add(name)
            if len(decided_names) >= count:
                all_decided.set()
                return


# Phases of a job that was placed on a volunteer (a Failed one may never have been: not counted).
PLACED_PHASES = ("Scheduled", "Running", "Succeeded")


def check_fleet_placed(phases: dict[str, int], count: int, gpus: int) -> None:
    """Raises unless the run placed a job on every GPU (each job asks for one). At least, not
    exactly: a job that already finished frees its GPU, which a later pass may give to another."""
    placed = sum(phases.get(phase, 0) for phase in PLACED_PHASES)
    if placed < min(count, gpus):
        raise RuntimeError(
            f"{placed} of {count} jobs placed on a fleet of {gpus} GPUs (phases at the end: {phases}); "
            "the volunteers were not all Ready: no figure"
        )


def sample_rss(pid: int, stop: threading.Event, peak: list[float]) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], process.memory_info().rss / 2**20)
        except psutil.Error:
            return
        time.sleep(0.05)


async def run(count: int, timeout: float) -> dict[str, Any]:
    # The control plane's state dir (~36 KiB a run: logs, lock; the results are written elsewhere,
    # by main) is removed once the control plane is stopped cleanly, a failed `up` too: it stops
    # what it started itself. Otherwise it is kept, with the logs of the failed run: the
    # `koinon --state-dir DIR dev down` that an unfinished `down` prints reads its state file.
    state_dir = Path(tempfile.mkdtemp(prefix="koinon-bench-admission-"))
    try:
        return await _measure(state_dir, count, timeout)
    finally:
        if stopped_cleanly(state_dir):
            shutil.rmtree(state_dir, ignore_errors=True)
        else:
            print(
                f"bench-admission: the local control plane was not stopped cleanly; its state and logs "
                f"are kept in {state_dir}",
                file=sys.stderr,
            )


def stopped_cleanly(state_dir: Path) -> bool:
    """Whether nothing the control plane in ``state_dir`` recorded can still run. DevCluster's
    teardown (its `down`, and a failed `up`'s own) deletes the state file last, once all it
    recorded is stopped: a second Ctrl-C or an error during it leaves the file, and a damaged one
    is moved aside as cluster.json.damaged-*, its processes not stopped."""
    return not (state_dir / STATE_FILE).exists() and not any(state_dir.glob(f"{STATE_FILE}.damaged-*"))


async def _measure(state_dir: Path, count: int, timeout: float) -> dict[str, Any]:
    config = DevClusterConfig(state_dir=state_dir, poll_interval_seconds=2.0)
    gpus = config.volunteers * config.gpus_per_volunteer
    cluster = DevCluster(config)
    info = cluster.up(progress=False)  # a failed `up` stops what it started itself
    try:
        namespace = "bench"
        namespace_doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        kubectl(info.kubeconfig, "apply", "-f", "-", input_text=yaml.safe_dump(namespace_doc))
        operator_pid = info.process_groups["operator"]
        await asyncio.sleep(3)  # the operator has started watching
        peak = [psutil.Process(operator_pid).memory_info().rss / 2**20]
        idle_rss = peak[0]
        stop = threading.Event()
        threading.Thread(target=sample_rss, args=(operator_pid, stop, peak), daemon=True).start()
        created: dict[str, float] = {}
        first_status: dict[str, float] = {}
        all_decided = asyncio.Event()
        watcher = asyncio.create_task(watch_jobs(info.kubeconfig, namespace, count, created, first_status, all_decided))
        await asyncio.sleep(0.2)
        started = time.perf_counter()
        documents = job_documents(count, namespace)
        await asyncio.to_thread(kubectl, info.kubeconfig, "apply", "-f", "-", input_text=documents, timeout=600)
        applied = time.perf_counter() - started
        await asyncio.wait_for(all_decided.wait(), timeout)
        elapsed = time.perf_counter() - started
        stop.set()
        watcher.cancel()
        latencies = sorted((first_status[n] - created[n]) * 1000 for n in first_status if n in created)
        listed = json.loads(kubectl(info.kubeconfig, "get", "aij", "-n", namespace, "-o", "json", timeout=120))
        phases: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for item in listed["items"]:
            status = item.get("status", {})
            phase = status.get("phase", "none")
            phases[phase] = phases.get(phase, 0) + 1
            reasons[str(status.get("reason"))] = reasons.get(str(status.get("reason")), 0) + 1
            unreachable = [c for c in status.get("conditions") or () if c.get("type") == "RayReachable"]
            if any(c.get("status") == "False" for c in unreachable):
                raise RuntimeError(f"{item['metadata']['name']}: Ray unreachable during the run; no figure")
        check_fleet_placed(phases, count, gpus)
        return {
            "jobs": count,
            "seconds_to_all_decided": round(elapsed, 2),
            "operator_peak_rss_mb": round(peak[0], 1),
            "operator_idle_rss_mb": round(idle_rss, 1),
            "first_status_p50_ms": round(statistics.median(latencies), 1),
            "first_status_p99_ms": round(percentile(latencies, 0.99), 1),
            "kubectl_apply_seconds": round(applied, 2),
            "phases_at_end": phases,
            "reasons_at_end": reasons,
            "volunteer_gpus": gpus,
            "note": "first-status latency runs from the watch event of the create to the first event with "
            "a phase; kubectl apply creates the jobs one by one, so early jobs are decided while later "
            "ones are still being created",
        }
    finally:
        cluster.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args()
    started = utc_now()
    result = asyncio.run(run(args.jobs, args.timeout))
    result["provenance"] = provenance(started)
    # Only the run the README cites (500 jobs) replaces the record; any other count is a trial.
    record = args.jobs == DEFAULT_JOBS
    out = args.out or (RESULTS if record else Path(tempfile.gettempdir()) / f"koinon-bench-admission-{args.jobs}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
