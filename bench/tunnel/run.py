"""Tunnel benchmark: writes bench/results/tunnel.json.

    .venv/bin/python -m bench.tunnel.run [--quick] [--skip-ray] [--skip-agents]

Figures (all measured in this run, ratios taken within the run):
* bulk throughput through the tunnel (TLS on, agent and gateway as separate processes) vs direct
  loopback TCP vs `ssh -L`;
* added round trip of a 1 KiB request/response through the tunnel vs direct (p50, p99);
* 1,000 small Ray tasks and a 256 MiB object head -> volunteer -> head, volunteer joined through the
  tunnel (in its own network namespace) vs joined directly;
* one gateway process holding 1,000 agents' control streams (TLS): RSS and CPU with a heartbeat
  every 5 s (the issue's setting, the figures of record), then with the deployed gateway's (every
  2 s, GatewayConfig's defaults), each in its own 30 s window.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from koinon_gateway.config import GatewayConfig  # noqa: E402

from bench.percentiles import percentile  # noqa: E402
from bench.provenance import provenance, utc_now  # noqa: E402
from bench.tunnel import ceiling, netbench, plain_relay  # noqa: E402
from bench.tunnel.sshd import SAME_CIPHER_AS_TUNNEL, default_cipher, ssh_forward  # noqa: E402
from tests.tunnel.ray_harness import RayTunnelHarness, kill_tree, netns_available, wait_until  # noqa: E402

PY = sys.executable


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def tunnel(workdir: Path, head_port: int, other_ports: tuple[int, ...] = ()) -> Any:
    """Gateway (TLS, TCP) and one agent without Ray, as separate processes; yields the agent's proxy.

    The tunnel lets the volunteer reach head_port (as the GCS port) and other_ports on 127.0.0.1.
    """
    token = f"{secrets.token_hex(3)}.{secrets.token_hex(8)}"
    workdir = Path(tempfile.mkdtemp(prefix="tunnel-", dir=workdir))
    ready = workdir / "gw.ready"
    gateway = subprocess.Popen(
        [
            PY,
            "-m",
            "koinon_gateway.main",
            "--listen=127.0.0.1:0",
            "--head-proxy-listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            "--head-address=127.0.0.1",
            f"--head-gcs-port={head_port}",
            f"--head-ports={','.join(map(str, other_ports))}",
            f"--state-dir={workdir}/gw",
            f"--bootstrap-token={token}",
            f"--ready-file={ready}",
            "--vip-cidr=127.0.30.0/28",
            "--port-base=31000",
            "--port-block-size=16",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "gw.log", "wb"),  # noqa: SIM115 - the child owns it
        start_new_session=True,
    )
    agent = None
    try:
        wait_until(lambda: ready.exists() and len(ready.read_text().splitlines()) == 4, 30, "gateway")
        target, _, ca_path, _ = ready.read_text().splitlines()
        proxy = netbench.Proxy(_free_port(), secrets.token_hex(16))
        agent = subprocess.Popen(
            [
                PY,
                "-m",
                "koinon_agent.cli",
                "join",
                f"--gateway={target}",
                f"--token={token}",
                f"--ca-file={ca_path}",
                f"--state-dir={workdir}/agent",
                "--no-ray",
                f"--proxy-port={proxy.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(workdir / "agent.log", "wb"),  # noqa: SIM115
            start_new_session=True,
            # The bench dials through the agent's proxy itself: it picks the secret (never a flag).
            env={**os.environ, "KOINON_PROXY_SECRET": proxy.secret},
        )

        def dial_ok() -> bool:
            try:
                netbench.open_via("127.0.0.1", head_port, proxy).close()
                return True
            except (OSError, RuntimeError):
                return False

        wait_until(dial_ok, 30, "agent tunnel")
        yield proxy, gateway.pid, agent.pid
    finally:
        for process in (agent, gateway):
            if process is not None:
                kill_tree(process.pid)
                process.wait()


def progress(message: str) -> None:
    print(f"[bench-tunnel] {message}", file=sys.stderr, flush=True)


def bench_network(workdir: Path, quick: bool) -> dict[str, Any]:
    sink, sink_port = netbench.start_sink()
    echo, echo_port = netbench.start_echo()
    volume = (256 if quick else 1024) << 20
    rounds = 3
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        proxy, _, _ = stack.enter_context(tunnel(workdir, sink_port, (echo_port,)))
        # `ssh -L` as it comes (the issue's baseline), and with the tunnel's own cipher.
        ssh_ports: dict[str, int] = {}
        try:
            results["ssh_cipher"] = default_cipher()
            ssh_ports["ssh_mbps"] = stack.enter_context(ssh_forward(workdir / "ssh", sink_port))
            ssh_ports["ssh_same_cipher_mbps"] = stack.enter_context(
                ssh_forward(workdir / "ssh-aes", sink_port, SAME_CIPHER_AS_TUNNEL)
            )
            results["ssh_same_cipher"] = SAME_CIPHER_AS_TUNNEL
        except (OSError, RuntimeError, subprocess.CalledProcessError, StopIteration) as exc:
            ssh_ports.clear()
            results["ssh_error"] = str(exc)
        relay_port = stack.enter_context(plain_relay.relay_pair(echo_port))
        # Rounds take turns (direct, tunnel, ssh, direct, ...) so that every path sees the machine's
        # fast and slow moments alike; the best of each is kept, against noisy neighbours.
        paths = {"direct_mbps": (sink_port, None), "tunnel_mbps": (sink_port, proxy)}
        paths.update({key: (port, None) for key, port in ssh_ports.items()})
        runs: dict[str, list[float]] = {key: [] for key in paths}
        for _ in range(rounds):
            for key, (port, via) in paths.items():
                runs[key].append(netbench.throughput_mbps(netbench.open_via("127.0.0.1", port, via), volume))
        results.update({key: round(max(measured), 1) for key, measured in runs.items()})
        results.setdefault("ssh_mbps", None)
        results.setdefault("ssh_same_cipher_mbps", None)
        progress(
            f"direct {results['direct_mbps']} tunnel {results['tunnel_mbps']} ssh -L {results['ssh_mbps']} "
            f"(same cipher: {results['ssh_same_cipher_mbps']}) Mbit/s"
        )
        # The least CPU any tunnel needs per byte, from the same machine at the same time (ceiling.py).
        hop_ns = min(ceiling.hop_cpu_ns_per_byte(sink_port, volume) for _ in range(rounds))
        aes_ns = min(ceiling.aes_gcm_ns_per_byte(volume // 4) for _ in range(rounds))
        results.update(ceiling.tunnel_ceiling(results["direct_mbps"], hop_ns, aes_ns, os.cpu_count() or 1))
        share = results["tunnel_ceiling_vs_direct"]
        progress(f"ceiling {results['tunnel_ceiling_mbps']:.0f} Mbit/s, {share:.2f} of direct")
        samples = netbench.interleaved_rtts_us(
            {
                "direct": netbench.open_via("127.0.0.1", echo_port, None),
                "tunnel": netbench.open_via("127.0.0.1", echo_port, proxy),
                "relays": netbench.open_via("127.0.0.1", relay_port, None),
            },
            500 if quick else 3000,
        )
    sink.close()
    echo.close()
    for ssh, ratio in (("ssh_mbps", "tunnel_vs_ssh"), ("ssh_same_cipher_mbps", "tunnel_vs_ssh_same_cipher")):
        results[ratio] = round(results["tunnel_mbps"] / results[ssh], 3) if results[ssh] else None
    results["tunnel_vs_direct"] = round(results["tunnel_mbps"] / results["direct_mbps"], 3)
    results["tunnel_vs_ceiling"] = round(results["tunnel_mbps"] / results["tunnel_ceiling_mbps"], 3)

    def added(path: str, q: float) -> float:
        return round(percentile(samples[path], q) - percentile(samples["direct"], q), 1)

    results["direct_rtt_p50_us"] = round(percentile(samples["direct"], 0.5), 1)
    results["tunnel_rtt_p50_us"] = round(percentile(samples["tunnel"], 0.5), 1)
    results["added_rtt_p50_us"] = added("tunnel", 0.5)
    results["added_rtt_p99_us"] = added("tunnel", 0.99)
    # Two do-nothing relays (plain_relay.py) at the same moments: the part of the added round trip
    # that the machine charges any two-relay tunnel before framing, TLS or gRPC.
    results["plain_relays_added_rtt_p50_us"] = added("relays", 0.5)
    results["plain_relays_added_rtt_p99_us"] = added("relays", 0.99)
    relays = results["plain_relays_added_rtt_p50_us"]
    progress(f"added RTT p50 {results['added_rtt_p50_us']} us (plain relays {relays} us)")
    return results


# The driver runs on the head; `paths` (name -> node IP), `rounds` and `warmup_bounces` are set in
# front of this code.
RAY_WORKLOAD = """
import numpy as np
@ray.remote  # one CPU each, Ray's default: a fractional CPU would let Ray start a dozen new worker
def small(i): return i  # processes per 1,000 tasks, and time their start-up instead of the path
@ray.remote
def bounce(arr): return arr + 1
def on(ip): return {'resources': {f'node:{ip}': 0.01}}
def tasks_s(ip):
    t = time.perf_counter(); assert sum(ray.get([small.options(**on(ip)).remote(i) for i in range(1000)])) == 499500
    return time.perf_counter() - t
