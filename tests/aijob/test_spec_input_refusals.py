"""Specs that passed both the CRD schema and parse_spec, then were silently ignored in part or failed
in a way that charged honest volunteers: a runtimeEnv field Ray does not know, a NUL in the
entrypoint (and a driver Ray could not start), gpuMemoryMiB with no GPUs; and what the operator
says about them: the Unschedulable reason of a replicated job, the env_vars it sets."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_emulator.schema import admit
from koinon_operator.api import aijob
from koinon_operator.api.aijob import SpecError, parse_spec
from koinon_operator.scheduler import Gpu, JobRequest, NodeSnapshot, ReputationEvidence, schedule

from tests.aijob.fake_ray import Clock, FakeRay, failed_to_start, make_body, make_reconciler, step
from tests.aijob.test_runtime_env_failures import first_node_always_fails
from tests.aijob.test_verification_rounds import CopiesRay, reconciler, volunteers

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "manifests" / "crds" / "aijobs.koinon.dev.yaml"
SCHEMA = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = SCHEMA["properties"]["spec"]["properties"]


def _refused(spec: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as raised:
        parse_spec(spec)
    return raised.value


# --- 1. runtimeEnv fields Ray does not know ---------------------------------------------------------


def test_ray_silently_takes_an_unknown_runtime_env_key_as_a_plugin_and_sets_no_env_vars() -> None:
    """Why it matters: Ray does not refuse `envVars` (camelCase, as every other field of the spec);
    it treats it as a plugin name, warns in the node's runtime_env setup log, and runs the job
    without the variables."""
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(envVars={"EPOCHS": "3"})  # no exception at submission
    assert env.env_vars() == {}
    assert env.plugins() == [("envVars", {"EPOCHS": "3"})]


def test_the_operators_list_of_runtime_env_fields_is_rays() -> None:
    """The operator does not import ray; its lists must follow the Ray it is pinned to."""
    from ray.runtime_env import RuntimeEnv, RuntimeEnvConfig

    assert set(RuntimeEnv.known_fields) == aijob.RAY_RUNTIME_ENV_FIELDS
    assert set(RuntimeEnvConfig.known_fields) == aijob.RAY_RUNTIME_ENV_CONFIG_FIELDS


def test_the_operators_aliases_are_the_keyword_arguments_ray_renames() -> None:
    """The head reads a submitted runtime_env as RuntimeEnv(**runtime_env): a keyword argument of
    its constructor that is not a known field (`nsight`, as Ray's docs spell it) is Ray input too."""
    import inspect

    from ray.runtime_env import RuntimeEnv

    keywords = {
        name
        for name, parameter in inspect.signature(RuntimeEnv.__init__).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "_validate"  # an option, not a field
    }
    assert keywords - RuntimeEnv.known_fields == set(aijob.RAY_RUNTIME_ENV_ALIASES)
    for alias, field in aijob.RAY_RUNTIME_ENV_ALIASES.items():
        kwargs: dict[str, Any] = {alias: "default"}
        assert dict(RuntimeEnv(**kwargs)) == {field: "default"}


@pytest.mark.parametrize("runtime_env", [{"nsight": "default"}, {"rocprof_sys": "default"}, {"_nsight": "default"}])
def test_the_keyword_arguments_ray_renames_are_accepted(runtime_env: dict[str, Any]) -> None:
    assert parse_spec({"entrypoint": "python x.py", "runtimeEnv": runtime_env}).runtime_env == runtime_env


@pytest.mark.parametrize(
    ("runtime_env", "field", "hint"),
    [
        ({"envVars": {"EPOCHS": "3"}}, "spec.runtimeEnv.envVars", "did you mean env_vars?"),
        ({"workingDir": "s3://b/x.zip"}, "spec.runtimeEnv.workingDir", "did you mean working_dir?"),
        ({"pyModules": ["s3://b/m.zip"]}, "spec.runtimeEnv.pyModules", "did you mean py_modules?"),
        ({"pip_packages": ["numpy"]}, "spec.runtimeEnv.pip_packages", "known: conda, config, "),
        ({"config": {"setupTimeoutSeconds": 60}}, "spec.runtimeEnv.config.setupTimeoutSeconds",
         "did you mean setup_timeout_seconds?"),
    ],
)  # fmt: skip
def test_a_runtime_env_field_ray_does_not_know_is_refused_naming_it(
    runtime_env: dict[str, Any], field: str, hint: str
) -> None:
    error = _refused({"entrypoint": "python train.py", "runtimeEnv": runtime_env})
    assert error.field_path == field
    assert "not a Ray runtime_env" in error.message and hint in error.message, error.message


def test_every_field_ray_knows_is_accepted() -> None:
    runtime_env = {
        "env_vars": {"EPOCHS": "3"},
        "pip": ["numpy"],
        "working_dir": "s3://bucket/job.zip",
        "py_modules": ["s3://bucket/m.zip"],
        "excludes": ["*.ckpt"],
        "config": {"setup_timeout_seconds": 600, "eager_install": True},
    }
    assert parse_spec({"entrypoint": "python x.py", "runtimeEnv": runtime_env}).runtime_env == runtime_env


async def test_a_job_with_an_unknown_runtime_env_field_fails_as_invalid_before_ray_sees_it() -> None:
    spec = {"entrypoint": "python train.py", "runtimeEnv": {"envVars": {"EPOCHS": "3"}}}
    assert not admit({"spec": spec}, SCHEMA).causes  # the schema keeps it (preserve-unknown-fields)
    ray, clock = FakeRay(), Clock()
    body = make_body(spec)
    reconciler_ = make_reconciler(ray, clock)
    events = []
    for _ in range(3):
        events += (await step(reconciler_, body)).events
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec"), status
    assert status["message"].startswith("spec.runtimeEnv.envVars: not a Ray runtime_env field"), status["message"]
    assert any(e.type == "Warning" and "did you mean env_vars?" in e.message for e in events), events
    assert ray.submissions == []


# --- 2. an entrypoint no process can be given; a driver Ray could not start --------------------------


def test_what_ray_does_with_a_nul_in_the_entrypoint() -> None:
    # Ray's JobSupervisor runs the entrypoint with subprocess.Popen(entrypoint, shell=True): this
    # raises, and Ray marks the job FAILED with JOB_ENTRYPOINT_COMMAND_START_ERROR and no exit code.
    with pytest.raises(ValueError, match="null byte"):
        subprocess.Popen("python\x00 x.py", shell=True)


@pytest.mark.parametrize("entrypoint", ["python\x00 x.py", "\x00", "  \x00python x.py"])
def test_an_entrypoint_with_a_nul_is_refused_naming_the_field(entrypoint: str) -> None:
    assert _refused({"entrypoint": entrypoint}).field_path == "spec.entrypoint"
    # By the operator, not the CRD: a pattern tightened under existing objects fails their every
    # update before Kubernetes 1.30 (test_spec_ratcheting.py).
    assert not admit({"spec": {"entrypoint": entrypoint}}, SCHEMA).causes


def test_an_entrypoint_with_an_unpaired_surrogate_is_refused() -> None:
    # JSON "\ud800" (a real API server turns it into U+FFFD; a lax one may not): Popen cannot encode it.
    assert _refused({"entrypoint": "echo \ud800"}).field_path == "spec.entrypoint"


@pytest.mark.parametrize("entrypoint", ["python x.py", "  python -c 'print(1)'\n", "set -e\ncd /x && python t.py"])
def test_the_crd_pattern_still_takes_ordinary_command_lines(entrypoint: str) -> None:
    assert not admit({"spec": {"entrypoint": entrypoint}}, SCHEMA).causes
    parse_spec({"entrypoint": entrypoint})


@pytest.mark.parametrize("entrypoint", ["", "   ", " \n\t "])
def test_the_crd_pattern_still_refuses_a_blank_entrypoint(entrypoint: str) -> None:
    causes = admit({"spec": {"entrypoint": entrypoint}}, SCHEMA).causes
    assert {c.field for c in causes} == {"spec.entrypoint"}, causes


def test_the_crd_pattern_takes_linear_time() -> None:
    """A pattern that backtracks quadratically would hold the emulator (Python's re) on a long
    entrypoint ending in a NUL; Go's RE2 is linear anyway."""
    started = time.monotonic()
    for tail in ("\x00", " "):
        admit({"spec": {"entrypoint": "a" * 200_000 + tail}}, SCHEMA)
    assert time.monotonic() - started < 2.0


def test_a_nul_in_an_env_var_is_refused_without_quoting_the_value() -> None:
    error = _refused({"entrypoint": "x", "runtimeEnv": {"env_vars": {"TOKEN": "s3cr3t\x00"}}})
    assert error.field_path == "spec.runtimeEnv.env_vars.TOKEN"
    assert "s3cr3t" not in str(error)
    error = _refused({"entrypoint": "x", "runtimeEnv": {"env_vars": {"TO\x00KEN": "1"}}})
    assert error.field_path == "spec.runtimeEnv.env_vars"
    assert "\x00" not in str(error), str(error)  # quoted as 'TO\x00KEN', not as the character


def _traceback(exception_line: str) -> str:
    # Ray's message for this error type is traceback.format_exc() in JobSupervisor.run; raised
    # starting the entrypoint, it goes through _exec_entrypoint into subprocess.Popen.
    return (
        "Traceback (most recent call last):\n"
        '  File ".../ray/dashboard/modules/job/job_supervisor.py", line 380, in run\n'
        "    child_process = self._exec_entrypoint(env, log_path)\n"
        "                    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        '  File ".../ray/dashboard/modules/job/job_supervisor.py", line 182, in _exec_entrypoint\n'
        "    child_process = subprocess.Popen(\n"
        "                    ^^^^^^^^^^^^^^^^^\n"
        '  File "/usr/lib/python3.11/subprocess.py", line 1026, in __init__\n'
        "    self._execute_child(args, executable, preexec_fn, close_fds,\n"
        '  File "/usr/lib/python3.11/subprocess.py", line 1883, in _execute_child\n'
        "    self.pid = _fork_exec(\n"
        "               ^^^^^^^^^^^\n"
        f"{exception_line}\n"
    )


async def test_an_entrypoint_ray_refused_to_run_fails_the_job_at_once_and_charges_nobody() -> None:
    """Popen's ValueError (the NUL byte of a spec the operator took before it refused them) is the
    same on every node: rejected as a runtime_env Ray refuses is, not retried on volunteers."""
    body, reputation = await failed_to_start(_traceback("ValueError: embedded null byte"))
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "SubmitRejected"), status
    assert status["message"].endswith("its entrypoint could not be run: ValueError: embedded null byte")
    assert ("vn-1", "failure") not in reputation, reputation


