"""The koinon-agent chart through the real helm v4 binary: lint, rendering, schema refusals."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from koinon_agent import cli, health, state
from koinon_agent.config import ENV_VARS
from koinon_gateway.pki import create_ca

from .helpers import (
    CHART,
    GATEWAY,
    TOKEN,
    Tools,
    agent_container,
    assert_refused,
    by_kind,
    env_map,
    helm_template,
    one,
    parse_documents,
    render,
)

pytestmark = pytest.mark.timeout(60)


def test_lint_passes(tools: Tools) -> None:
    result = tools.run(
        tools.helm,
        "lint",
        "--strict",
        str(CHART),
        "--set",
        f"gateway.address={GATEWAY}",
        "--set",
        f"joinToken.value={TOKEN}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_lint_without_required_values_names_gateway_address(tools: Tools) -> None:
    result = tools.run(tools.helm, "lint", str(CHART))
    assert result.returncode != 0
    assert "/gateway/address" in result.stdout + result.stderr


def test_default_render_is_one_recreate_deployment_without_service(tools: Tools) -> None:
    docs = render(tools)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "NetworkPolicy", "Secret", "ServiceAccount"]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    labels = deployment["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "koinon-agent"
    assert labels["app.kubernetes.io/instance"] == "vol"
    assert labels["app.kubernetes.io/part-of"] == "koinon"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    container = agent_container(deployment)
    assert "ports" not in container  # dials out only
    assert container["image"] == "koinon:0.2.0"
    assert container["command"] == ["tini", "--", "koinon-agent", "join"]
    for doc in docs:
        assert doc["metadata"]["namespace"] == "koinon-volunteer"


def test_env_vars_are_wired_and_known_to_the_agent(tools: Tools) -> None:
    ca_pem = create_ca().cert_pem.decode()
    docs = render(
        tools,
        {
            "node.name": "alice-desktop",
            "node.region": "eu-west",
            "gateway.tlsServerName": "koinon-gateway",
            "gpus.simulate": "2",
            "gpus.simulatedMemoryMiB": "8192",
            "agent.numCpus": "4",
            "agent.objectStoreMemory": "1073741824",
            "agent.proxyPort": "7999",
            "agent.drainGraceSeconds": "45",
            "agent.rayRestartAfterSeconds": "120",
            "terminationGracePeriodSeconds": "90",
            "gateway.caCertHash": "sha256:" + "ab" * 32,
        },
        extra=["--set-string", f"gateway.caCert={ca_pem}"],
    )
    deployment = one(docs, "Deployment")
    env = env_map(agent_container(deployment))
    assert set(env) - {"HOME"} <= set(ENV_VARS), "every KOINON_* variable the chart sets must be one the agent reads"
    values = {name: entry.get("value") for name, entry in env.items()}
    assert values["KOINON_GATEWAY"] == GATEWAY
    assert values["KOINON_NODE_NAME"] == "alice-desktop"
    assert values["KOINON_REGION"] == "eu-west"
    assert values["KOINON_TLS_SERVER_NAME"] == "koinon-gateway"
    assert values["KOINON_SIMULATE_GPUS"] == "2"
    assert values["KOINON_SIMULATE_GPU_MEMORY"] == "8192"
    assert values["KOINON_NUM_CPUS"] == "4"
    assert values["KOINON_OBJECT_STORE_MEMORY"] == "1073741824"
    assert values["KOINON_PROXY_PORT"] == "7999"
    assert values["KOINON_DRAIN_GRACE"] == "45"
    assert values["KOINON_RAY_RESTART_AFTER"] == "120"
    assert values["KOINON_CA_CERT_HASH"] == "sha256:" + "ab" * 32
    assert values["KOINON_STATE_DIR"] == "/var/lib/koinon-agent"
    assert "KOINON_INSECURE" not in env
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90
    # The CA: a ConfigMap mounted as the file KOINON_CA_FILE points at.
    configmap = one(docs, "ConfigMap")
    assert configmap["data"]["ca.crt"].strip() == ca_pem.strip()
    mounts = {m["name"]: m["mountPath"] for m in agent_container(deployment)["volumeMounts"]}
    assert values["KOINON_CA_FILE"] == mounts["gateway-ca"] + "/ca.crt"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["gateway-ca"]["configMap"]["name"] == configmap["metadata"]["name"]


def test_agent_reads_the_rendered_environment_into_its_configuration(
    tools: Tools, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the chart renders is what the agent's own CLI turns into its configuration."""
    docs = render(
        tools,
        {
            "gpus.simulate": "2",
            "gpus.simulatedMemoryMiB": "8192",
            "agent.numCpus": "4",
            "agent.objectStoreMemory": "1073741824",
            "agent.drainGraceSeconds": "45",
            "agent.rayRestartAfterSeconds": "120",
            "terminationGracePeriodSeconds": "90",
        },
    )
    env = env_map(agent_container(one(docs, "Deployment")))
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, entry in env.items():
        if "value" in entry:  # the token and node name come from the Secret / the downward API
            monkeypatch.setenv(name, entry["value"])
    monkeypatch.setenv("KOINON_TOKEN", TOKEN)
    config = cli.config_from_args(cli.build_parser().parse_args(["join"]))
    assert (config.gateway, config.token) == (GATEWAY, TOKEN)
    assert (config.simulate_gpus, config.simulate_gpu_memory_mib) == (2, 8192)
    assert (config.num_cpus, config.object_store_memory) == (4, 1073741824)
    assert (config.drain_grace_s, config.ray_restart_after_s) == (45.0, 120.0)
    assert str(config.state_dir) == env["KOINON_STATE_DIR"]["value"]


