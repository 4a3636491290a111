"""spec.runtimeEnv is x-kubernetes-preserve-unknown-fields: kube-apiserver stores it nested up to its
limit of 10000 levels, and serves it to every LIST and watch. One AIJob with a runtimeEnv about 1000
levels deep (from anyone who may create AIJobs, in any namespace) made kopf's watch fail to decode
(Python's recursion limit, 1000) and the operator exit, at every restart: no AIJob anywhere was
served, and the log named none. The operator now decodes what kube-apiserver stores, and fails
such a job InvalidSpec, naming spec.runtimeEnv and the limit."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_operator import main as operator_main
from koinon_operator.api.aijob import MAX_RUNTIME_ENV_DEPTH, SpecError, parse_spec
from koinon_operator.ray_jobs import RayJobState

from tests.aijob.fake_ray import Clock, FakeRay, make_body, make_reconciler, step

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "manifests" / "crds"
KUBE_API_MAX_NESTING = 10000  # kube-apiserver's, on a request body
# Above it in an AIJob: the object, spec, runtimeEnv (the tests nest under runtimeEnv.conda).
ABOVE_CONDA = 3


def _nested(levels: int) -> dict[str, Any]:
    """An object ``levels`` deep (built in a loop: it may be deeper than Python's recursion limit)."""
    value: dict[str, Any] = {"a": "x"}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def _nested_json(levels: int) -> str:
    text = '"x"'
    for _ in range(levels):
        text = '{"a":' + text + "}"
    return text


@pytest.fixture
def operator_recursion_limit() -> Iterator[None]:
    """The recursion limit the operator's main() sets (copy.deepcopy of the test's deep bodies)."""
    before = sys.getrecursionlimit()
    operator_main.raise_recursion_limit()
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


# --- parse_spec ---------------------------------------------------------------------------------------


def test_a_runtime_env_up_to_the_limit_is_taken() -> None:
    conda = {"dependencies": ["python=3.11", {"pip": ["numpy"]}]}  # 4 deep under runtimeEnv: Ray's deepest
    assert parse_spec({"entrypoint": "x", "runtimeEnv": {"conda": conda}}).runtime_env["conda"] == conda
    # runtimeEnv itself counts: it and conda's value make MAX_RUNTIME_ENV_DEPTH.
    parse_spec({"entrypoint": "x", "runtimeEnv": {"conda": _nested(MAX_RUNTIME_ENV_DEPTH - 1)}})
    parse_spec({"entrypoint": "x", "runtimeEnv": {"conda": [[[{"a": [[]]}]]]}})  # arrays count too


def test_a_runtime_env_past_the_limit_is_refused_naming_the_field_and_the_limit() -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec({"entrypoint": "x", "runtimeEnv": {"conda": _nested(MAX_RUNTIME_ENV_DEPTH)}})
    assert raised.value.field_path == "spec.runtimeEnv"
    assert str(raised.value) == (
        f"spec.runtimeEnv: nested {MAX_RUNTIME_ENV_DEPTH + 1} levels deep (objects and arrays within one "
        f"another), at most {MAX_RUNTIME_ENV_DEPTH}: no Ray runtime_env field takes more than a few"
    )
    with pytest.raises(SpecError, match="nested 34 levels"):
        parse_spec({"entrypoint": "x", "runtimeEnv": {"pip": [_nested(MAX_RUNTIME_ENV_DEPTH)]}})


def test_the_depth_is_measured_without_recursion() -> None:
    """Under Python's default recursion limit, as deep as kube-apiserver stores."""
    assert sys.getrecursionlimit() < KUBE_API_MAX_NESTING
    levels = KUBE_API_MAX_NESTING - ABOVE_CONDA
    with pytest.raises(SpecError) as raised:
        parse_spec({"entrypoint": "x", "runtimeEnv": {"conda": _nested(levels)}})
    assert raised.value.message.startswith(f"nested {levels + 1} levels deep")


# --- the reconciler -----------------------------------------------------------------------------------


async def test_a_new_job_nested_too_deep_fails_invalid_spec_at_its_first_pass() -> None:
    """Refused before anything of the pass walks runtimeEnv: under Python's default recursion limit
    (reconcile() called on the body itself, as kopf does; step() would deepcopy it)."""
    ray, clock = FakeRay(), Clock()
    body = make_body({"entrypoint": "python x.py", "runtimeEnv": {"conda": _nested(KUBE_API_MAX_NESTING - 4)}})
    outcome = await make_reconciler(ray, clock).reconcile(body, {}, {})
    assert (outcome.status["phase"], outcome.status["reason"]) == ("Failed", "InvalidSpec"), outcome.status
    assert outcome.status["message"].startswith("spec.runtimeEnv: nested ")
    assert f"at most {MAX_RUNTIME_ENV_DEPTH}" in outcome.status["message"]
    assert ray.submissions == []


@pytest.mark.usefixtures("operator_recursion_limit")
async def test_an_edit_of_a_running_job_nested_as_deep_as_kube_stores_fails_it_and_stops_its_ray_job() -> None:
    """The ratchet compares a placed job's spec with its digest (json.dumps, recursive) before its
    refusal: under the operator's recursion limit, that takes what kube-apiserver stores."""
    ray, clock = FakeRay(), Clock()
    body = make_body({"entrypoint": "python train.py"})
    reconciler = make_reconciler(ray, clock)
    for _ in range(2):
        await step(reconciler, body)
    submission = body["status"]["submissionId"]
    ray.set_state(submission, RayJobState.RUNNING)
    await step(reconciler, body)
    assert body["status"]["phase"] == "Running"
    body["spec"] = {**body["spec"], "runtimeEnv": {"conda": _nested(KUBE_API_MAX_NESTING - 4)}}
    body["metadata"]["generation"] += 1
    clock.advance(30)
    await step(reconciler, body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec"), body["status"]
    assert body["status"]["message"].startswith("spec.runtimeEnv: nested ")
    assert submission in ray.stopped


def test_the_operator_raises_the_recursion_limit_and_never_lowers_it(operator_recursion_limit: None) -> None:
    assert sys.getrecursionlimit() >= operator_main.RECURSION_LIMIT >= 2 * KUBE_API_MAX_NESTING
    sys.setrecursionlimit(operator_main.RECURSION_LIMIT + 1)
    operator_main.raise_recursion_limit()
    assert sys.getrecursionlimit() == operator_main.RECURSION_LIMIT + 1


# --- the operator process -----------------------------------------------------------------------------


def _post(url: str, path: str, document: str) -> None:
    request = urllib.request.Request(
        url + path, data=document.encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


def _status(url: str, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + path, timeout=30) as reply:
        status: dict[str, Any] = json.load(reply).get("status") or {}
    return status


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_one_job_nested_as_deep_as_kube_stores_fails_alone_and_the_operator_serves_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The emulator refuses more than 200 levels (its own limit, not kube-apiserver's): raised here to
    kube-apiserver's, and the emulator (on a thread of this process) let recurse as deep."""
    import koinon_emulator.requests as emulator_requests
    from koinon_dev.cluster import operator_process
    from koinon_emulator import KubeEmulator
    from koinon_emulator.kubeconfig import write_kubeconfig

    from tests.emulator.helpers import EmulatorThread

    monkeypatch.setattr(emulator_requests, "MAX_NESTING", KUBE_API_MAX_NESTING)
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10 * KUBE_API_MAX_NESTING)
    server = EmulatorThread()
    url = server.start()
    process = None
    try:
        for crd in sorted(CRDS.glob("*.yaml")):
            server.call(partial(KubeEmulator.apply_crd, crd=yaml.safe_load(crd.read_text())))
        _post(url, "/api/v1/namespaces", '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"team"}}')
        jobs = "/apis/koinon.dev/v1alpha1/namespaces/{ns}/aijobs"
        head = '{"apiVersion":"koinon.dev/v1alpha1","kind":"AIJob","metadata":{"name":"%s","namespace":"%s"},'
        spec = '"spec":{"entrypoint":"python -c 1","resources":{"gpus":0}'
        _post(url, jobs.format(ns="default"), head % ("ordinary", "default") + spec + "}}")
        # As deep as the emulator takes a request body (it counts the string at the bottom as a
        # level, kube-apiserver only objects and arrays): stored, served to every LIST and watch.
        levels = KUBE_API_MAX_NESTING - ABOVE_CONDA - 1
        deep = _nested_json(levels)
        _post(url, jobs.format(ns="team"), head % ("deep", "team") + spec + ',"runtimeEnv":{"conda":' + deep + "}}}")

        process = operator_process(
            write_kubeconfig(tmp_path / "kubeconfig", url),
            "http://127.0.0.1:9",  # no Ray: passes still write status (RayReachable=False)
            tmp_path,
            poll_interval_seconds=0.5,
            extra_env={"KOINON_SUBMISSION_KEY": "k" * 40, "KOINON_LEASE_NAMESPACE": "default"},
            tmp_dir=tmp_path / "tmp",
        )
        process.start()
        deadline = time.monotonic() + 60
        ordinary: dict[str, Any] = {}
        refused: dict[str, Any] = {}
        while time.monotonic() < deadline and process.alive():
            ordinary = _status(url, jobs.format(ns="default") + "/ordinary")
            refused = _status(url, jobs.format(ns="team") + "/deep")
            if ordinary.get("phase") and refused.get("phase"):
                break
            time.sleep(0.5)
        log = process.log_tail(3000)
        assert process.alive(), f"the operator exited; log tail:\n{log}"
        assert ordinary.get("phase") == "Pending", f"the ordinary job was not served: {ordinary}\n{log}"
        assert (refused.get("phase"), refused.get("reason")) == ("Failed", "InvalidSpec"), f"{refused}\n{log}"
        assert refused["message"] == (
            f"spec.runtimeEnv: nested {levels + 1} levels deep (objects and arrays "
            f"within one another), at most {MAX_RUNTIME_ENV_DEPTH}: no Ray runtime_env field takes more than a few"
        )
        assert "RecursionError" not in log and "recursion" not in log, log
    finally:
        if process is not None:
            process.stop(grace_seconds=5)
        server.stop()
        sys.setrecursionlimit(old_limit)


def test_the_readme_gives_the_limit() -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"a `runtimeEnv` nested more than {MAX_RUNTIME_ENV_DEPTH} levels deep" in readme