async def test_a_driver_its_node_could_not_start_is_retried_and_not_charged_at_once() -> None:
    body, reputation = await failed_to_start(_traceback("BlockingIOError: [Errno 11] Resource temporarily unavailable"))
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "BackOff"), body["status"]
    assert body["status"]["failures"] == 1
    assert ("vn-1", "failure") not in reputation, reputation


async def test_a_node_that_cannot_start_a_driver_another_starts_is_tried_last_and_charged_once() -> None:
    """As a runtime_env that fails to set up: the volunteer pays once another node has started the
    same spec, not before (on a fleet where every node fails it, the spec is at fault)."""
    body, used, charged = await first_node_always_fails(
        "JOB_ENTRYPOINT_COMMAND_START_ERROR", _traceback("OSError: [Errno 28] No space left on device")
    )
    assert body["status"]["phase"] == "Succeeded", (used, body["status"])
    assert len(used) == 2 and used[1] != used[0], used
    assert charged == [(used[0], "failure")], charged


# --- 3. gpuMemoryMiB with no GPUs ------------------------------------------------------------------


def test_gpu_memory_with_no_gpus_is_refused_naming_gpu_memory() -> None:
    error = _refused({"entrypoint": "x", "resources": {"gpus": 0, "gpuMemoryMiB": 16000}})
    assert error.field_path == "spec.resources.gpuMemoryMiB"
    assert "gpus is 0" in error.message, error.message
    assert parse_spec({"entrypoint": "x", "resources": {"gpus": 0, "gpuMemoryMiB": 0}}).resources.gpus == 0
    assert parse_spec({"entrypoint": "x", "resources": {"gpuMemoryMiB": 16000}}).resources.gpu_memory_mib == 16000