def test_probes_run_the_agents_own_health_check(tools: Tools, tmp_path: Path) -> None:
    container = agent_container(one(render(tools), "Deployment"))
    assert "ports" not in container  # exec probes: still nothing listens
    liveness = container["livenessProbe"]["exec"]["command"]
    readiness = container["readinessProbe"]["exec"]["command"]
    assert liveness == ["koinon-agent", "health", "--max-age", "30"]
    assert readiness == ["koinon-agent", "health", "--ready", "--max-age", "30"]
    # Exec probes run with the container's environment: the report's path comes from
    # KOINON_HEALTH_FILE, which is not on the state volume (that may turn read-only or full).
    rendered_env = {e["name"]: e.get("value") for e in container["env"]}
    health_file, state_dir = Path(rendered_env["KOINON_HEALTH_FILE"]), Path(rendered_env["KOINON_STATE_DIR"])
    assert not health_file.is_relative_to(state_dir)
    assert any(health_file.is_relative_to(m["mountPath"]) for m in container["volumeMounts"] if m["name"] == "tmp")
    report_file = tmp_path / "health.json"
    env = {**os.environ, "KOINON_STATE_DIR": str(tmp_path / "state"), "KOINON_HEALTH_FILE": str(report_file)}
    agent_bin = str(Path(sys.executable).parent / "koinon-agent")

    def probe(command: list[str]) -> int:
        return subprocess.run([agent_bin, *command[1:]], env=env, capture_output=True, timeout=30).returncode

    assert (probe(liveness), probe(readiness)) == (1, 1)  # no report yet
    health.write(report_file, health.HealthReport(time.time(), connected=True, ray_state="starting"))
    assert (probe(liveness), probe(readiness)) == (0, 1)  # alive, Ray not serving yet
    health.write(report_file, health.HealthReport(time.time(), connected=True, ray_state="running"))
    assert (probe(liveness), probe(readiness)) == (0, 0)
    health.write(report_file, health.HealthReport(time.time() - 60, connected=True, ray_state="running"))
    assert probe(liveness) == 1  # a stuck agent gets restarted

    # probes.failureThreshold is both probes' (values.yaml and the chart README say so).
    tuned = agent_container(one(render(tools, {"probes.failureThreshold": "7"}), "Deployment"))
    assert (tuned["livenessProbe"]["failureThreshold"], tuned["readinessProbe"]["failureThreshold"]) == (7, 7)

    off = agent_container(one(render(tools, {"probes.enabled": "false"}), "Deployment"))
    assert "livenessProbe" not in off and "readinessProbe" not in off


