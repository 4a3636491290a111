"""The local control plane: Kubernetes API emulator + koinon operator + Ray head + local volunteers.

``up`` starts every part as its own process group and records each in a state file as soon as it
exists (work dir first, then every process group and network namespace), so ``down`` (possibly from
another process, after ``up`` was killed half-way) stops exactly what was started, and nothing else.
A failed or interrupted ``up`` runs the same cleanup as ``down``. A lock on the state dir keeps two
``up``/``down`` from running on it at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from koinon_dev.binaries import ensure_binaries
from koinon_dev.processes import (
    ManagedProcess,
    boot_id,
    cleanup_signals,
    deferred_signals,
    free_ports,
    kill_processes_using,
    process_start_time,
    signals_as_exceptions,
    stop_process_group,
    stop_process_groups,
    wait_until,
)
from koinon_dev.ray_cluster import HeadCannotTakeJobsError, LocalRayHead
from koinon_dev.tunnel_plane import LocalAgent, LocalGateway, delete_netns, netns_available
from koinon_dev.volunteer_sandbox import processes_of_their_own, runs_without_privileges

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "manifests" / "crds"
NAMESPACE_MANIFEST = REPO_ROOT / "manifests" / "operator" / "namespace.yaml"
HEAD_ADDRESS = "127.0.10.1"
STATE_FILE = "cluster.json"
LOCK_FILE = "lock"
# Set in the environment of every process `up` starts (inherited by Ray's processes, workers and
# job code): how `down` finds what escaped the recorded process groups.
RUN_ENV = "KOINON_DEV_WORK_DIR"
WORK_DIR_NAME = re.compile(r"koinon-[0-9a-f]{8}")
STOP_GRACE_SECONDS = 8.0
# A volunteer agent drains on SIGTERM: its --drain-grace (5 s, tunnel_plane.py), then up to 10 s for
# Ray to stop; killed sooner, its Ray node is left to the sweep.
AGENT_STOP_GRACE_SECONDS = 5.0 + 15.0
AGENT_PREFIX = "agent-"  # LocalAgent's process names
# Starts of the Ray head, each on freshly chosen agent ports, before `up` gives up on a head whose
# dashboard agent cannot serve HTTP (its port taken after it was chosen: see _start_head).
HEAD_START_TRIES = 3


@dataclass(frozen=True)
class DevClusterConfig:
    state_dir: Path = field(default_factory=lambda: Path.cwd() / ".koinon" / "dev")
    volunteers: int = 2
    gpus_per_volunteer: int = 2
    gpu_memory_mib: int = 16384
    cpus_per_volunteer: int = 2
    poll_interval_seconds: float = 1.0
    start_operator: bool = True
    # Each volunteer in its own network namespace: None = where possible (root with `ip netns`),
    # False = plain local processes (Ray's traffic still goes through the tunnel, by proxy settings).
    network_namespaces: bool | None = None


class StateFileDamagedError(RuntimeError):
    """The state file is not what `up` writes (cut short, edited, from another version)."""


@dataclass
class DevClusterInfo:
    """What a user (or a test) needs to talk to a running local control plane."""

    kubeconfig: Path
    api_url: str
    ray_dashboard_url: str
    ray_address: str
    process_groups: dict[str, int]
    log_dir: Path
    ray_auth_token_file: Path | None = None
    work_dir: Path | None = None
    network_namespaces: list[str] = field(default_factory=list)
    # Each process group's leader's start time and the boot they belong to: a pid recorded here may
    # since have been given to an unrelated process, which `down` must not signal.
    start_times: dict[str, int] = field(default_factory=dict)
    boot_id: str | None = None
    complete: bool = True  # False while `up` is still starting things
    gateway_metrics_url: str = ""
    """The gateway's Prometheus /metrics (its admin port, on loopback)."""

    def ray_auth_token(self) -> str | None:
        if self.ray_auth_token_file is None or not self.ray_auth_token_file.exists():
            return None
        return self.ray_auth_token_file.read_text().strip()

    def ray_headers(self) -> dict[str, str]:
        token = self.ray_auth_token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def to_json(self) -> str:
        data = {
            "kubeconfig": str(self.kubeconfig),
            "api_url": self.api_url,
            "ray_dashboard_url": self.ray_dashboard_url,
            "ray_address": self.ray_address,
            "process_groups": self.process_groups,
            "log_dir": str(self.log_dir),
            "ray_auth_token_file": str(self.ray_auth_token_file) if self.ray_auth_token_file else None,
            "work_dir": str(self.work_dir) if self.work_dir else None,
            "network_namespaces": self.network_namespaces,
            "start_times": self.start_times,
            "boot_id": self.boot_id,
            "complete": self.complete,
            "gateway_metrics_url": self.gateway_metrics_url,
        }
        return json.dumps(data, indent=2)

    @classmethod
    def load(cls, path: Path) -> DevClusterInfo:
        try:
            return cls._from_json(path.read_text())
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise StateFileDamagedError(f"{path} is unreadable ({type(error).__name__}: {error})") from None

    @classmethod
    def _from_json(cls, text: str) -> DevClusterInfo:
        data = json.loads(text)
        return cls(
            kubeconfig=Path(data["kubeconfig"]),
            api_url=data["api_url"],
            ray_dashboard_url=data["ray_dashboard_url"],
            ray_address=data["ray_address"],
            process_groups={k: int(v) for k, v in data["process_groups"].items()},
            log_dir=Path(data["log_dir"]),
            ray_auth_token_file=Path(data["ray_auth_token_file"]) if data.get("ray_auth_token_file") else None,
            work_dir=Path(data["work_dir"]) if data.get("work_dir") else None,
            network_namespaces=list(data.get("network_namespaces") or []),
            start_times={k: int(v) for k, v in (data.get("start_times") or {}).items()},
            boot_id=data.get("boot_id"),
            complete=bool(data.get("complete", True)),
            gateway_metrics_url=str(data.get("gateway_metrics_url") or ""),
        )