def test_the_crd_leaves_the_gpu_memory_rule_to_the_operator() -> None:
    """A CEL rule added under existing objects fails their every update before Kubernetes 1.30
    (no validation ratcheting by default), status writes and the finalizer's removal included (CEL
    runs on the whole object): an AIJob that broke it could not even be deleted."""
    assert "x-kubernetes-validations" not in SPEC_SCHEMA["resources"]


# --- 4. what a replicated job needs distinct owners for ----------------------------------------------


def _node(name: str, owner: str) -> NodeSnapshot:
    return NodeSnapshot(
        name=name,
        owner=owner,
        region="eu",
        ready=True,
        cordoned=False,
        gpus=(Gpu("A", 24576),),
        free_gpus=1,
        cpus_free=8.0,
        rtt_ms=20.0,
        rtt_updated_at=10_000.0,
        reputation=ReputationEvidence(last_updated=10_000.0),
    )


def test_the_unschedulable_reason_of_a_replicated_job_counts_every_copy() -> None:
    nodes = [_node("n1", "alice"), _node("n2", "alice")]
    jobs = [
        JobRequest("ns/a-replicated", replicas=64, verification_quorum=9, creation_index=1),
        # Same shape in the same call (the reasons of a shape are computed once): its own words.
        JobRequest("ns/b-plain", replicas=64, creation_index=2),
    ]
    reasons = {u.job_key: u.reasons for u in schedule(jobs, nodes, 10_000.0).unschedulable}
    assert reasons["ns/a-replicated"] == {
        "fit, but only 1 distinct owners for 576 nodes (9 verification copies of 64 replicas)": 2
    }
    assert reasons["ns/b-plain"] == {"fit, but only 1 distinct owners for 64 replicas": 2}


