"""The ``koinon-kube-emulator`` command: kubeconfig, URL on stdout, clean stop, state file, and
only clients with the kubeconfig's credential served."""

from __future__ import annotations

import base64
import datetime as dt
import json
import signal
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from koinon_dev.binaries import ensure_binaries
from koinon_emulator.main import serving_credentials
from koinon_emulator.tls import self_signed_cert

pytestmark = pytest.mark.timeout(60)


def _start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "koinon_emulator.main", "--kubeconfig", str(tmp_path / "kubeconfig"), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    assert url.startswith(("https://127.0.0.1:", "http://127.0.0.1:")), process.stderr.read() if process.stderr else ""
    return process, url


def _stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0


def _call(kubeconfig: Path, url: str, token: str | None, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    """A request over the kubeconfig's TLS (its CA), with ``token`` as the bearer credential."""
    config = yaml.safe_load(kubeconfig.read_text())
    ca = base64.b64decode(config["clusters"][0]["cluster"]["certificate-authority-data"]).decode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5, context=ssl.create_default_context(cadata=ca)) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def _token(kubeconfig: Path) -> str:
    token: str = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
    return token


def test_cli_serves_writes_kubeconfig_and_keeps_state(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    kubeconfig = tmp_path / "kubeconfig"
    process, url = _start(tmp_path, "--state-file", str(state))
    try:
        config = yaml.safe_load(kubeconfig.read_text())
        assert config["current-context"] == "koinon-local"
        assert config["clusters"][0]["cluster"]["server"] == url
        assert config["contexts"][0]["context"]["namespace"] == "default"
        created = _call(kubeconfig, f"{url}/api/v1/namespaces/default/configmaps", _token(kubeconfig), "POST",
                        {"metadata": {"name": "kept"}})  # fmt: skip
        assert created[0] == 201
    finally:
        _stop(process)
    process, url = _start(tmp_path, "--state-file", str(state))
    try:
        status, kept = _call(kubeconfig, f"{url}/api/v1/namespaces/default/configmaps/kept", _token(kubeconfig))
        assert status == 200 and kept["metadata"]["name"] == "kept"
    finally:
        _stop(process)


def test_cli_serves_only_clients_with_the_kubeconfigs_token(tmp_path: Path) -> None:
    """`koinon dev up` runs it on 127.0.0.1, where any local user reached it: Secrets (the gateway's
    CA key) and AIJobs (run as the user who started it) were open to all. A new token per start, in
    a 0600 kubeconfig, over HTTPS (kubectl sends credentials over TLS only); 401 otherwise."""
    kubeconfig = tmp_path / "kubeconfig"
    process, url = _start(tmp_path)
    try:
        assert url.startswith("https://127.0.0.1:")
        assert stat.S_IMODE(kubeconfig.stat().st_mode) == 0o600
        secrets_url = f"{url}/api/v1/namespaces/default/secrets"
        unauthorized = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "Unauthorized", "reason": "Unauthorized", "code": 401}  # fmt: skip
        assert _call(kubeconfig, secrets_url, None) == (401, unauthorized)
        assert _call(kubeconfig, secrets_url, _token(kubeconfig) + "x") == (401, unauthorized)
        assert _call(kubeconfig, f"{url}/apis", "not-the-token")[0] == 401
        assert _call(kubeconfig, secrets_url, _token(kubeconfig))[0] == 200
        assert _call(kubeconfig, f"{url}/version", None)[0] == 200  # public, as kube-apiserver's
        kubectl = subprocess.run(
            [str(ensure_binaries().kubectl), f"--kubeconfig={kubeconfig}", "get", "secrets", "-o", "name"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert kubectl.returncode == 0, kubectl.stderr
        first_token = _token(kubeconfig)
    finally:
        _stop(process)
    output = process.communicate()
    assert first_token not in output[0] + output[1]  # never logged
    second, url = _start(tmp_path)
    try:
        assert _call(kubeconfig, f"{url}/api/v1/namespaces/default/secrets", first_token)[0] == 401  # one per start
        assert _call(kubeconfig, f"{url}/api/v1/namespaces/default/secrets", _token(kubeconfig))[0] == 200
    finally:
        _stop(second)


def test_clients_of_an_emulator_restarted_on_its_state_file_are_still_served(tmp_path: Path) -> None:
    """Each start drew a new certificate and token: a client holding the kubeconfig it read before
    a restart on the same state (a running gateway reads it once) failed for good, though
    kube-apiserver keeps its serving certificate and credentials across restarts."""
    state, kubeconfig = tmp_path / "state.json", tmp_path / "kubeconfig"
    process, url = _start(tmp_path, "--state-file", str(state))
    held = kubeconfig.read_text()
    _stop(process)
    process, url = _start(tmp_path, "--state-file", str(state), "--port", url.rsplit(":", 1)[1])
    try:
        assert kubeconfig.read_text() == held
        (tmp_path / "held").write_text(held)
        assert _call(tmp_path / "held", f"{url}/api/v1/namespaces", _token(tmp_path / "held"))[0] == 200
    finally:
        _stop(process)
    # The state (Secrets) and what authenticates to it are for the owner's eyes only.
    for private in (state, Path(f"{state}.credentials.json"), kubeconfig):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private


def test_cli_without_auth_serves_plain_http_to_anyone(tmp_path: Path) -> None:
    process, url = _start(tmp_path, "--no-auth")
    try:
        with urllib.request.urlopen(f"{url}/api/v1/namespaces/default/secrets", timeout=5) as reply:
            assert reply.status == 200
        assert yaml.safe_load((tmp_path / "kubeconfig").read_text())["users"][0]["user"] == {}
    finally:
        _stop(process)


def test_an_expired_kept_certificate_is_not_served_again(tmp_path: Path) -> None:
    """A certificate kept from a start a year ago (365 days) is reused as long as the host
    matches: every client then fails with x509 'certificate has expired' and only deleting the
    credentials file by hand helps."""
    state = tmp_path / "state.json"
    hosts = ["127.0.0.1", "localhost"]
    old = self_signed_cert(hosts, days=0)  # expired now, as one made 365 days ago is
    Path(f"{state}.credentials.json").write_text(
        json.dumps({"hosts": hosts, "token": "t", "cert": old.cert_pem.decode(), "key": old.key_pem.decode()})
    )
    _, tls = serving_credentials("127.0.0.1", str(state))
    cert = x509.load_pem_x509_certificate(tls.cert_pem)
    assert cert.not_valid_after_utc > dt.datetime.now(dt.UTC), "an expired certificate is served"


def test_an_unreadable_credentials_file_does_not_crash_the_start(tmp_path: Path) -> None:
    """A truncated credentials file (disk full, a crash right after the rename without fsync)
    stops every later start with a JSONDecodeError traceback."""
    state = tmp_path / "state.json"
    Path(f"{state}.credentials.json").write_text('{"hosts": ["127.0.0.1", "loc')
    token, tls = serving_credentials("127.0.0.1", str(state))
    assert token and tls.cert_pem