def test_node_name_defaults_to_the_kubernetes_node(tools: Tools) -> None:
    env = env_map(agent_container(one(render(tools), "Deployment")))
    assert env["KOINON_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_token_only_through_secret_key_ref(tools: Tools) -> None:
    result = helm_template(tools)
    docs = parse_documents(result.stdout)
    secret = one(docs, "Secret")
    assert base64.b64decode(secret["data"]["token"]).decode() == TOKEN
    env = env_map(agent_container(one(docs, "Deployment")))
    assert env["KOINON_TOKEN"] == {
        "name": "KOINON_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "token", "optional": True}},
    }
    # The token's plain text appears nowhere but (base64) in the Secret.
    assert TOKEN not in result.stdout
    assert not by_kind(docs, "ConfigMap")


def test_token_from_a_file_is_trimmed_and_a_bad_one_never_echoed(tools: Tools, tmp_path: Path) -> None:
    """`--set-file joinToken.value=token.txt` keeps the token out of shell history; the file ends
    in a newline, which the agent and the gateway drop, so the chart drops it too. A value that is
    not a token is refused without printing it (a schema pattern's error would, whole)."""
    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN + "\n")
    args = ("template", "vol", str(CHART), "--set", f"gateway.address={GATEWAY}")
    result = tools.run(tools.helm, *args, "--set-file", f"joinToken.value={token_file}")
    assert result.returncode == 0, result.stderr
    secret = one(parse_documents(result.stdout), "Secret")
    assert base64.b64decode(secret["data"]["token"]).decode() == TOKEN
    near_miss = TOKEN[:-1] + "G"  # one uppercase letter: a typo of a real token
    refused = tools.run(tools.helm, *args, "--set", f"joinToken.value={near_miss}")
    assert refused.returncode != 0 and "joinToken.value: not a join token" in refused.stderr
    assert near_miss.split(".")[1] not in refused.stderr