def object_s(ip, big):
    ref = ray.put(big)  # into the head's store before timing: the bounce is what crosses the path
    t = time.perf_counter(); out = ray.get(bounce.options(**on(ip)).remote(ref))
    elapsed = time.perf_counter() - t
    assert out.nbytes == big.nbytes and int(out[0]) == 1
    return elapsed
big = np.zeros(256 * 1024 * 1024, dtype='u1')
# Warm each path with the measured workload itself: a small object is inlined into the task and
# never touches the object manager, so only full-size bounces fault in the object stores' pages
# and grow the tunnel processes' heaps (first bounces ran 2-5x slower). Warm-up times are
# reported, not counted.
times = {f'{kind}_{path}': [] for kind in ('tasks', 'object', 'warmup_tasks', 'warmup_object') for path in paths}
for path, ip in paths.items():
    times[f'warmup_tasks_{path}'].append(tasks_s(ip))
    for _ in range(warmup_bounces):
        times[f'warmup_object_{path}'].append(object_s(ip, big))
for round_ in range(rounds):
    # Paths take turns, first one then the other, so each sees the machine's slow moments alike.
    for path, ip in (list(paths.items()) if round_ % 2 == 0 else list(paths.items())[::-1]):
        times[f'tasks_{path}'].append(tasks_s(ip))
        times[f'object_{path}'].append(object_s(ip, big))
