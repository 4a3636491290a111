"""Typed views of an AIJob's spec and status.

The API server (or the emulator) already enforces the OpenAPI schema; ``parse_spec`` re-checks the
fields the operator depends on so that a spec that slipped past a lax server (or an old object)
fails with the field named instead of a KeyError deep in a handler.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from koinon_operator.api.constants import Phase


class SpecError(ValueError):
    """An AIJob spec the operator cannot act on; ``field`` is the path, like the API server's."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field_path = field_path
        self.message = message


@dataclass(frozen=True)
class Resources:
    gpus: int = 1
    gpu_memory_mib: int = 0
    cpus: float = 1.0


@dataclass(frozen=True)
class Constraints:
    min_reputation: float = 0.0
    max_latency_ms: int | None = None
    regions: tuple[str, ...] = ()


# The CRD's maximum for spec.verification.quorum (the API server refuses more): no attempt runs more
# verification copies (reconciler._stop_strays looks for copy ids up to it).
MAX_QUORUM = 9


@dataclass(frozen=True)
class Verification:
    mode: str = "none"
    quorum: int = 3


@dataclass(frozen=True)
class AIJobSpec:
    entrypoint: str
    runtime_env: Mapping[str, Any] = field(default_factory=dict)
    replicas: int = 1
    resources: Resources = Resources()
    constraints: Constraints = Constraints()
    verification: Verification = Verification()
    backoff_limit: int = 2
    active_deadline_seconds: int | None = None
    suspend: bool = False
    ttl_seconds_after_finished: int | None = None
    expected_duration_seconds: int | None = None
    """The submitter's run-time estimate on an RTX 4090-class GPU: weighs placement, never a limit."""


def _int(raw: Mapping[str, Any], key: str, path: str, default: int | None, minimum: int) -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}.{key}", f"must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise SpecError(f"{path}.{key}", f"must be >= {minimum}, got {value}")
    return value


def _required_int(raw: Mapping[str, Any], key: str, path: str, default: int, minimum: int) -> int:
    value = _int(raw, key, path, default, minimum)
    assert value is not None  # a default is given
    return value


