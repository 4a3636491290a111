"""The operator's loads of the kubernetes client's configuration: once per source, thread-safe, and
leaving none of the client's temp files (its copy of a kubeconfig's CA) behind."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from koinon_dev.cluster import DevCluster, DevClusterConfig
from koinon_emulator.kubeconfig import CONTEXT_NAME, kubeconfig_document, write_kubeconfig
from koinon_emulator.tls import self_signed_cert
from koinon_operator import kube
from kubernetes import client, config
from kubernetes.config import kube_config

pytestmark = pytest.mark.timeout(60)

# What the operator does: the Lease, the reputation book (several nodes at once), the result
# recheck and delete_aijob each call load_config() in worker threads (asyncio.to_thread) while kopf
# logs in from another; then it exits normally.
RACE = """
import logging
import threading

import kopf

from koinon_operator.kube import load_config, login

barrier = threading.Barrier(9)

def call():
    barrier.wait()
    load_config()

def kopf_login():
    barrier.wait()
    login(logger=logging.getLogger("kopf"), settings=kopf.OperatorSettings())

threads = [threading.Thread(target=call) for _ in range(8)] + [threading.Thread(target=kopf_login)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


def _kubeconfig(path: Path, server: str) -> Path:
    return write_kubeconfig(path, server, token="t", ca_pem=self_signed_cert(["127.0.0.1"]).cert_pem)


def _counted_loads(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """The client's kubeconfig loads from now on: one entry for each."""
    loads: list[None] = []
    original = config.load_kube_config

    def counting_load() -> None:
        loads.append(None)
        original()  # type: ignore[no-untyped-call]

    monkeypatch.setattr(config, "load_kube_config", counting_load)
    return loads


def test_concurrent_loads_and_kopfs_login_leave_no_temp_file(tmp_path: Path) -> None:
    """The client writes certificate-authority-data to a mkstemp file in $TMPDIR and removes at
    exit only the one file it remembers per content: loads racing in threads each wrote one, and
    all but one stayed in /tmp for good."""
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", "https://127.0.0.1:1")
    host_tmp = tmp_path / "host-tmp"  # stands for /tmp
    host_tmp.mkdir()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "TMPDIR": str(host_tmp)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    for _ in range(3):  # a race: more than one try
        subprocess.run([sys.executable, "-c", RACE], env=env, check=True, timeout=50)
        left = sorted(path.name for path in host_tmp.iterdir())
        assert not left, f"left in the temp dir after the process exited normally: {left}"


def test_the_configuration_is_loaded_once_and_again_when_the_kubeconfig_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube, "_loaded_from", None)
    # The default configuration, restored afterwards for the tests after this one.
    monkeypatch.setattr(client.Configuration, "_default", client.Configuration._default)
    loads = _counted_loads(monkeypatch)
    first = _kubeconfig(tmp_path / "first", "https://127.0.0.1:1")
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(first))
    for _ in range(3):
        kube.load_config()
    assert len(loads) == 1
    assert client.Configuration.get_default_copy().host == "https://127.0.0.1:1"

    _kubeconfig(first, "https://127.0.0.1:2")  # rewritten in place
    kube.load_config()
    assert len(loads) == 2
    assert client.Configuration.get_default_copy().host == "https://127.0.0.1:2"

    second = _kubeconfig(tmp_path / "second", "https://127.0.0.1:3")  # pointed elsewhere, as tests do
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(second))
    kube.load_config()
    assert len(loads) == 3
    assert client.Configuration.get_default_copy().host == "https://127.0.0.1:3"


def test_the_dev_planes_operator_keeps_its_temp_files_in_the_work_dir(tmp_path: Path) -> None:
    """`koinon dev down` removes the work dir: what the operator leaves in its TMPDIR goes too (the
    Ray head's TMPDIR is there already)."""
    cluster = DevCluster(DevClusterConfig(state_dir=tmp_path / "state"))
    work_dir = tmp_path / "koinon-0123abcd"
    work_dir.mkdir()
    cluster._work_dir = work_dir
    operator = cluster._operator(tmp_path / "kubeconfig", "http://127.0.0.1:9", tmp_path / "token")
    assert operator.env is not None
    tmp = Path(operator.env["TMPDIR"])
    assert tmp.parent == work_dir
    assert tmp.is_dir() and (tmp.stat().st_mode & 0o777) == 0o700