def down_command(state_dir: Path) -> str:
    """The command that stops the control plane recorded in ``state_dir``, as the user types it."""
    if state_dir.resolve() == (Path.cwd() / ".koinon" / "dev").resolve():
        return "koinon dev down"
    return f"koinon --state-dir {shlex.quote(str(state_dir))} dev down"


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def kubectl(kubeconfig: Path, *args: str, input_text: str | None = None, timeout: float = 60) -> str:
    """Run the real kubectl against ``kubeconfig``; raise with its stderr on failure."""
    binaries = ensure_binaries()
    completed = subprocess.run(
        [str(binaries.kubectl), f"--kubeconfig={kubeconfig}", *args],
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {completed.stderr.strip()}")
    return completed.stdout


def operator_process(
    kubeconfig: Path,
    dashboard_url: str,
    log_dir: Path,
    poll_interval_seconds: float = 1.0,
    namespace: str | None = None,
    name: str = "operator",
    ray_auth_token_file: Path | None = None,
    extra_env: dict[str, str] | None = None,
    tmp_dir: Path | None = None,
) -> ManagedProcess:
    """The operator's process; ``tmp_dir`` (created, 0700) becomes its TMPDIR: the kubernetes
    client writes a kubeconfig's CA there, and what a killed operator leaves goes with that dir."""
    argv = [
        _bin("koinon-operator"),
        f"--kubeconfig={kubeconfig}",
        f"--ray-dashboard={dashboard_url}",
        f"--poll-interval={poll_interval_seconds}",
    ]
    if namespace:
        argv.append(f"--namespace={namespace}")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), **(extra_env or {})}
    if ray_auth_token_file is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(ray_auth_token_file)
    if tmp_dir is not None:
        tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp_dir)
    return ManagedProcess(name, argv, log_dir / f"{name}.log", env=env)