def _number(raw: Mapping[str, Any], key: str, path: str, default: float, low: float, high: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{path}.{key}", f"must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise SpecError(f"{path}.{key}", f"must be between {low} and {high}, got {value}")
    return float(value)


def _mapping(raw: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{path}.{key}", f"must be an object, got {type(value).__name__}")
    return value


# As the CRD's bounds (what a real API server checks at admission; the emulator runs no CEL).
MAX_ENV_VARS = 256
MAX_ENV_VAR_NAME = 256


# Ray 2.60's RuntimeEnv.known_fields (a test keeps them equal; the operator does not import ray). Ray
# takes any other key (but RAY_RUNTIME_ENV_ALIASES) as the name of a runtime_env plugin, and with
# none of that name installed it only warns in the volunteer's setup log and runs the job without
# it: `envVars` (camelCase, as the rest of the spec) gave a job no variables at all, silently.
RAY_RUNTIME_ENV_FIELDS = frozenset(
    {
        "py_modules",
        "py_executable",
        "java_jars",
        "working_dir",
        "conda",
        "pip",
        "uv",
        "container",
        "excludes",
        "env_vars",
        "_ray_release",
        "_ray_commit",
        "_inject_current_ray",
        "config",
        "worker_process_setup_hook",
        "_nsight",
        "_rocprof_sys",
        "image_uri",
    }
)
# Keyword arguments of Ray 2.60's RuntimeEnv(**runtime_env) (how the head reads a submitted
# runtime_env) that it stores under another name: `nsight` is the spelling Ray's docs use. A test
# keeps these equal to the constructor's keyword arguments that are not known_fields.
RAY_RUNTIME_ENV_ALIASES = {"nsight": "_nsight", "rocprof_sys": "_rocprof_sys"}
# Ray 2.60's RuntimeEnvConfig.known_fields: Ray drops any other key of runtime_env.config with a
# warning in the head's log only.
RAY_RUNTIME_ENV_CONFIG_FIELDS = frozenset({"setup_timeout_seconds", "eager_install", "log_files"})
RAY_RUNTIME_ENV_INPUT = RAY_RUNTIME_ENV_FIELDS | frozenset(RAY_RUNTIME_ENV_ALIASES)


def _did_you_mean(name: str, known: frozenset[str]) -> str:
    """The known name closest to ``name``, compared without case, '_' or '-' (envVars, workingDir
    are env_vars, working_dir); else the public names, so the user sees what there is."""
    folded = {field.lower().replace("_", ""): field for field in known}
    close = difflib.get_close_matches(name.lower().replace("_", "").replace("-", ""), folded, n=1)
    if close:
        return f"did you mean {folded[close[0]]}?"
    return "known: " + ", ".join(sorted(field for field in known if not field.startswith("_")))


def _check_runtime_env_fields(runtime_env: Mapping[str, Any]) -> None:
    """Refuse a key Ray would ignore (see RAY_RUNTIME_ENV_FIELDS) rather than run the job without it."""
    for name in runtime_env:
        if name not in RAY_RUNTIME_ENV_INPUT:
            raise SpecError(
                f"spec.runtimeEnv.{name}",
                f"not a Ray runtime_env field ({_did_you_mean(str(name), RAY_RUNTIME_ENV_INPUT)})",
            )
    config = runtime_env.get("config")
    if isinstance(config, Mapping):  # any other type: Ray refuses it at submission (SubmitRejected)
        for name in config:
            if name not in RAY_RUNTIME_ENV_CONFIG_FIELDS:
                raise SpecError(
                    f"spec.runtimeEnv.config.{name}",
                    f"not a Ray runtime_env config field ({_did_you_mean(str(name), RAY_RUNTIME_ENV_CONFIG_FIELDS)})",
                )


# Objects and arrays within one another in spec.runtimeEnv, itself counted (`{env_vars: {A: "1"}}`
# is 2). Ray's runtime_env fields are strings, lists of strings and shallow objects: its deepest,
# a conda environment (`conda: {dependencies: [{pip: [...]}]}`), is 5. The CRD keeps runtimeEnv as
# written (x-kubernetes-preserve-unknown-fields), so kube-apiserver stores it up to 10000 levels
# deep. Nothing the operator does with the spec before this check walks runtimeEnv below its
# first level, and after a refusal only the ratchet's digest of a placed job's spec does (json.dumps,
# as deep as main.RECURSION_LIMIT lets kopf decode). Ratcheted, as the refusal of a field Ray does
# not know: Ray ignored such a field (and so any depth in it) for earlier operators' jobs.
MAX_RUNTIME_ENV_DEPTH = 32


def _nesting_depth(value: object) -> int:
    """How many objects and arrays ``value`` holds within one another (0 for a scalar). Walked with
    a list, not by recursion: the value may be nested past Python's recursion limit."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, Mapping):
            children: Iterable[object] = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in children)
    return deepest


def _check_runtime_env_depth(runtime_env: Mapping[str, Any]) -> None:
    depth = _nesting_depth(runtime_env)
    if depth > MAX_RUNTIME_ENV_DEPTH:
        raise SpecError(
            "spec.runtimeEnv",
            f"nested {depth} levels deep (objects and arrays within one another), at most "
            f"{MAX_RUNTIME_ENV_DEPTH}: no Ray runtime_env field takes more than a few",
        )


def _check_env_vars(runtime_env: Mapping[str, Any]) -> None:
    """Ray takes ``env_vars`` only as strings to strings, and refuses anything else when the job
    starts, where it looks like a node failure. Values are never quoted back: they may be secrets."""
    env_vars = _mapping(runtime_env, "env_vars", "spec.runtimeEnv")
    if len(env_vars) > MAX_ENV_VARS:
        raise SpecError("spec.runtimeEnv.env_vars", f"at most {MAX_ENV_VARS} variables, got {len(env_vars)}")
    for name, value in env_vars.items():
        if not isinstance(name, str) or not name or "=" in name or len(name) > MAX_ENV_VAR_NAME:
            raise SpecError(
                "spec.runtimeEnv.env_vars",
                f"a name must be non-empty, at most {MAX_ENV_VAR_NAME} characters and free of '=', "
                f"got {str(name)[:64]!r}",
            )
        if not isinstance(value, str):
            raise SpecError(
                f"spec.runtimeEnv.env_vars.{name}",
                f'must be a string, got {type(value).__name__} (quote it in YAML: "3", not 3)',
            )


def _check_env_vars_executable(env_vars: Mapping[str, str]) -> None:
    """A process's environment is NUL-terminated strings, as its command line is. The name is
    quoted as repr (a NUL in a field path would reach status as is); the value never is."""
    for name, value in env_vars.items():
        if _unexecutable(name):
            raise SpecError("spec.runtimeEnv.env_vars", f"a name {CANNOT_EXEC}, got {name[:64]!r}")
        if _unexecutable(value):
            raise SpecError(f"spec.runtimeEnv.env_vars.{name}", CANNOT_EXEC)


# What no command line or environment of a process can carry (execve takes NUL-terminated UTF-8
# bytes): Python's Popen raises ValueError on it, in Ray's job supervisor on the volunteer, after
# the job was placed and submitted (JOB_ENTRYPOINT_COMMAND_START_ERROR).
CANNOT_EXEC = "must not contain a NUL character or an unpaired surrogate (no process can be given one)"


def _unexecutable(text: str) -> bool:
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")  # an unpaired surrogate (JSON "\ud800"): Popen cannot encode it
    except UnicodeEncodeError:
        return True
    return False


def parse_spec(raw: Mapping[str, Any]) -> AIJobSpec:
    """The spec, or SpecError naming the first field this operator refuses (every check, the
    ratcheted ones included: what a new job must pass)."""
    spec, refusal = parse_spec_ratcheting(raw)
    if refusal is not None:
        raise refusal
    return spec


def parse_spec_ratcheting(raw: Mapping[str, Any]) -> tuple[AIJobSpec, SpecError | None]:
    """The spec under the checks every operator version made (SpecError raised for those), and
    the first refusal of a ratcheted check (None: it passes them all).

    Ratcheted checks (Kubernetes' validation ratcheting): refusals added after earlier operators
    accepted, placed and ran such specs (an unknown runtimeEnv key, a runtimeEnv nested deeper than
    MAX_RUNTIME_ENV_DEPTH, a NUL, gpuMemoryMiB with no GPUs, more or longer regions than
    MAX_REGIONS/MAX_REGION_CHARS). parse_spec runs on every pass, so
    without ratcheting an operator upgrade stopped and failed running jobs nobody had edited. The
    reconciler applies them to a job not yet placed, and to an edit of one that was (see
    AIJobReconciler._ratchet)."""
    spec = _parse_spec(raw)
    try:
        _check_ratcheted(spec)
    except SpecError as refusal:
        return spec, refusal
    return spec, None


# Bounds of spec.constraints.regions, far above any real list: placement reports a job's regions in
# status, which must not grow with the spec. Checked here and not in the CRD, which adds no check an
# existing object could fail (before Kubernetes 1.30 such an object can no longer be updated).
MAX_REGIONS = 256
MAX_REGION_CHARS = 253


def _check_regions(regions: Sequence[str]) -> None:
    if len(regions) > MAX_REGIONS:
        raise SpecError("spec.constraints.regions", f"at most {MAX_REGIONS} regions, got {len(regions)}")
    for index, region in enumerate(regions):
        if len(region) > MAX_REGION_CHARS:
            raise SpecError(
                f"spec.constraints.regions[{index}]", f"at most {MAX_REGION_CHARS} characters, got {len(region)}"
            )


def _check_ratcheted(spec: AIJobSpec) -> None:
    if _unexecutable(spec.entrypoint):
        raise SpecError("spec.entrypoint", CANNOT_EXEC)
    # Ratcheted: earlier operators placed a job with any number of regions; it runs on.
    _check_regions(spec.constraints.regions)
    _check_runtime_env_depth(spec.runtime_env)
    _check_runtime_env_fields(spec.runtime_env)
    _check_env_vars_executable(_mapping(spec.runtime_env, "env_vars", "spec.runtimeEnv"))
    if spec.resources.gpus == 0 and spec.resources.gpu_memory_mib > 0:
        # Placement checks the memory of the GPUs a replica takes: with none, it would be ignored.
        raise SpecError(
            "spec.resources.gpuMemoryMiB",
            f"must be 0 when spec.resources.gpus is 0: it is the least memory of each GPU a replica "
            f"takes, and a replica of no GPUs takes none (got {spec.resources.gpu_memory_mib})",
        )


def _parse_spec(raw: Mapping[str, Any]) -> AIJobSpec:
    entrypoint = raw.get("entrypoint")
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        raise SpecError("spec.entrypoint", "required: the command Ray runs as the job driver")
    resources = _mapping(raw, "resources", "spec")
    constraints = _mapping(raw, "constraints", "spec")
    verification = _mapping(raw, "verification", "spec")
    regions = constraints.get("regions") or []
    if not isinstance(regions, list) or not all(isinstance(r, str) and r for r in regions):
        raise SpecError("spec.constraints.regions", "must be a list of non-empty strings")
    mode = verification.get("mode", "none")
    if mode not in ("none", "replicated"):
        raise SpecError("spec.verification.mode", f'must be "none" or "replicated", got {mode!r}')
    runtime_env = _mapping(raw, "runtimeEnv", "spec")
    _check_env_vars(runtime_env)
    suspend = raw.get("suspend", False)
    if not isinstance(suspend, bool):
        raise SpecError("spec.suspend", "must be a boolean")
    return AIJobSpec(
        entrypoint=entrypoint,
        runtime_env=dict(runtime_env),
        replicas=_required_int(raw, "replicas", "spec", 1, 1),
        resources=Resources(
            gpus=_required_int(resources, "gpus", "spec.resources", 1, 0),
            gpu_memory_mib=_required_int(resources, "gpuMemoryMiB", "spec.resources", 0, 0),
            cpus=_number(resources, "cpus", "spec.resources", 1.0, 0.0, 1024.0),
        ),
        constraints=Constraints(
            min_reputation=_number(constraints, "minReputation", "spec.constraints", 0.0, 0.0, 1.0),
            max_latency_ms=_int(constraints, "maxLatencyMs", "spec.constraints", None, 1),
            regions=tuple(regions),
        ),
        verification=Verification(
            mode=str(mode), quorum=_required_int(verification, "quorum", "spec.verification", 3, 2)
        ),
        backoff_limit=_required_int(raw, "backoffLimit", "spec", 2, 0),
        active_deadline_seconds=_int(raw, "activeDeadlineSeconds", "spec", None, 1),
        suspend=suspend,
        ttl_seconds_after_finished=_int(raw, "ttlSecondsAfterFinished", "spec", None, 0),
        expected_duration_seconds=_int(raw, "expectedDurationSeconds", "spec", None, 1),
    )


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def format_micro_time(moment: datetime) -> str:
    """RFC 3339 with microseconds (Kubernetes' MicroTime layout, fixed width so the strings still
    sort as times): startTime and completionTime bound the job's ``ray.job`` span, which whole
    seconds would cut by up to a second at either end."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _node_names(value: object) -> tuple[str, ...]:
    """A status list of node names, entries not of that shape skipped and repeats dropped (a
    hand-edited status must not stop the job)."""
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(dict.fromkeys(name for name in value if isinstance(name, str) and name))


def _whole_number(value: object) -> int | None:
    """A status integer, or None where it is absent or not one (a hand-edited status)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _earlier_results(verification: object) -> tuple[tuple[str, str, str], ...]:
    """verification.earlierResults as (node, owner, digest); entries not of that shape are skipped
    (a hand-edited status must not stop the job)."""
    entries = verification.get("earlierResults") if isinstance(verification, Mapping) else None
    if not isinstance(entries, list):
        return ()
    fields = ("node", "owner", "digest")
    return tuple(
        (entry["node"], entry["owner"], entry["digest"])
        for entry in entries
        if isinstance(entry, Mapping) and all(isinstance(entry.get(f), str) and entry.get(f) for f in fields)
    )


def _earlier_copies(verification: object) -> dict[str, tuple[tuple[str, str], ...]]:
    """(node, owner) of every node of each earlier copy of several replicas, by the node its vote
    was counted under (verification.earlierResults[].nodes and .owners, that node first). Copies
    of one node, and entries not of that shape, are left out: their voting node is the copy."""
    entries = verification.get("earlierResults") if isinstance(verification, Mapping) else None
    copies: dict[str, tuple[tuple[str, str], ...]] = {}
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, Mapping):
            continue
        nodes, owners = entry.get("nodes"), entry.get("owners")
        if not isinstance(nodes, list) or not isinstance(owners, list) or len(nodes) != len(owners) or not nodes:
            continue
        if not all(isinstance(x, str) and x for x in (*nodes, *owners)) or nodes[0] != entry.get("node"):
            continue
        copies[nodes[0]] = tuple(zip(nodes, owners, strict=True))
    return copies


# What of a kept result (extract_result's) an earlier answer carries: its value and log tail are
# bounded there already, and again here (a hand-edited status).
MAX_KEPT_VALUE = 2048
MAX_KEPT_LOG_TAIL = 4000


def _earlier_answers(verification: object) -> dict[str, dict[str, Any]]:
    """The result kept with an earlier answer (verification.earlierResults[].result), by its node:
    what the job reports if a later vote accepts that answer with no copy of its own attempt
    agreeing. Only a result whose digest is its entry's, with a string logTail (and value)."""
    entries = verification.get("earlierResults") if isinstance(verification, Mapping) else None
    kept: dict[str, dict[str, Any]] = {}
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("node"), str):
            continue
        result = entry.get("result")
        if not isinstance(result, Mapping) or not entry.get("digest") or result.get("digest") != entry.get("digest"):
            continue
        tail, value = result.get("logTail"), result.get("value")
        if not isinstance(tail, str) or (value is not None and not isinstance(value, str)):
            continue
        answer: dict[str, Any] = {"digest": result["digest"], "logTail": tail[-MAX_KEPT_LOG_TAIL:]}
        if value is not None:
            answer["value"] = value[:MAX_KEPT_VALUE]
        kept[entry["node"]] = answer
    return kept


@dataclass(frozen=True)
class AIJobStatus:
    """The part of ``status`` the lifecycle decides from."""

    phase: Phase | None = None
    attempts: int = 0
    failures: int = 0
    submission_id: str | None = None
    assigned_nodes: tuple[str, ...] = ()
    # The Ray node id each assigned node had when placed: a restarted agent's new Ray node carries
    # the same name, so only the id tells that the node the job ran on is gone.
    ray_node_ids: tuple[str, ...] = ()
    node_addresses: tuple[str, ...] = ()
    start_time: datetime | None = None
    completion_time: datetime | None = None
    trace_id: str | None = None
    copies: int = 1
    replicas_per_copy: int = 1
    # Nodes left out of later attempts: those whose copies gave no majority (verificationReruns).
    excluded_nodes: tuple[str, ...] = ()
    # Nodes lost mid-attempt (status.scheduling.lostNodes, oldest first): tried last on later
    # attempts, never left out (a volunteer whose agent restarted is the same machine, back).
    lost_nodes: tuple[str, ...] = ()
    # Owners left out of later attempts: those whose copies gave no majority.
    excluded_owners: tuple[str, ...] = ()
    owners: tuple[str, ...] = ()
    verification_reruns: int = 0
    # (node, owner, digest) of the copies that answered in earlier attempts without a majority:
    # judged again with each later attempt (verification.earlierResults).
    earlier_results: tuple[tuple[str, str, str], ...] = ()
    # Every (node, owner) of those earlier copies that ran on several nodes, by the node their vote
    # was counted under: each of them is judged by the copy's answer.
    earlier_copies: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # The result (digest, logTail, value) kept with an earlier answer, by its node: only with one
    # answer of the digest a majority of the earlier answers gave (the one that can win a later
    # vote without an agreeing copy of that attempt).
    earlier_answers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    scheduling: Mapping[str, Any] = field(default_factory=dict)
    # The metadata.generation whose spec the current (or, once finished, the last) attempt was
    # placed with (status.attemptGeneration); None for an attempt an older operator placed.
    attempt_generation: int | None = None

    def copy_nodes(self, copy: int) -> tuple[str, ...]:
        """Nodes of verification copy ``copy`` (assignedNodes holds the copies one after another)."""
        return self.assigned_nodes[copy * self.replicas_per_copy : (copy + 1) * self.replicas_per_copy]

    def copy_addresses(self, copy: int) -> tuple[str, ...]:
        return self.node_addresses[copy * self.replicas_per_copy : (copy + 1) * self.replicas_per_copy]

    def copies_by_voter(self) -> dict[str, tuple[tuple[str, str], ...]]:
        """(node, owner) of every node of each copy, this attempt's and the earlier attempts'
        (earlier_copies), by the node its vote is counted under (its first): each of them computed
        the copy's answer."""
        members = dict(self.earlier_copies)
        for k in range(self.copies):
            if nodes := self.copy_nodes(k):
                members[nodes[0]] = tuple((node, self.owner_of(node)) for node in nodes)
        return members

    def owner_of(self, node: str) -> str:
        for name, owner in zip(self.assigned_nodes, self.owners, strict=False):
            if name == node:
                return owner
        return node

    @classmethod
    def from_status(cls, raw: Mapping[str, Any] | None) -> AIJobStatus:
        raw = raw or {}
        phase_value = raw.get("phase")
        scheduling = raw.get("scheduling") or {}
        verification_reruns = int(raw.get("verificationReruns") or 0)
        excluded_nodes = tuple(scheduling.get("excludedNodes") or ())
        lost = _node_names(scheduling.get("lostNodes"))
        if not verification_reruns:
            # Operators before lostNodes put lost nodes in excludedNodes, where placement left
            # them out for good (a job whose only volunteer reconnected waited for ever). Without
            # a rerun for no majority, the only other writer of excludedNodes, every entry there
            # is such a lost node: tried last from now on, as lostNodes are.
            lost = tuple(dict.fromkeys((*_node_names(excluded_nodes), *lost)))
            excluded_nodes = ()
        return cls(
            phase=Phase(str(phase_value)) if phase_value in Phase._value2member_map_ else None,
            attempts=int(raw.get("attempts") or 0),
            failures=int(raw.get("failures") or 0),
            submission_id=raw.get("submissionId") or None,
            assigned_nodes=tuple(raw.get("assignedNodes") or ()),
            ray_node_ids=tuple(str(i) for i in raw.get("rayNodeIds") or () if isinstance(i, str)),
            node_addresses=tuple(scheduling.get("addresses") or ()),
            start_time=parse_time(raw.get("startTime")),
            completion_time=parse_time(raw.get("completionTime")),
            trace_id=raw.get("traceId") or None,
            copies=int(scheduling.get("copies") or 1),
            # Without scheduling.replicas (a status written by hand), the copies share the nodes.
            replicas_per_copy=int(
                scheduling.get("replicas")
                or max(1, len(raw.get("assignedNodes") or [1]) // max(1, int(scheduling.get("copies") or 1)))
            ),
            excluded_nodes=excluded_nodes,
            lost_nodes=lost,
            excluded_owners=tuple(scheduling.get("excludedOwners") or ()),
            owners=tuple(scheduling.get("owners") or ()),
            verification_reruns=verification_reruns,
            earlier_results=_earlier_results(raw.get("verification")),
            earlier_copies=_earlier_copies(raw.get("verification")),
            earlier_answers=_earlier_answers(raw.get("verification")),
            scheduling=dict(scheduling),
            attempt_generation=_whole_number(raw.get("attemptGeneration")),
        )