def _user_kubeconfig(path: Path, user: dict[str, object], ca_pem: bytes | None = None) -> Path:
    document = kubeconfig_document("https://127.0.0.1:1" if ca_pem else "http://127.0.0.1:1", ca_pem=ca_pem)
    document["users"] = [{"name": CONTEXT_NAME, "user": user}]
    path.write_text(yaml.safe_dump(document))
    return path


def _exec_user(plugin: Path, *args: Path) -> dict[str, object]:
    """A kubeconfig user whose credentials come from running the Python script ``plugin``."""
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": sys.executable,
            "args": [str(plugin), *map(str, args)],
            "interactiveMode": "Never",
        }
    }


@pytest.fixture
def fresh_load(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """load_config as on a fresh process, on a clock the test moves (a list of one: now)."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube, "_loaded_from", None)
    monkeypatch.setattr(kube, "_superseded", {})
    monkeypatch.setattr(client.Configuration, "_default", client.Configuration._default)
    now = [1000.0]
    monkeypatch.setattr(kube, "_monotonic", lambda: now[0])
    return now


def _bearer() -> str | None:
    return client.Configuration.get_default_copy().get_api_key_with_prefix("BearerToken")


def test_a_rotated_token_file_is_loaded_again_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_load: list[float]
) -> None:
    """A user whose token is a file (a projected service-account token, a Vault agent's sink): the
    client reads it at load only, and no refresh hook reads it again. Loaded only when the
    kubeconfig's bytes changed, the operator kept the old token for good (Lease renewals got 401s,
    leadership lapsed)."""
    token = tmp_path / "token"
    token.write_text("first-token")
    kubeconfig = _user_kubeconfig(tmp_path / "kubeconfig", {"tokenFile": "token"})  # relative to it
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    kube.load_config()
    assert _bearer() == "Bearer first-token"
    token.write_text("rotated-token")
    kube.load_config()  # the next Lease renewal, a second later
    assert _bearer() == "Bearer rotated-token"


EXEC_PLUGIN = """
import json, sys
token = open(sys.argv[1]).read()
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                  "status": {"token": token}}))
"""


def test_an_exec_plugins_token_without_expiry_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_load: list[float]
) -> None:
    """An exec plugin that gives no expirationTimestamp: the client sets no refresh for its token,
    which was fetched again at every load before loads were kept per source."""
    plugin = tmp_path / "plugin.py"
    plugin.write_text(EXEC_PLUGIN)
    token = tmp_path / "token"
    token.write_text("first-token")
    kubeconfig = _user_kubeconfig(tmp_path / "kubeconfig", _exec_user(plugin, token))
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    kube.load_config()
    assert _bearer() == "Bearer first-token"
    token.write_text("rotated-token")
    kube.load_config()  # within CONFIG_RELOAD_SECONDS: not loaded again
    assert _bearer() == "Bearer first-token"
    fresh_load[0] += kube.CONFIG_RELOAD_SECONDS
    kube.load_config()
    assert _bearer() == "Bearer rotated-token"


def test_loads_over_time_keep_one_ca_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_load: list[float]
) -> None:
    """Loading again every CONFIG_RELOAD_SECONDS writes no new copy of the CA: the client reuses its
    file for the same content."""
    host_tmp = tmp_path / "host-tmp"  # stands for /tmp
    host_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(host_tmp))
    kubeconfig = _user_kubeconfig(
        tmp_path / "kubeconfig", {"token": "t"}, ca_pem=self_signed_cert(["127.0.0.1"]).cert_pem
    )
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    loads = _counted_loads(monkeypatch)
    for _ in range(10):
        kube.load_config()
        fresh_load[0] += kube.CONFIG_RELOAD_SECONDS
    assert len(loads) == 10
    left = list(host_tmp.iterdir())
    assert len(left) == 1, left
    assert client.Configuration.get_default_copy().ssl_ca_cert == str(left[0])


EXEC_CERT_PLUGIN = """
import base64, json, os
cert = "-----BEGIN CERTIFICATE-----\\n" + base64.b64encode(os.urandom(600)).decode() + "\\n-----END CERTIFICATE-----\\n"
key = "-----BEGIN PRIVATE KEY-----\\n" + base64.b64encode(os.urandom(100)).decode() + "\\n-----END PRIVATE KEY-----\\n"
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                  "status": {"clientCertificateData": cert, "clientKeyData": key}}))
"""


def _exec_cert_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kubeconfig whose user is an exec plugin answering a fresh client certificate each time it
    runs, loaded with its temp files in the returned folder (it stands for /tmp)."""
    host_tmp = tmp_path / "host-tmp"
    host_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(host_tmp))
    monkeypatch.setattr(kube_config, "_temp_files", {})
    plugin = tmp_path / "plugin.py"
    plugin.write_text(EXEC_CERT_PLUGIN)
    kubeconfig = _user_kubeconfig(
        tmp_path / "kubeconfig", _exec_user(plugin), ca_pem=self_signed_cert(["127.0.0.1"]).cert_pem
    )
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    return host_tmp