def test_existing_token_secret_is_referenced_not_created(tools: Tools) -> None:
    docs = render(
        tools, {"joinToken.value": None, "joinToken.existingSecret": "my-join", "joinToken.existingSecretKey": "jt"}
    )
    assert not by_kind(docs, "Secret")
    env = env_map(agent_container(one(docs, "Deployment")))
    assert env["KOINON_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "my-join", "key": "jt", "optional": True}


def test_security_context_non_root_unprivileged(tools: Tools) -> None:
    deployment = one(render(tools), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    context = agent_container(deployment)["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["privileged"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]
    assert "hostNetwork" not in pod and "hostPID" not in pod


def test_gpu_count_sets_limit_and_runtime_class(tools: Tools) -> None:
    docs = render(
        tools,
        {"gpus.count": "2", "runtimeClassName": "nvidia"},
        extra=["--set-string", "nodeSelector.nvidia\\.com/gpu\\.present=true"],
    )
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    resources = agent_container(deployment)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 2
    assert resources["limits"]["memory"] == "8Gi"  # user limits kept
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "KOINON_SIMULATE_GPUS" not in env_map(agent_container(deployment))


def test_no_gpu_limit_or_runtime_class_by_default(tools: Tools) -> None:
    pod = one(render(tools), "Deployment")["spec"]["template"]["spec"]
    assert "runtimeClassName" not in pod
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"].get("limits", {})


def test_daemonset_kind_with_host_path(tools: Tools) -> None:
    docs = render(tools, {"kind": "DaemonSet", "persistence.type": "hostPath", "tolerations[0].operator": "Exists"})
    assert not by_kind(docs, "Deployment")
    daemonset = one(docs, "DaemonSet")
    assert "replicas" not in daemonset["spec"] and "strategy" not in daemonset["spec"]
    assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    pod = daemonset["spec"]["template"]["spec"]
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state["hostPath"] == {"path": "/var/lib/koinon-agent", "type": "Directory"}
    assert pod["tolerations"] == [{"operator": "Exists"}]
    # A surge of 0 (or 0 %) keeps one agent per node during an update; it is the only one taken.
    for surge in ("0", "0%"):
        values: dict[str, str | None] = {
            "kind": "DaemonSet",
            "persistence.type": "hostPath",
            "updateStrategy.rollingUpdate.maxSurge": surge,
        }
        strategy = one(render(tools, values), "DaemonSet")["spec"]["updateStrategy"]
        assert strategy["rollingUpdate"]["maxSurge"] in (0, "0%")


def test_pvc_persistence_creates_a_kept_claim(tools: Tools) -> None:
    docs = render(
        tools, {"persistence.type": "pvc", "persistence.size": "1Gi", "persistence.storageClass": "local-path"}
    )
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert claim["spec"]["storageClassName"] == "local-path"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def install_notes(tools: Tools, values: dict[str, str]) -> str:
    """The NOTES `helm install vol --namespace ns1` prints with ``values`` (a dry run)."""
    settings = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    result = tools.run(tools.helm, "install", "vol", str(CHART), "--dry-run=client", "--namespace", "ns1", *settings)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


def test_notes_tell_how_to_check_the_node(tools: Tools) -> None:
    notes = install_notes(tools, {"gateway.address": GATEWAY, "joinToken.value": TOKEN})
    assert "kubectl --namespace ns1 logs -f deployment/vol-koinon-agent" in notes
    assert "kubectl get vn" in notes
    assert "emptyDir" in notes  # warns that the credential is not kept
    assert TOKEN not in notes


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"gateway.address": None}, "/gateway/address"),
        ({"gateway.address": "no-port"}, "/gateway/address"),
        ({"gateway.address": "gw.example.org:99999"}, "/gateway/address"),
        ({"gateway.address": "gw.example.org:0"}, "/gateway/address"),
        ({"gpus.count": "-1"}, "/gpus/count"),
        ({"gpus.simulate": "-2"}, "/gpus/simulate"),
        ({"joinToken.value": "not-a-token"}, "joinToken.value: not a join token"),
        ({"kind": "StatefulSet"}, "/kind"),
        ({"securityContext.privileged": "true"}, "/securityContext/privileged"),
        ({"podSecurityContext.runAsNonRoot": "false"}, "/podSecurityContext/runAsNonRoot"),
        ({"persistence.type": "nfs"}, "/persistence/type"),
        ({"gpus.cuont": "1"}, "cuont"),
        ({"joinToken.existingSecret": "my-join"}, "joinToken.value or joinToken.existingSecret, not both"),
        ({"joinToken.value": None}, "joinToken.value"),
        ({"terminationGracePeriodSeconds": "20"}, "terminationGracePeriodSeconds: 20 is too short"),
        ({"terminationGracePeriodSeconds": "45"}, "at least agent.drainGraceSeconds + 20 = 50"),
        ({"kind": "DaemonSet", "persistence.type": "pvc"}, "persistence.type: pvc needs kind: Deployment"),
        ({"gpus.count": "1", "gpus.simulate": "1"}, "gpus.count"),
        ({"gateway.insecure": "true", "gateway.caSecretName": "ca"}, "gateway.insecure"),
        ({"gateway.insecure": "true", "gateway.caCertHash": "sha256:" + "0" * 64}, "gateway.insecure"),
        ({"gateway.caCertHash": "sha256:ABC"}, "/gateway/caCertHash"),
        ({"agent.rayRestartAfterSeconds": "0"}, "/agent/rayRestartAfterSeconds"),
        ({"agent.drainGraceSeconds": "4294967296"}, "/agent/drainGraceSeconds"),  # DrainRequest's uint32
        ({"agent.rayRestartAfterSeconds": "0.5"}, "/agent/rayRestartAfterSeconds"),  # int64 made it 0
        ({"securityContext.runAsNonRoot": "false"}, "/securityContext/runAsNonRoot"),
        ({"securityContext.runAsUser": "0"}, "/securityContext/runAsUser"),
        ({"securityContext.capabilities.add[0]": "NET_ADMIN"}, "/securityContext/capabilities/add"),
        (
            {"kind": "DaemonSet", "persistence.type": "hostPath", "updateStrategy.rollingUpdate.maxSurge": "1"},
            "updateStrategy.rollingUpdate.maxSurge: 1",
        ),
        ({"probes.maxAgeSeconds": "5"}, "/probes/maxAgeSeconds"),
    ],
)
def test_bad_values_are_refused_naming_the_value(tools: Tools, values: dict[str, str | None], expected: str) -> None:
    assert_refused(tools, values, expected)