print("RESULT " + json.dumps(times))
"""


def _result(stdout: str) -> dict[str, list[float]]:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"driver printed no result: {stdout[-2000:]}")
    parsed: dict[str, list[float]] = json.loads(lines[-1][len("RESULT ") :])
    return parsed


def ray_figures(times: dict[str, list[float]]) -> dict[str, Any]:
    """Medians of each path's times, and the median over rounds of tunnel/direct in the same round;
    warm-up times are reported beside them and counted in neither."""
    figures: dict[str, Any] = {}
    for kind in ("tasks", "object"):
        tunnel_s, direct_s = times[f"{kind}_tunnel"], times[f"{kind}_direct"]
        figures[f"ray_{kind}_tunnel_s"] = round(statistics.median(tunnel_s), 3)
        figures[f"ray_{kind}_direct_s"] = round(statistics.median(direct_s), 3)
        ratios = [t / d for t, d in zip(tunnel_s, direct_s, strict=True)]
        figures[f"ray_{kind}_ratio"] = round(statistics.median(ratios), 3)
        figures[f"ray_{kind}_ratios_by_round"] = [round(r, 3) for r in ratios]
        # Not counted in any figure above: shown so the first transfers' cost stays visible.
        figures[f"ray_{kind}_warmup_s"] = {
            path: [round(t, 3) for t in times.get(f"warmup_{kind}_{path}", [])] for path in ("tunnel", "direct")
        }
    return figures


def start_direct_worker(h: RayTunnelHarness, ip: str, store: int) -> subprocess.Popen[bytes]:
    """A Ray worker node joined straight to the head on another loopback address: no netns, no tunnel."""
    base = h.base + 60
    worker = subprocess.Popen(
        [
            str(Path(PY).parent / "ray"),
            "start",
            "--block",
            f"--address={h.head_ip}:{h.gcs_port}",
            f"--node-ip-address={ip}",
            f"--node-manager-port={base}",
            f"--object-manager-port={base + 1}",
            f"--dashboard-agent-grpc-port={base + 2}",
            f"--dashboard-agent-listen-port={base + 3}",
            f"--metrics-export-port={base + 4}",
            f"--runtime-env-agent-port={base + 5}",
            f"--min-worker-port={base + 10}",
            f"--max-worker-port={base + 40}",
            "--num-cpus=2",
            f"--object-store-memory={store}",
            f"--temp-dir={h.workdir}/direct",
            "--disable-usage-stats",
        ],
        env=h.ray_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_until(
        lambda: ip in h.run_driver("print([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']])"),
        120,
        "direct worker",
    )
    return worker


MIB = 2**20  # every "_mb" memory figure of the benchmarks is in MiB


def _rss_mb(processes: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: round(process.memory_info().rss / MIB, 1) for name, process in processes.items()}


def agent_process(started_pid: int) -> psutil.Process:
    """The agent itself: a volunteer in a namespace is started as `ip netns exec` -> sandbox -> its
    init -> the agent, and only the last one holds the data path's memory."""
    root = psutil.Process(started_pid)

    def names_agent(process: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            return "koinon_agent.cli" in process.cmdline()
        return False

    # The wrappers' command lines hold the agent's too: the agent is the innermost one.
    for process in [root, *root.children(recursive=True)]:
        if names_agent(process) and not any(names_agent(child) for child in process.children(recursive=True)):
            return process
    raise RuntimeError(f"no koinon_agent.cli process under pid {started_pid}")


def wait_for_quiet_cpu(below_pct: float = 30.0, within_s: float = 60.0) -> None:
    """Waits (at most within_s) for the nodes' start-up work (dashboard and runtime-env agents) to end."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and psutil.cpu_percent(interval=1.0) >= below_pct:
        pass


JOIN_ROUNDS = 3
# Full-size object bounces per path before timing (see RAY_WORKLOAD): bounce times settled after
# about four on both paths (and stayed so over 150 bounces through the tunnel).
WARMUP_BOUNCES = 4
RAY_ROUNDS = 5


def time_join(h: RayTunnelHarness, name: str, store: int, leave: bool) -> tuple[float, dict[str, Any]]:
    """Seconds from starting an agent (in its own namespace) to its VolunteerNode being Ready with a
    Ray node id the gateway found alive in GCS."""
    started = time.monotonic()
    volunteer = h.start_volunteer(name, num_cpus=2, object_store_memory=store)
    node = h.wait_ready(volunteer, 120)
    seconds = time.monotonic() - started
    progress(f"{name} joined and Ready in {seconds:.2f} s")
    if leave:
        volunteer.process.send_signal(signal.SIGTERM)
        volunteer.process.wait(60)
        wait_for_quiet_cpu()
    return seconds, node


def bench_ray(rounds: int) -> dict[str, Any]:
    """One cluster holding both nodes: a volunteer joined through the tunnel (own network namespace)
    and a worker joined directly. The same driver times both in turns, so their ratio is taken at
    the same moments of this machine's swings rather than minutes apart."""
    results: dict[str, Any] = {}
    store = 1400 * 1024 * 1024
    h = RayTunnelHarness(heartbeat_interval=2.0, heartbeat_timeout=8.0)
    direct_ip = f"127.0.{h.head_ip.split('.')[2]}.{(int(h.head_ip.split('.')[3]) % 250) + 2}"
    tunnel_env = h.ray_env

    def env_reaching_direct_worker() -> dict[str, str]:
        # The head (and the direct worker itself) reach the direct worker without the head proxy.
        env = tunnel_env()
        env["no_grpc_proxy"] += f",{direct_ip}"
        return env

    h.ray_env = env_reaching_direct_worker  # type: ignore[method-assign]
    worker = None
    try:
        h.start_gateway()
        h.start_head(object_store_memory=store)
        wait_for_quiet_cpu()  # the head's own start-up work would slow the first join only
        # Volunteers that join, are timed and leave again (SIGTERM: drain), then the one that stays.
        join_s = [time_join(h, f"join{n}", store, leave=True)[0] for n in range(JOIN_ROUNDS - 1)]
        last_s, node = time_join(h, "bench", store, leave=False)
        join_s.append(last_s)
        results["join_to_ready_s"] = round(statistics.median(join_s), 2)
        results["join_to_ready_runs_s"] = [round(s, 2) for s in join_s]
        worker = start_direct_worker(h, direct_ip, store)
        wait_for_quiet_cpu()
        paths = {"tunnel": node["status"]["address"], "direct": direct_ip}
        code = f"paths = {json.dumps(paths)}\nrounds = {rounds}\nwarmup_bounces = {WARMUP_BOUNCES}\n" + RAY_WORKLOAD
        assert h.gateway_process is not None
        tunnel_processes = {
            "gateway": psutil.Process(h.gateway_process.pid),
            "agent": agent_process(h.volunteers[-1].process.pid),
        }
        results["tunnel_rss_mb_before_ray"] = _rss_mb(tunnel_processes)
        results.update(ray_figures(_result(h.run_driver(code, 600 + 300 * rounds))))
        # Memory the data path keeps after carrying every bounce's objects (SREs size pods by it).
        results["tunnel_rss_mb_after_ray"] = _rss_mb(tunnel_processes)
    finally:
        if worker is not None:
            kill_tree(worker.pid)
        h.stop()
    return results


# The issue's setting for the 1,000-agent figures of record ("heartbeat every 5 s").
ISSUE_HEARTBEAT_S = (5.0, 15.0)
# What the gateway runs with unless told otherwise (manifests/gateway/deployment.yaml passes the
# same): agents heartbeat ~2.5x as often, and a platform team sizes the gateway by this one.
DEPLOYED_HEARTBEAT_S = (GatewayConfig.heartbeat_interval_s, GatewayConfig.heartbeat_timeout_s)


def bench_agents(workdir: Path, count: int, window_s: float) -> dict[str, Any]:
    """One gateway holding ``count`` agents, measured twice in turn, a fresh gateway and load each
    time: with the issue's 5 s heartbeat (the figures of record) and with the deployed one."""
    record = _gateway_with_agents(workdir / "issue", count, window_s, *ISSUE_HEARTBEAT_S)
    deployed = _gateway_with_agents(workdir / "deployed", count, window_s, *DEPLOYED_HEARTBEAT_S)
    return {
        "agents_connected": record["connected"],
        "gateway_rss_mb_1000_agents": record["rss_mb"],
        "gateway_cpu_pct_1000_agents": record["cpu_pct"],
        "agents_heartbeat_interval_s": ISSUE_HEARTBEAT_S[0],
        "agents_heartbeat_timeout_s": ISSUE_HEARTBEAT_S[1],
        "agents_connected_deployed_heartbeat": deployed["connected"],
        "gateway_rss_mb_1000_agents_deployed_heartbeat": deployed["rss_mb"],
        "gateway_cpu_pct_1000_agents_deployed_heartbeat": deployed["cpu_pct"],
        "agents_deployed_heartbeat_interval_s": DEPLOYED_HEARTBEAT_S[0],
        "agents_deployed_heartbeat_timeout_s": DEPLOYED_HEARTBEAT_S[1],
        "agents_window_s": window_s,
    }


def _gateway_with_agents(
    workdir: Path, count: int, window_s: float, heartbeat_interval_s: float, heartbeat_timeout_s: float
) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    token = f"{secrets.token_hex(3)}.{secrets.token_hex(8)}"
    ready = workdir / "many.ready"
    gateway = subprocess.Popen(
        [
            PY,
            "-m",
            "koinon_gateway.main",
            "--listen=127.0.0.1:0",
            "--head-proxy-listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            "--head-address=127.0.0.1",
            "--head-gcs-port=1",
            # No Ray head here: the Ray node id each agent reports is taken as confirmed at its
            # first heartbeat, as GCS confirms a real one once; later heartbeats then cost what
            # they cost the deployed gateway (no GCS lookup). The deployed gateway also holds
            # Ray's GCS client (~30 MiB), which this one never loads.
            "--no-verify-ray-nodes",
            f"--state-dir={workdir}/many",
            f"--bootstrap-token={token}:{count}",
            f"--ready-file={ready}",
            "--vip-cidr=127.64.0.0/21",
            "--port-base=2000",
            "--port-block-size=10",
            f"--heartbeat-interval={heartbeat_interval_s:g}",
            f"--heartbeat-timeout={heartbeat_timeout_s:g}",
            "--store=memory",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "many-gw.log", "wb"),  # noqa: SIM115
        start_new_session=True,
    )
    load = None
    try:
        wait_until(lambda: ready.exists() and len(ready.read_text().splitlines()) == 4, 30, "gateway")
        target, _, ca_path, admin_url = ready.read_text().splitlines()
        load = subprocess.Popen(
            [PY, "-m", "bench.tunnel.many_agents", target, ca_path, token, str(count)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert load.stdout is not None
        # "connected N" once every control stream is registered.
        line = _read_line(load.stdout, AGENTS_CONNECT_TIMEOUT_S, "the load generator's agents to connect")
        progress(f"{line.split()[1]} agents connected (heartbeat every {heartbeat_interval_s:g} s)")
        proc = psutil.Process(gateway.pid)
        time.sleep(5)  # let the join burst settle
        connected_before = _sessions_connected(admin_url)
        cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        time.sleep(window_s)
        cpu1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
        rss = proc.memory_info().rss
        connected = _sessions_connected(admin_url)
        # The figures hold for `count` agents only if all of them were there the whole window.
        if load.poll() is not None or min(connected_before, connected) != count:
            raise RuntimeError(
                f"agents connected at the gateway: {connected_before} before the window, {connected} after "
                f"(wanted {count}; heartbeat every {heartbeat_interval_s:g} s); load generator "
                f"{'exited' if load.poll() is not None else 'running'}"
            )
        return {
            "connected": connected,
            "rss_mb": round(rss / MIB, 1),
            "cpu_pct": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
        }
    finally:
        for process in (load, gateway):
            if process is not None:
                kill_tree(process.pid)
                process.wait()


AGENTS_CONNECT_TIMEOUT_S = 300.0


def _read_line(stream: Any, timeout_s: float, what: str) -> str:
    ready, _, _ = select.select([stream], [], [], timeout_s)
    line = stream.readline() if ready else ""
    if not line:
        raise RuntimeError(f"timed out or ended waiting for {what}")
    return str(line)


def _sessions_connected(admin_url: str) -> int:
    """Agents whose Control stream the gateway holds now, from its own /metrics."""
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith("koinon_gateway_sessions_connected "):
            return int(line.split()[1])
    raise RuntimeError("the gateway's /metrics has no koinon_gateway_sessions_connected")


# The keys the issue asks bench/results/tunnel.json for, then the 1,000-agent figures with the
# deployed heartbeat (what the gateway is sized by): a run without them is no record either.
REQUIRED_KEYS = (
    "tunnel_mbps",
    "ssh_mbps",
    "direct_mbps",
    "tunnel_vs_ssh",
    "tunnel_vs_direct",
    "added_rtt_p50_us",
    "added_rtt_p99_us",
    "ray_tasks_ratio",
    "ray_object_ratio",
    "gateway_rss_mb_1000_agents",
    "gateway_cpu_pct_1000_agents",
    "gateway_rss_mb_1000_agents_deployed_heartbeat",
    "gateway_cpu_pct_1000_agents_deployed_heartbeat",
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-agents", action="store_true")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="default: bench/results/tunnel.json for a full run, else /tmp")
    args = parser.parse_args()
    started = utc_now()
    workdir = Path(tempfile.mkdtemp(prefix="kn-bench-", dir="/tmp"))
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    skipped = [
        name
        for name, skip in (
            ("quick", args.quick),
            ("ray", args.skip_ray),
            ("agents", args.skip_agents),
            # The figures are filed as the 1,000-agent ones whatever the count: another count is no record.
            (f"agents={args.agents}", not args.skip_agents and args.agents != 1000),
        )
        if skip
    ]
    try:
        results.update(bench_network(workdir, args.quick))
        print(json.dumps(results), flush=True)
        if args.skip_ray:
            pass
        elif not netns_available():
            results["ray_error"] = "network namespaces unavailable (needs root and `ip netns`): Ray not measured"
        else:
            results.update(bench_ray(rounds=1 if args.quick else RAY_ROUNDS))
            print(json.dumps(results), flush=True)
        if not args.skip_agents:
            results.update(bench_agents(workdir, args.agents, 20 if args.quick else 30))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # A key that is there without a figure (ssh -L could not be set up: ssh_mbps None) is missing too.
    missing = [key for key in REQUIRED_KEYS if results.get(key) is None]
    if skipped or missing:
        # Not a run of record: it never replaces bench/results/tunnel.json unless --out says so.
        results["partial"] = {"skipped": skipped, "missing": missing}
    results["provenance"] = provenance(started)
    out = args.out or (REPO / "bench" / "results" / "tunnel.json" if not results.get("partial") else None)
    if out is None:
        out = Path(tempfile.gettempdir()) / "koinon-bench-tunnel-partial.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"written to {out}", file=sys.stderr)
    return 1 if missing and not skipped else 0


if __name__ == "__main__":
    sys.exit(main())