def test_an_exec_plugin_minting_client_certificates_leaves_a_bounded_number_of_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_load: list[float]
) -> None:
    """Every reload (CONFIG_RELOAD_SECONDS) wrote two more temp files (cert, key), kept by the
    client until exit. Those a configuration stopped referencing go SUPERSEDED_TEMP_FILE_SECONDS
    later (a client built from it in another thread may still connect with them meanwhile)."""
    host_tmp = _exec_cert_plugin(tmp_path, monkeypatch)
    superseded: list[tuple[float, set[str | None]]] = []  # (when, the files that load replaced)
    previous: set[str | None] = set()
    loads = int(3 * kube.SUPERSEDED_TEMP_FILE_SECONDS / kube.CONFIG_RELOAD_SECONDS)  # 30 min of Lease steps
    for _ in range(loads):
        kube.load_config()
        current = client.Configuration.get_default_copy()
        in_use = {current.ssl_ca_cert, current.cert_file, current.key_file}
        superseded.append((fresh_load[0], previous - in_use))
        left: set[str | None] = {str(p) for p in host_tmp.iterdir()}
        assert in_use <= left
        for when, files in superseded:
            recent = fresh_load[0] - when < kube.SUPERSEDED_TEMP_FILE_SECONDS
            assert files <= left if recent else not files & left, (fresh_load[0] - when, files & left)
        bound = 1 + 2 * (kube.SUPERSEDED_TEMP_FILE_SECONDS / kube.CONFIG_RELOAD_SECONDS + 1)
        assert len(left) <= bound, f"{len(left)} temp files"
        previous = in_use
        fresh_load[0] += kube.CONFIG_RELOAD_SECONDS
    assert len(set(kube_config._temp_files.values())) == len(left)
    assert set(kube._superseded) <= left


def test_a_client_built_before_two_reloads_keeps_its_certificate_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_load: list[float]
) -> None:
    """A worker thread's API client built just before a reload, still connecting a minute later
    (the reputation book's read-modify-write: up to 20 tries of two requests with 10 s timeouts,
    each retry after a timeout a new connection, which urllib3 makes by reading cert_file and
    key_file again). Its files were removed one load later: two Lease reloads meanwhile, and its
    next connection failed for a missing certificate."""
    _exec_cert_plugin(tmp_path, monkeypatch)
    kube.load_config()
    fresh_load[0] += kube.CONFIG_RELOAD_SECONDS - 1
    cfg = client.CustomObjectsApi().api_client.configuration  # built just before the next reload
    for _ in range(2):  # the Lease's steps in another thread reload twice meanwhile (61 s later)
        fresh_load[0] += kube.CONFIG_RELOAD_SECONDS
        kube.load_config()
    assert os.path.exists(cfg.cert_file) and os.path.exists(cfg.key_file)
