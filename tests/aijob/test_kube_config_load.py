"""The operator's loads of the kubernetes client's configuration: once per source, thread-safe, and
leaving none of the client's temp files (its copy of a kubeconfig's CA) behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from koinon_dev.cluster import DevCluster, DevClusterConfig
from koinon_emulator.kubeconfig import write_kubeconfig
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
    loads: list[None] = []
    original = config.load_kube_config

    def counting_load() -> None:
        loads.append(None)
        original()  # type: ignore[no-untyped-call]

    monkeypatch.setattr(config, "load_kube_config", counting_load)
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
