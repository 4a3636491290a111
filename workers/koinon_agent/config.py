"""Agent configuration: CLI flags, each with a KOINON_* environment variable (for the Helm chart)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from koinon_gateway.limits import MAX_GPU_MEMORY_MIB, MAX_GPUS, MAX_TEXT

VERSION = "0.2.0"
# DrainRequest.grace_seconds is a uint32.
MAX_GRACE_SECONDS = 2**32 - 1
# Ray refuses a smaller object store (ray start exits, and the node would be restarted for ever).
MIN_OBJECT_STORE_MEMORY = 75 * 1024 * 1024
_FINITE_SECONDS = (
    "drain_grace_s",
    "backoff_initial_s",
    "backoff_max_s",
    "backoff_reset_after_s",
    "ray_restart_after_s",
    "ray_start_timeout_s",
)
PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
# KOINON_PROXY_SECRET goes into the proxy URL's userinfo as it is: characters a URL keeps unescaped.
PROXY_SECRET_RE = re.compile(r"[A-Za-z0-9._~-]{16,256}")


def default_state_dir() -> Path:
    return Path.home() / ".koinon" / "agent"


@dataclass
class AgentConfig:
    gateway: str  # "host:port" or "unix:/path"
    token: str = ""  # needed only for the first join; later runs reuse the stored credential
    # Where the token should have come from, said when none came (KOINON_TOKEN_HINT, environment
    # only). The chart passes the token from a Secret with an optional secretKeyRef (a joined node
    # starts without one), so a misspelt Secret name or key leaves KOINON_TOKEN unset without any
    # error from Kubernetes: the hint names the Secret, key and chart values to check.
    token_hint: str = ""
    state_dir: Path = field(default_factory=default_state_dir)
    ca_file: Path | None = None  # CA that signed the gateway's certificate
    ca_pem: bytes = b""  # same, inline (KOINON_CA_CERT)
    # Pin instead of (or as well as) a CA: "sha256:<hex>" of the CA's public key, as kubeadm prints it;
    # the agent takes the CA from the gateway's own TLS chain when it matches (ca_discovery).
    ca_cert_hash: str = ""
    insecure: bool = False  # plaintext gRPC; tests and trusted links only
    tls_server_name: str = ""  # defaults to the gateway host ("koinon-gateway" for unix sockets)
    name_hint: str = field(default_factory=lambda: os.uname().nodename)
    region: str = ""
    simulate_gpus: int | None = None
    simulate_gpu_memory_mib: int = 16384
    num_cpus: int | None = None
    object_store_memory: int | None = None
    ray_bin: str = "ray"
    temp_dir: Path | None = None  # Ray's --temp-dir; defaults to <state_dir>/ray
    # Where the agent writes its health report (koinon-agent health reads it); defaults to
    # <state_dir>/health.json. Apart from the state volume, a state dir that turned read-only or
    # full does not make liveness probes kill an agent that still works (the chart uses /tmp).
    health_file: Path | None = None
    start_ray: bool = True
    proxy_port: int = 0  # local CONNECT proxy for Ray's gRPC (0: any free port)
    # The password the local proxy asks of its clients; empty: a new random one each start. Set
    # only for tools that dial through the proxy themselves (the tunnel benchmark): by environment
    # (KOINON_PROXY_SECRET), never a flag, since a command line is readable by every local user.
    proxy_secret: str = ""
    drain_grace_s: float = 30.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # Only a session that stayed up this long counts as the gateway being back and restarts the
    # backoff from backoff_initial_s: a gateway that accepts and drops at once gets no faster retries.
    backoff_reset_after_s: float = 30.0
    ray_restart_after_s: float = 60.0  # restart the Ray node after an outage this long
    ray_start_timeout_s: float = 120.0  # a Ray node not serving this long after `ray start` is replaced

    def validate(self) -> None:
        if not self.gateway:
            raise ValueError("gateway: required (--gateway or KOINON_GATEWAY)")
        if not self.gateway.startswith("unix:"):
            host, sep, port = self.gateway.rpartition(":")
            bare_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
            if (
                not sep
                or bare_ipv6
                or not host.strip("[]")
                or not re.fullmatch(r"[0-9]{1,5}", port)
                or not 0 < int(port) < 65536
            ):
                raise ValueError(f"gateway: expected host:port or unix:/path, got {self.gateway!r}")
        if self.ca_file is not None:
            try:
                ca_file_pem = self.ca_file.read_bytes()
            except OSError as exc:
                raise ValueError(f"ca_file: {self.ca_file}: missing or not readable ({exc.strerror})") from exc
            problem = pem_certificates_problem(ca_file_pem)
            if problem:
                raise ValueError(f"ca_file: {self.ca_file}: {problem}")
        if self.ca_pem:
            problem = pem_certificates_problem(self.ca_pem)
            if problem:
                raise ValueError(f"ca_pem (KOINON_CA_CERT): {problem}")
        # NaN passes every comparison below (and later ones, e.g. outage > nan) unnoticed.
        for name in _FINITE_SECONDS:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: must be a finite number of seconds, got {getattr(self, name)}")
        if self.num_cpus is not None and self.num_cpus < 0:
            raise ValueError(f"num_cpus: must be >= 0, got {self.num_cpus}")
        if self.object_store_memory is not None and self.object_store_memory < MIN_OBJECT_STORE_MEMORY:
            raise ValueError(
                f"object_store_memory: must be at least {MIN_OBJECT_STORE_MEMORY} bytes (75 MiB, Ray's minimum), "
                f"got {self.object_store_memory}"
            )
        # The gateway's limits (koinon_gateway.limits): beyond them the join is refused as if the
        # token were bad (exit 3), or building the request fails on a uint64, and 10**8 simulated
        # GPUs would be 10**8 objects before that.
        if self.simulate_gpus is not None and not 0 <= self.simulate_gpus <= MAX_GPUS:
            raise ValueError(
                f"simulate_gpus (--simulate-gpus, KOINON_SIMULATE_GPUS): must be within 0..{MAX_GPUS}, "
                f"got {self.simulate_gpus}"
            )
        if self.temp_dir is not None:
            if ".." in Path(self.temp_dir).parts:
                # The check below and the dir the agent, the launcher and Ray use must be one: a
                # ".." after a symlink ("/tmp/lnk/../lib/..." with /tmp/lnk -> /var/lib) is
                # resolved by the kernel through the symlink, not by dropping "lnk/..".
                raise ValueError(
                    f"temp_dir (--temp-dir, KOINON_TEMP_DIR): {self.temp_dir} has a '..' component; "
                    "give the dir's path without one"
                )
            # The temp dir's own name is not followed: a symlink there is replaced by a real dir
            # before Ray starts (own_dir), and job code can plant one in the chart's /tmp, which
            # outlives container restarts: were that refused here, every new container would exit.
            # Without "..", abspath (which drops "." and repeated "/" only) names what
            # ray_temp_dir.absolute() does.
            absolute = os.path.abspath(self.temp_dir)
            temp = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
            state = os.path.realpath(self.state_dir)
            if temp == state or state.startswith(temp.rstrip("/") + "/"):
                # Ray and its jobs get full access to their temp dir: it would hold the credential.
                raise ValueError(
                    f"temp_dir (KOINON_TEMP_DIR): {self.temp_dir} is the state dir or a dir above it; "
                    "Ray's jobs would reach the node credential"
                )
        if not 0 < self.simulate_gpu_memory_mib <= MAX_GPU_MEMORY_MIB:
            raise ValueError(
                "simulate_gpu_memory_mib (--simulate-gpu-memory, KOINON_SIMULATE_GPU_MEMORY): must be within "
                f"1..{MAX_GPU_MEMORY_MIB} MiB, got {self.simulate_gpu_memory_mib}"
            )
        # The region is stored as it is: one the gateway would refuse is a configuration error. The
        # name hint is not checked: it is only a hint, cut short for a join (join_name_hint), and
        # the chart sets it from spec.nodeName (up to 253 characters): refused, an agent already
        # joined on a long-named node crash-looped though it would never join.
        if len(self.region) > MAX_TEXT:
            raise ValueError(
                f"region (--region, KOINON_REGION): at most {MAX_TEXT} characters (the gateway takes no more)"
            )
        if not _encodes_as_utf8(self.region):
            # Bytes that are not UTF-8 (os.environ/argv keep them as lone surrogates) cannot go into
            # a protobuf string: the join failed later with the codec's own words.
            raise ValueError("region (--region, KOINON_REGION): not valid UTF-8")
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_initial_s/backoff_max_s: need 0 < initial <= max")
        if self.backoff_reset_after_s < 0:
            raise ValueError("backoff_reset_after_s: must be >= 0 seconds")
        if not 0 <= self.drain_grace_s <= MAX_GRACE_SECONDS:
            raise ValueError(f"drain_grace_s: must be within 0..{MAX_GRACE_SECONDS} seconds")
        if not 0 <= self.proxy_port < 65536:
            raise ValueError(f"proxy_port: must be a TCP port (0 for any free one), got {self.proxy_port}")
        if self.proxy_secret and not PROXY_SECRET_RE.fullmatch(self.proxy_secret):
            # Not the value: it is a secret.
            raise ValueError("proxy_secret (KOINON_PROXY_SECRET): expected 16 to 256 of A-Z a-z 0-9 . _ ~ -")
        if self.ray_restart_after_s <= 0:
            raise ValueError("ray_restart_after_s: must be > 0 seconds")
        if self.ray_start_timeout_s <= 0:
            raise ValueError("ray_start_timeout_s: must be > 0 seconds")
        if self.insecure and (self.ca_file or self.ca_pem or self.ca_cert_hash):
            raise ValueError("insecure: cannot be combined with a CA or a CA hash")
        if self.ca_cert_hash and not re.fullmatch(r"sha256:[0-9a-f]{64}", self.ca_cert_hash):
            raise ValueError("ca_cert_hash: expected sha256:<64 lowercase hex digits>")

    @property
    def join_name_hint(self) -> str:
        """The name hint as a JoinRequest carries it: at most MAX_TEXT characters, what the gateway
        reads of it (it keeps fewer still for the node's name)."""
        # Undecodable bytes in the hint (from a non-UTF-8 hostname or variable) become "?": a
        # protobuf string must be UTF-8, and the gateway keeps only DNS-safe characters anyway.
        return self.name_hint.encode("utf-8", "replace").decode("utf-8")[:MAX_TEXT]

    @property
    def ray_temp_dir(self) -> Path:
        return self.temp_dir or self.state_dir / "ray"

    @property
    def health_path(self) -> Path:
        return self.health_file or default_health_file(self.state_dir)


def pem_certificates_problem(pem: bytes) -> str | None:
    """Why `pem` is no usable CA bundle, None when every certificate in it parses. A damaged one (a
    paste that lost lines) must be a configuration error: gRPC would only fail each TLS handshake,
    which the agent cannot tell from a gateway that is down, and retry for ever."""
    if PEM_CERTIFICATE not in pem:
        return "holds no PEM certificate"
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        return f"holds a damaged PEM certificate, cut short or edited? ({exc})"
    return None


def default_health_file(state_dir: Path) -> Path:
    return state_dir / "health.json"


# Environment variables a Helm chart sets, with the AgentConfig field each fills.
ENV_VARS: dict[str, str] = {
    "KOINON_GATEWAY": "gateway",
    "KOINON_TOKEN": "token",
    "KOINON_TOKEN_HINT": "token_hint",
    "KOINON_STATE_DIR": "state_dir",
    "KOINON_CA_FILE": "ca_file",
    "KOINON_CA_CERT": "ca_pem",
    "KOINON_CA_CERT_HASH": "ca_cert_hash",
    "KOINON_INSECURE": "insecure",
    "KOINON_TLS_SERVER_NAME": "tls_server_name",
    "KOINON_NODE_NAME": "name_hint",
    "KOINON_REGION": "region",
    "KOINON_SIMULATE_GPUS": "simulate_gpus",
    "KOINON_SIMULATE_GPU_MEMORY": "simulate_gpu_memory_mib",
    "KOINON_NUM_CPUS": "num_cpus",
    "KOINON_OBJECT_STORE_MEMORY": "object_store_memory",
    "KOINON_RAY_BIN": "ray_bin",
    "KOINON_TEMP_DIR": "temp_dir",
    "KOINON_HEALTH_FILE": "health_file",
    "KOINON_DRAIN_GRACE": "drain_grace_s",
    "KOINON_RAY_RESTART_AFTER": "ray_restart_after_s",
    "KOINON_PROXY_PORT": "proxy_port",
    "KOINON_PROXY_SECRET": "proxy_secret",
}


def _encodes_as_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