def test_large_numbers_from_a_values_file_render_as_integers(tools: Tools, tmp_path: Path) -> None:
    # Helm reads numbers in -f files as floats and prints 1e6 and up as "1e+06", which neither the
    # API server (terminationGracePeriodSeconds) nor the agent (its variables) would take.
    values = tmp_path / "big.yaml"
    values.write_text(
        "gpus: {simulate: 1, simulatedMemoryMiB: 8192000}\n"
        "agent: {drainGraceSeconds: 2000000, rayRestartAfterSeconds: 3000000}\n"
        "terminationGracePeriodSeconds: 4000000\nprobes: {maxAgeSeconds: 5000000}\n"
    )
    result = helm_template(tools, extra=["-f", str(values)])
    assert result.returncode == 0, result.stderr
    assert "e+0" not in result.stdout
    pod = one(parse_documents(result.stdout), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 4000000
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["KOINON_SIMULATE_GPU_MEMORY"] == "8192000" and env["KOINON_DRAIN_GRACE"] == "2000000"
    assert "5000000" in pod["containers"][0]["livenessProbe"]["exec"]["command"]


@pytest.mark.parametrize("persistence", ["pvc", "hostPath"])
def test_a_kept_state_dir_renders_without_a_join_token(tools: Tools, persistence: str) -> None:
    """Only the first join needs the token: a later `helm upgrade` of a joined volunteer, whose token
    has expired or been revoked since, must not have to pass the dead token on."""
    kind = "DaemonSet" if persistence == "hostPath" else "Deployment"
    values: dict[str, str | None] = {"joinToken.value": None, "persistence.type": persistence, "kind": kind}
    docs = render(tools, values)
    assert not by_kind(docs, "Secret")
    assert "KOINON_TOKEN" not in env_map(agent_container(one(docs, kind)))
    set_values = {key: value for key, value in values.items() if value}
    assert "The first join needs a join token" in install_notes(tools, {**set_values, "gateway.address": GATEWAY})


@pytest.mark.parametrize("persistence", ["emptyDir", "pvc", "hostPath"])
def test_the_agent_takes_the_state_dir_the_chart_mounts(tools: Tools, persistence: str) -> None:
    """The agent refuses a state dir others can change (state.check_private). What the kubelet
    makes of the chart's state volume, for the pod's securityContext as rendered, must pass:
    an emptyDir is root's, 0777 (2777 and group fsGroup with one); a PVC's root is root's, made
    g+rwx and setgid for fsGroup (2775 from ext4's 0755); a hostPath is made as values.yaml says
    (`install -d -o 10001 -g 10001 -m 0700`; the kubelet applies no fsGroup to it). Every one is
    a mount point, and fsGroup is among the agent's supplementary groups."""
    kind = "DaemonSet" if persistence == "hostPath" else "Deployment"
    pod = one(render(tools, {"persistence.type": persistence, "kind": kind}), kind)["spec"]["template"]["spec"]
    context = pod["securityContext"]
    uid, gid, fs_group = context["runAsUser"], context["runAsGroup"], context.get("fsGroup")
    volume = next(v for v in pod["volumes"] if v["name"] == "state")
    if "emptyDir" in volume:
        layout = (0, fs_group or 0, 0o2777 if fs_group is not None else 0o777)
    elif "persistentVolumeClaim" in volume:
        layout = (0, fs_group or 0, 0o2775 if fs_group is not None else 0o755)
    else:
        assert volume["hostPath"]["path"] == "/var/lib/koinon-agent"
        assert "install -d -o 10001 -g 10001 -m 0700 /var/lib/koinon-agent" in (CHART / "values.yaml").read_text()
        layout = (10001, 10001, 0o700)
    owner, group, mode = layout
    info = os.stat_result((stat.S_IFDIR | mode, 1, 1, 2, owner, group, 4096, 0, 0, 0))
    groups = {gid} | ({fs_group} if fs_group is not None else set())
    assert state.not_private(info, uid, groups, lambda: True) == ""