class DevCluster:
    def __init__(self, config: DevClusterConfig | None = None) -> None:
        self.config = config or DevClusterConfig()
        self.state_dir = self.config.state_dir.resolve()
        self.log_dir = self.state_dir / "logs"
        self._started: list[ManagedProcess] = []
        self.head: LocalRayHead | None = None
        self.gateway: LocalGateway | None = None
        self.agents: list[LocalAgent] = []
        self._use_netns = False
        self._own_processes = False
        self._agents_started = 0
        self._work_dir = Path("/tmp")
        self._state: DevClusterInfo | None = None  # what this process started, as recorded

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the state dir's lock: two `up` at once would both start, and one be orphaned."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # os.open's descriptors are not inherited: the children must not keep the lock held.
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                raise RuntimeError(
                    f"another `koinon dev up` or `koinon dev down` (pid {holder}) is using {self.state_dir}; "
                    "wait for it to finish, or interrupt it (it stops what it started)"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(fd)

    def up(self, progress: bool = True) -> DevClusterInfo:
        with self._exclusive(), signals_as_exceptions():
            if self.state_path.exists():
                raise RuntimeError(
                    f"a local control plane is already recorded in {self.state_path}; "
                    f"run `{down_command(self.state_dir)}` first"
                )
            self.log_dir.mkdir(parents=True, exist_ok=True)
            ensure_binaries()
            say: Callable[[str], None] = print if progress else (lambda _line: None)
            try:
                self._start_all(say)
            except BaseException:
                self._teardown()
                raise
            return self.info()

    def _save(self) -> None:
        """Write the state file whole (a crash mid-write must not leave half a record)."""
        assert self._state is not None
        partial = self.state_path.with_suffix(".tmp")
        partial.write_text(self._state.to_json())
        partial.replace(self.state_path)

    def _launch(self, process: ManagedProcess) -> None:
        """Start ``process`` and record it, with no signal let in between the two."""
        with deferred_signals():
            process.start()
            self._track(process)

    def _track(self, process: ManagedProcess) -> None:
        assert self._state is not None
        self._started.append(process)
        self._state.process_groups[process.name] = process.pid
        start_time = process_start_time(process.pid)
        if start_time is not None:
            self._state.start_times[process.name] = start_time
        self._save()

    def _env(self, **extra: str) -> dict[str, str]:
        return {RUN_ENV: str(self._work_dir), **extra}

    def _start_all(self, say: Callable[[str], None]) -> None:
        kubeconfig = self.state_dir / "kubeconfig"
        token_file = self.state_dir / "ray-auth-token"
        with deferred_signals():
            # A short, unique work dir: Ray's unix socket paths must stay under ~107 characters.
            work_dir = Path("/tmp") / f"koinon-{secrets.token_hex(4)}"
            work_dir.mkdir(mode=0o700)
            self._work_dir = work_dir
            self._state = DevClusterInfo(
                kubeconfig=kubeconfig, api_url="", ray_dashboard_url="", ray_address="", process_groups={},
                log_dir=self.log_dir, ray_auth_token_file=token_file, work_dir=work_dir,
                boot_id=boot_id(), complete=False,
            )  # fmt: skip
            self._save()
        # One left by an earlier run would make the wait for the emulator's kubeconfig below pass at once.
        kubeconfig.unlink(missing_ok=True)
        (api_port,) = free_ports(1)
        # HTTPS, and only clients with the kubeconfig's token (drawn by the emulator at each start,
        # 0600) are served: any local user reaches the port, and the API holds the gateway's CA key
        # and AIJobs, which run as the user who ran `up`.
        api_url = f"https://127.0.0.1:{api_port}"
        self._state.api_url = api_url
        emulator = ManagedProcess(
            "kube-emulator",
            [
                _bin("koinon-kube-emulator"),
                "--host=127.0.0.1",
                f"--port={api_port}",
                f"--kubeconfig={kubeconfig}",
            ],
            self.log_dir / "kube-emulator.log",
            env={**os.environ, **self._env()},
        )
        self._launch(emulator)
        say(f"- Kubernetes API emulator on {api_url}")

        def serving() -> bool:
            if not emulator.alive():
                raise RuntimeError(f"{emulator.name} exited:\n{emulator.log_tail()}")
            return kubeconfig.exists()  # written once it serves, with its certificate and token

        wait_until(serving, 30, what="the Kubernetes API emulator")
        kubectl(kubeconfig, "apply", "-f", str(CRD_DIR))
        say("- CRDs applied: aijobs.koinon.dev, volunteernodes.koinon.dev")

        # Ray token authentication is on: anyone who reaches Ray's ports could otherwise run code.
        token_file.touch(mode=0o600)
        token_file.write_text(secrets.token_urlsafe(32))
        head = LocalRayHead(
            address=HEAD_ADDRESS, temp_dir=work_dir / "head", log_dir=self.log_dir, auth_token=token_file.read_text()
        )
        kubectl(kubeconfig, "apply", "-f", str(NAMESPACE_MANIFEST))
        gateway = LocalGateway(head=head, work_dir=work_dir, log_dir=self.log_dir, kubeconfig=kubeconfig)
        # Set before it starts: a failure while it starts must still find its process to stop.
        self.head, self.gateway = head, gateway
        gateway.start()
        assert gateway.process is not None
        self._track(gateway.process)
        self._state.gateway_metrics_url = f"{gateway.admin_url}/metrics"
        say(
            f"- gateway for volunteers at {gateway.agent_target} (TLS, join tokens), "
            f"metrics at {self._state.gateway_metrics_url}"
        )
        # TMPDIR inside the work dir: the dashboard's multiprocessing helpers put their listener
        # sockets there, and `down` removes it with the rest (in the host's /tmp they stayed).
        head_tmp = work_dir / "tmp"
        head_tmp.mkdir(mode=0o700, exist_ok=True)
        head.extra_env = {**gateway.head_environment(), **self._env(), "TMPDIR": str(head_tmp)}
        self._start_head(head, say)
        # Only now: a restarted head has other ports than the first start's.
        self._state.ray_dashboard_url, self._state.ray_address = head.dashboard_url, head.gcs_address
        self._save()
        say(f"- Ray head (no CPUs for user work) at {head.gcs_address}, dashboard {head.dashboard_url}")
        self._use_netns = self._network_namespaces()
        self._own_processes = not self._use_netns and self._processes_of_their_own()
        for index in range(self.config.volunteers):
            self._start_agent(f"volunteer-{index + 1}", self.config.gpus_per_volunteer, f"owner-{index + 1}")
        try:
            wait_until(lambda: _alive_workers(head) >= len(self.agents), 90, what="volunteers to join Ray")
        except TimeoutError as exc:
            alive = _alive_workers(head)
            raise TimeoutError(f"{exc}: {alive} of {len(self.agents)} alive\n{self._log_tails()}") from exc
        isolation = "each in its own network namespace" if self._use_netns else "as local processes"
        say(
            f"- {len(self.agents)} volunteers joined through the tunnel ({isolation}), "
            f"{self.config.gpus_per_volunteer} simulated GPUs each"
        )

        if self.config.start_operator:
            self._launch(self._operator(kubeconfig, head.dashboard_url, token_file))
            say("- koinon operator started")
        self._state.complete = True
        self._save()

    def _start_head(self, head: LocalRayHead, say: Callable[[str], None]) -> None:
        """Start the Ray head and wait until it takes jobs, starting it again on other ports when its
        dashboard agent cannot serve HTTP. Its ports are probed free long before Ray binds them,
        and another control plane or a test's Ray may take one meanwhile: Ray then keeps that agent
        running without its HTTP server, and the head refuses every job for ever, while its
        dashboard answers as if all were well."""
        for attempt in range(1, HEAD_START_TRIES + 1):
            with deferred_signals():
                head.start()
                assert head.process is not None
                self._track(head.process)  # replaces the last start's record
            try:
                head.wait_ready()
                return
            except HeadCannotTakeJobsError as error:
                if attempt == HEAD_START_TRIES:
                    raise RuntimeError(
                        f"the Ray head could not take jobs after {attempt} starts on different ports: {error}"
                    ) from None
                port = f"{head.address}:{head.ports.dashboard_agent_listen}"
                say(f"- the Ray head's dashboard agent could not serve on {port}; starting the head on other ports")
                log.info("starting the Ray head again: %s", error)
            stopped = head.process
            assert stopped is not None
            head.stop()
            # Ray's processes that outlived their group (as `down` does, for this start's dir only).
            kill_processes_using(head.temp_dir)
            self._started.remove(stopped)  # stopped: `down` must not signal its pid again
            head.move_agent_ports(self._work_dir / f"head-{attempt + 1}")

    def _operator(self, kubeconfig: Path, dashboard_url: str, token_file: Path) -> ManagedProcess:
        # Its TMPDIR in the work dir, as the Ray head's: `down` removes what it leaves there (the
        # kubernetes client's copy of the kubeconfig's CA, when the operator is killed).
        return operator_process(
            kubeconfig,
            dashboard_url,
            self.log_dir,
            self.config.poll_interval_seconds,
            ray_auth_token_file=token_file,
            extra_env=self._env(),
            tmp_dir=self._work_dir / "operator-tmp",
        )

    def _network_namespaces(self) -> bool:
        wanted = self.config.network_namespaces
        if wanted is False:
            return False
        available = netns_available()
        if wanted and not available:
            raise RuntimeError("network namespaces asked for, but `ip netns add` does not work here (needs root)")
        why_not = runs_without_privileges() if available else ""
        if why_not:
            # The sandbox runs the volunteer as nobody, without capabilities; a checkout whose
            # files nobody cannot read would leave every volunteer failing to start.
            message = (
                f"the volunteer sandbox cannot run {sys.executable} without privileges ({why_not}); "
                "make the checkout and its Python environment readable by an unprivileged user "
                "(nobody), e.g. chmod -R o+rX (the directories above them need not be)"
            )
            if wanted:
                raise RuntimeError(message)
            log.warning("%s; volunteers run as plain processes instead", message)
            return False
        if not available:
            log.warning(
                "no network namespaces here (they need root): volunteers run as plain processes; Ray's "
                "traffic still goes through the tunnel, but job code on them is not confined"
            )
        return available

    def _processes_of_their_own(self) -> bool:
        why_not = processes_of_their_own()
        if why_not:
            log.warning(
                "volunteers cannot have processes of their own here (%s): a job's Ray driver on a "
                "volunteer may attach to the Ray head's raylet, and run there",
                why_not,
            )
        return not why_not

    def _start_agent(self, name: str, gpus: int, owner: str, extra_env: dict[str, str] | None = None) -> LocalAgent:
        assert self.gateway is not None and self._state is not None
        self._agents_started += 1
        netns = f"kn-{self._work_dir.name[-8:]}-{self._agents_started}" if self._use_netns else None
        agent = LocalAgent(
            name=name, gateway=self.gateway, join_token=self.gateway.create_join_token(owner),
            log_dir=self.log_dir, gpus=gpus,
            gpu_memory_mib=self.config.gpu_memory_mib, cpus=self.config.cpus_per_volunteer,
            netns=netns, own_processes=self._own_processes, extra_env={**self._env(), **(extra_env or {})},
            hide=(self.state_dir,),  # the Ray token, kubeconfig and the other components' logs
        )  # fmt: skip
        with deferred_signals():
            if netns:
                # Recorded before it exists, so that `down` deletes it whatever happens next.
                self._state.network_namespaces.append(netns)
                self._save()
            self.agents.append(agent)
            agent.start()
            assert agent.process is not None
            self._track(agent.process)
        return agent

    def _log_tails(self, max_bytes: int = 1500) -> str:
        """The ends of the gateway's and agents' logs, for errors a user (or CI) sees without the files."""
        processes = [self.gateway.process] if self.gateway is not None else []
        processes += [agent.process for agent in self.agents]
        return "\n".join(
            f"--- {process.log_path} ---\n{process.log_tail(max_bytes)}" for process in processes if process is not None
        )

    def add_volunteer(
        self, name: str, gpus: int, owner: str = "owner-extra", extra_env: dict[str, str] | None = None
    ) -> LocalAgent:
        """Start one more volunteer agent (and its VolunteerNode) on a control plane this process started."""
        if self.head is None or self._state is None:
            raise RuntimeError("the control plane was not started by this process")
        agent = self._start_agent(name, gpus, owner, extra_env)  # recorded at once, for `down`
        head, expected = self.head, len(self.agents)
        wait_until(lambda: _alive_workers(head) >= expected, 90, what=f"{name} to join Ray")
        return agent

    def kill_volunteer(self, name: str) -> None:
        """SIGKILL a volunteer's agent and its Ray node, as when the machine loses power."""
        agent = next(a for a in self.agents if a.name == name)
        assert agent.process is not None
        self.agents.remove(agent)
        stop_process_group(agent.process.pid, grace_seconds=0)
        kill_processes_using(self._work_dir / f"ray-{name}")

    def down(self, report: Callable[[list[str]], None] | None = None) -> list[str]:
        """Stop everything recorded in the state file, operator first, Ray head last; then remove
        what `up` left on disk. Returns the names of the process groups stopped, and gives them to
        ``report`` first: a Ctrl-C or SIGTERM held back during the teardown is delivered as it
        returns and ends the program, so a caller printing the list after `down` printed nothing."""
        if not self.state_dir.exists() and self._state is None:
            if report is not None:
                report([])
            return []  # nothing was started there: no state dir (nor its lock) to make
        with self._exclusive():
            return self._teardown(report)

    def _teardown(self, report: Callable[[list[str]], None] | None = None) -> list[str]:
        """The one cleanup, for `down` and for a failed or interrupted `up`: stop the recorded process
        groups, kill what escaped them, delete the network namespaces, remove the work dir and the
        files `up` wrote. A SIGTERM/SIGHUP or a Ctrl-C meanwhile takes effect once it is done (it
        waits for components' grace periods: one Ctrl-C left all after them running); a second
        Ctrl-C stops it at once, and the user is told how to finish."""
        notice = (
            "koinon: stopping the local control plane; wait for it to finish (Ctrl-C again leaves it partly stopped)"
        )
        with cleanup_signals(notice):
            try:
                stopped = self._stop_everything()
            except KeyboardInterrupt:
                finish = down_command(self.state_dir)
                print(f"koinon: the local control plane is only partly stopped; finish with: {finish}", file=sys.stderr)
                raise
            if report is not None:
                report(stopped)  # inside the block: before a held signal is delivered
            return stopped

    def _stop_everything(self) -> list[str]:
        state = self._state
        if state is None and self.state_path.exists():
            try:
                state = DevClusterInfo.load(self.state_path)
            except StateFileDamagedError as error:
                # Kept aside, not left in place: `up` refuses while a state file exists, so
                # the user could neither stop nor start. What it recorded is not known here.
                aside = self.state_path.with_name(f"{STATE_FILE}.damaged-{int(time.time())}")
                os.replace(self.state_path, aside)
                print(
                    f"koinon: {error}; moved to {aside}. Processes it recorded, if any, are not "
                    "stopped: look for them with `ps` and `ip netns list` (kn-*)",
                    file=sys.stderr,
                )
        stopped = self._stop_recorded(state) if state is not None else []
        # Started by this process but not recorded yet (the gateway while it starts): our children.
        recorded = set(state.process_groups.values()) if state is not None else set()
        for process in self._in_memory_processes():
            if process.popen is not None and process.pid not in recorded:
                process.stop(grace_seconds=STOP_GRACE_SECONDS)
                stopped.append(process.name)
        work_dir = state.work_dir if state is not None else None
        ours = work_dir is not None and WORK_DIR_NAME.fullmatch(work_dir.name) is not None
        if work_dir is not None and ours:
            kill_processes_using(work_dir, env_marker=f"{RUN_ENV}={work_dir}")
        deleted: set[str] = set()
        for agent in self.agents:
            agent.stop()  # its process is gone by now; this deletes its network namespace
            deleted.update([agent.netns] if agent.netns else [])
        for namespace in state.network_namespaces if state is not None else []:
            if namespace not in deleted:
                delete_netns(namespace)
        if work_dir is not None and ours:
            shutil.rmtree(work_dir, ignore_errors=True)
        for process in self._in_memory_processes():
            if process.popen is not None:
                process.popen.poll()  # reap
        for path in (self.state_dir / "ray-auth-token", self.state_dir / "kubeconfig", self.state_path):
            path.unlink(missing_ok=True)
        self._started.clear()
        self.agents.clear()
        self.head = self.gateway = None
        self._state = None
        return stopped

    def _in_memory_processes(self) -> list[ManagedProcess]:
        candidates = [*self._started, *(a.process for a in self.agents)]
        candidates += [self.gateway.process if self.gateway else None, self.head.process if self.head else None]
        unique: dict[int, ManagedProcess] = {}
        for process in candidates:
            if process is not None:
                unique.setdefault(id(process), process)
        return list(unique.values())

    def _stop_recorded(self, state: DevClusterInfo) -> list[str]:
        """Stop the recorded process groups that are still the ones `up` started: operator first, the
        agents together (each drains its Ray node), Ray head, gateway, emulator last."""
        verified = [(name, pgid) for name, pgid in state.process_groups.items() if self._still_ours(state, name, pgid)]
        agents = [pgid for name, pgid in verified if name.startswith(AGENT_PREFIX)]
        stopped: list[str] = []
        for name, pgid in reversed(verified):
            if not name.startswith(AGENT_PREFIX):
                stop_process_groups([pgid], STOP_GRACE_SECONDS)
            elif agents:
                stop_process_groups(agents, AGENT_STOP_GRACE_SECONDS)
                agents = []
            stopped.append(name)
        return stopped

    def _still_ours(self, state: DevClusterInfo, name: str, pgid: int, quiet: bool = False) -> bool:
        """Whether ``pgid`` still leads the process group `up` recorded (not a later process that was
        given the same pid); says why not when it runs but is not."""
        started = process_start_time(pgid)
        if started is None:
            return False  # exited; what its group left behind is found by the work dir
        if state.boot_id != boot_id():
            why = "it was recorded before the machine restarted" if state.boot_id else "no boot id was recorded"
        elif name not in state.start_times:
            why = "its start time was not recorded"
        elif state.start_times[name] != started:
            why = "that pid now belongs to another process"
        else:
            return True
        if not quiet:
            print(f"koinon: not stopping {name} (pid {pgid}): {why}", file=sys.stderr)
        return False

    def running_components(self, state: DevClusterInfo) -> list[str]:
        """The recorded process groups that still run as `up` started them."""
        return [name for name, pgid in state.process_groups.items() if self._still_ours(state, name, pgid, quiet=True)]

    def info(self) -> DevClusterInfo:
        if not self.state_path.exists():
            raise RuntimeError(f"no local control plane is running (no {self.state_path}); start one: koinon dev up")
        return DevClusterInfo.load(self.state_path)


def _alive_workers(head: LocalRayHead) -> int:
    request = urllib.request.Request(f"{head.dashboard_url}/api/v0/nodes?limit=1000", headers=head.auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            rows: Sequence[dict[str, object]] = json.load(reply)["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return 0
    return sum(1 for row in rows if row.get("state") == "ALIVE" and not row.get("is_head_node"))