async def test_the_job_status_says_what_a_replicated_job_needs() -> None:
    """Also while it is young enough to wait for a trusted node (32 GPU-hours by the default
    estimate): untrusted nodes cannot take it either, so it is not waiting for trust."""
    ray, clock = CopiesRay(["vn-a"]), Clock()
    rec = reconciler(ray, clock)
    body = make_body({"entrypoint": "x", "replicas": 64, "verification": {"mode": "replicated", "quorum": 9}})
    for _ in range(2):
        await step(rec, body, volunteers(ray.present))
    assert body["status"]["reason"] == "Unschedulable", body["status"]
    assert "576 nodes (9 verification copies of 64 replicas)" in body["status"]["message"], body["status"]


# --- 5. the env_vars the operator sets, as the README and kubectl explain name them ------------------


async def _operator_env_vars() -> set[str]:
    ray, clock = FakeRay(), Clock()
    rec = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "x", "runtimeEnv": {"env_vars": {"KOINON_MINE": "1", "EPOCHS": "3"}}})
    for _ in range(2):
        await step(rec, body)
    (submission,) = ray.submissions
    return set(submission.runtime_env["env_vars"]) - {"KOINON_MINE", "EPOCHS"}


async def test_the_readme_names_exactly_the_env_vars_the_operator_replaces() -> None:
    set_by_operator = await _operator_env_vars()
    readme = (ROOT / "README.md").read_text()
    start = readme.index("`runtimeEnv` goes to Ray's Job Submission API as written")
    paragraph = readme[start : readme.index("\n\n", start)]
    sentence = paragraph[: paragraph.index(". ") + 1]
    assert "KOINON_*" not in sentence, sentence  # a job's own KOINON_-names are passed as written
    assert set(re.findall(r"`(KOINON_[A-Z_]+|TRACEPARENT)`", sentence)) == set_by_operator, sentence


async def test_kubectl_explain_names_exactly_the_env_vars_the_operator_replaces() -> None:
    set_by_operator = await _operator_env_vars()
    described = " ".join(SPEC_SCHEMA["runtimeEnv"]["description"].split())
    assert "KOINON_*" not in described, described
    assert set(re.findall(r"\b(KOINON_[A-Z_]+|TRACEPARENT)\b", described)) == set_by_operator, described


def test_the_most_verification_copies_the_operator_looks_for_is_the_crds_quorum_maximum() -> None:
    """reconciler._stop_strays looks for an attempt's copies in Ray up to aijob.MAX_QUORUM: the
    API server refuses a quorum above the CRD's maximum, so no attempt runs more copies."""
    assert SPEC_SCHEMA["verification"]["properties"]["quorum"]["maximum"] == aijob.MAX_QUORUM
