"""manifests/gateway: what `kubectl kustomize manifests` renders for the gateway, checked against its CLI."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from koinon_gateway.kube_client import SERVICE_ACCOUNT_DIR
from koinon_gateway.main import build_parser

from .helpers import MANIFESTS, REPO, Manifest, Tools, parse_documents

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def rendered(tools: Tools) -> list[Manifest]:
    result = tools.run(tools.kubectl, "kustomize", str(MANIFESTS))
    assert result.returncode == 0, result.stderr
    return parse_documents(result.stdout)


def _find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _gateway_args(docs: list[Manifest]) -> list[str]:
    container = _find(docs, "Deployment", "koinon-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["koinon-gateway"]
    args: list[str] = container["args"]
    return args


def test_gateway_objects_in_koinon_system(rendered: list[Manifest]) -> None:
    gateway = [d for d in rendered if d["metadata"]["labels"].get("app.kubernetes.io/name") == "koinon-gateway"]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in gateway) == [
        ("ClusterRole", "koinon-gateway"),
        ("ClusterRoleBinding", "koinon-gateway"),
        ("Deployment", "koinon-gateway"),
        ("NetworkPolicy", "koinon-gateway"),
        ("Role", "koinon-gateway"),
        ("Role", "koinon-gateway-token-issuer"),
        ("RoleBinding", "koinon-gateway"),
        ("Service", "koinon-gateway"),
        ("Service", "koinon-gateway-internal"),
        ("ServiceAccount", "koinon-gateway"),
    ]
    for doc in gateway:
        if not doc["kind"].startswith("Cluster"):
            assert doc["metadata"]["namespace"] == "koinon-system"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "koinon"


def test_every_flag_is_one_the_gateway_knows(rendered: list[Manifest]) -> None:
    known = {option for action in build_parser()._actions for option in action.option_strings}
    for arg in _gateway_args(rendered):
        assert arg.split("=", 1)[0] in known, f"koinon-gateway has no flag {arg}"


def test_gateway_args_parse(rendered: list[Manifest]) -> None:
    # $(VAR) is expanded by the kubelet from the container's env.
    args = [re.sub(r"\$\((\w+)\)", "value", arg) for arg in _gateway_args(rendered)]
    parsed = build_parser().parse_args(args)
    assert parsed.store == "kube"
    assert parsed.listen == "0.0.0.0:7443"


def test_services_split_public_and_cluster_only_ports(rendered: list[Manifest]) -> None:
    deployment = _find(rendered, "Deployment", "koinon-gateway")
    container_ports = {
        p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    args = _gateway_args(rendered)
    assert f"--listen=0.0.0.0:{container_ports['agents']}" in args
    assert f"--admin-listen=0.0.0.0:{container_ports['admin']}" in args
    # The head-side CONNECT proxy serves only the Ray head container of the same pod.
    assert "--head-proxy-listen=127.0.0.1:7480" in args
    assert "--head-address=127.0.10.1" in args
    public = _find(rendered, "Service", "koinon-gateway")["spec"]
    assert public["type"] in ("LoadBalancer", "NodePort")
    assert [p["targetPort"] for p in public["ports"]] == ["agents"]
    internal = _find(rendered, "Service", "koinon-gateway-internal")["spec"]
    assert internal["type"] == "ClusterIP"
    assert sorted(p["targetPort"] for p in internal["ports"]) == ["admin"]
    for service in (public, internal):
        assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_ray_head_runs_beside_the_gateway_behind_its_proxy(rendered: list[Manifest]) -> None:
    pod = _find(rendered, "Deployment", "koinon-gateway")["spec"]["template"]["spec"]
    head = next(c for c in pod["containers"] if c["name"] == "ray-head")
    env = {e["name"]: e.get("value") for e in head["env"]}
    assert env["grpc_proxy"] == "http://127.0.0.1:7480" and env["RAY_grpc_enable_http_proxy"] == "1"
    assert env["RAY_AUTH_MODE"] == "token"
    assert "--node-ip-address=127.0.10.1" in head["command"] and "--num-cpus=0" in head["command"]
    gateway_ports = next(a for a in _gateway_args(rendered) if a.startswith("--head-ports=")).split("=", 1)[1]
    for flag in ("--node-manager-port=6380", "--object-manager-port=6381"):
        assert flag in head["command"] and flag.split("=")[1] in gateway_ports.split(",")
    # The head's dashboard agent serves the head alone (Ray dials a node's agent from the head only).
    for flag in ("--dashboard-agent-grpc-port=6382", "--dashboard-agent-listen-port=6383"):
        assert flag in head["command"] and flag.split("=")[1] not in gateway_ports.split(",")
    assert "--min-worker-port=10002" in head["command"] and "10002-10100" in gateway_ports
    dashboard = _find(rendered, "Service", "koinon-ray-head")["spec"]
    assert dashboard["selector"] == {"app.kubernetes.io/name": "koinon-gateway"}


def test_probes_and_security(rendered: list[Manifest]) -> None:
    deployment = _find(rendered, "Deployment", "koinon-gateway")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert pod["serviceAccountName"] == "koinon-gateway"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_rbac_is_least_privilege(rendered: list[Manifest]) -> None:
    # Each verb is one the gateway server calls (kube_tokens.py, kube_ca.py, kube_registry.py):
    # delete on Secrets is the expired-token cleaner, patch brings a changed --bootstrap-token's
    # Secret to the flag's values (test_deploy_gateway_rbac.py records the calls). The ConfigMap
    # that publishes the CA's certificate: created when absent, then read, updated, and deleted to
    # be created again where it cannot be updated (planted immutable), by name only.
    role = _find(rendered, "Role", "koinon-gateway")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "create", "update", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["koinon-gateway-ca-cert"],
            "verbs": ["get", "update", "delete"],
        },
    ]
    cluster_role = _find(rendered, "ClusterRole", "koinon-gateway")
    assert cluster_role["rules"] == [
        {
            "apiGroups": ["koinon.dev"],
            "resources": ["volunteernodes"],
            "verbs": ["get", "list", "watch", "create", "delete"],
        },
        {"apiGroups": ["koinon.dev"], "resources": ["volunteernodes/status"], "verbs": ["patch"]},
    ]
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        binding = _find(rendered, kind, "koinon-gateway")
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "koinon-gateway", "namespace": "koinon-system"}
        ]
        assert binding["roleRef"]["name"] == "koinon-gateway"


def test_token_issuers_get_no_secret_read(rendered: list[Manifest]) -> None:
    """`koinon-gateway token create|ca-hash` users: the published CA certificate by name, and
    Secret create (a join token), which returns no other Secret; nothing that reads a Secret
    (get, list, watch, and update/patch, whose reply is the whole object), so not the CA Secret
    with its private key and credential-signing key. Bound to no one (test_deploy_gateway_rbac.py
    runs the commands under it)."""
    role = _find(rendered, "Role", "koinon-gateway-token-issuer")
    assert role["metadata"]["namespace"] == "koinon-system"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["koinon-gateway-ca-cert"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]
    bindings = [d for d in rendered if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert not [b for b in bindings if b["roleRef"]["name"] == "koinon-gateway-token-issuer"]


def test_only_the_gateway_container_gets_the_service_account_token(rendered: list[Manifest]) -> None:
    # The Ray head runs code volunteers can place on it (a num_cpus=0 task pinned to the head): it
    # must not hold the gateway's Kubernetes credentials.
    pod = _find(rendered, "Deployment", "koinon-gateway")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    projected = {v["name"]: v["projected"] for v in pod["volumes"] if "projected" in v}
    token_volumes = [
        name for name, p in projected.items() if any("serviceAccountToken" in source for source in p["sources"])
    ]
    assert token_volumes == ["kube-api-access"]
    sources = projected["kube-api-access"]["sources"]
    assert {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}} in sources
    assert {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in sources
    namespace_items = [item for s in sources if "downwardAPI" in s for item in s["downwardAPI"]["items"]]
    assert namespace_items == [
        {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
    ]
    mounts = {
        c["name"]: [m for m in c.get("volumeMounts", []) if m["name"] in token_volumes] for c in pod["containers"]
    }
    assert mounts.pop("gateway") == [
        {"name": "kube-api-access", "mountPath": str(SERVICE_ACCOUNT_DIR), "readOnly": True}
    ]
    assert mounts == {"ray-head": []}
    assert not pod.get("initContainers")


def _ports_of(rule: Manifest) -> list[tuple[str, int]]:
    return [(p["protocol"], p["port"]) for p in rule["ports"]]


def test_network_policy_opens_the_services_ports_only(rendered: list[Manifest]) -> None:
    deployment = _find(rendered, "Deployment", "koinon-gateway")
    pod = deployment["spec"]["template"]["spec"]
    container_ports = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c["ports"]}
    assert container_ports == {"agents": 7443, "admin": 7481, "dashboard": 8265}
    policy = _find(rendered, "NetworkPolicy", "koinon-gateway")
    assert policy["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}
    # Egress too: test_network_policy_limits_egress_to_dns_and_the_api_server.
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    rules = {port: rule for rule in spec["ingress"] for _, port in _ports_of(rule)}
    assert all(len(rule["ports"]) == 1 and rule["ports"][0]["protocol"] == "TCP" for rule in spec["ingress"])
    assert sorted(rules) == sorted(container_ports.values())
    # Each Service's target port is open, and to whom it should be.
    for service_name in ("koinon-gateway", "koinon-gateway-internal", "koinon-ray-head"):
        for port in _find(rendered, "Service", service_name)["spec"]["ports"]:
            assert container_ports[port["targetPort"]] in rules, f"{service_name} port {port['name']} is closed"
    assert "from" not in rules[container_ports["agents"]]  # volunteers, from anywhere
    operator_labels = _find(rendered, "Deployment", "koinon-operator")["spec"]["template"]["metadata"]["labels"]
    [operator_peer] = rules[container_ports["dashboard"]]["from"]
    assert set(operator_peer) == {"podSelector"}  # the policy's own namespace, koinon-system
    assert operator_peer["podSelector"]["matchLabels"].items() <= operator_labels.items()
    monitoring = {"koinon.dev/gateway-metrics": "true"}
    assert rules[container_ports["admin"]]["from"] == [
        {"namespaceSelector": {"matchLabels": monitoring}},
        {"podSelector": {"matchLabels": monitoring}},
    ]


def test_ray_head_ports_are_not_opened_to_other_pods(rendered: list[Manifest]) -> None:
    pod = _find(rendered, "Deployment", "koinon-gateway")["spec"]["template"]["spec"]
    head = next(c for c in pod["containers"] if c["name"] == "ray-head")
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in head["command"] if "=" in arg)
    ray_ports = {
        int(value) for name, value in flags.items() if name.endswith("port") and name != "dashboard-port"
    }  # --port (GCS), --node-manager-port, ...
    ray_ports |= set(range(int(flags["min-worker-port"]), int(flags["max-worker-port"]) + 1))
    assert {6379, 6380, 6381, 6382, 6383, 6384, 6385, 10001, 10002, 10100} <= ray_ports
    assert 7480 not in ray_ports  # the head proxy: loopback only, never in the policy either
    policy = _find(rendered, "NetworkPolicy", "koinon-gateway")["spec"]
    opened = {port for rule in policy["ingress"] for _, port in _ports_of(rule)}
    assert opened == {7443, 7481, int(flags["dashboard-port"])}
    assert not opened & (ray_ports | {7480})


METADATA_ADDRESSES = ("169.254.169.254", "fd00:ec2::254")  # cloud metadata (node credentials)


def _allows(peer: Manifest, address: str) -> bool:
    """Whether an egress peer's ipBlock takes in ``address`` (pod and namespace selectors match
    pods only, never the metadata service)."""
    if "ipBlock" not in peer:
        return False
    ip = ipaddress.ip_address(address)
    block = peer["ipBlock"]
    if ip not in ipaddress.ip_network(block["cidr"]):  # an address of the other family is not in it
        return False
    return not any(ip in ipaddress.ip_network(cidr) for cidr in block.get("except", []))


def test_the_pod_running_the_ray_head_has_its_egress_limited(rendered: list[Manifest]) -> None:
    """The head runs code any volunteer can place there (README: "run tasks ... on the head"); no
    policy on that pod's egress would let such a task reach the cloud metadata service, every pod
    and Service of the cluster, and the API server."""
    deployment = _find(rendered, "Deployment", "koinon-gateway")
    pod = deployment["spec"]["template"]
    assert "ray-head" in {c["name"] for c in pod["spec"]["containers"]}  # volunteer-schedulable code runs here
    labels = pod["metadata"]["labels"]
    egress_policies = [
        d
        for d in rendered
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
        and "Egress" in d["spec"].get("policyTypes", [])
    ]
    assert egress_policies, "no NetworkPolicy limits the egress of the pod that runs the Ray head"


def test_network_policy_limits_egress_to_dns_and_the_api_server(rendered: list[Manifest]) -> None:
    egress = _find(rendered, "NetworkPolicy", "koinon-gateway")["spec"]["egress"]
    for rule in egress:  # a rule without ports or peers would open every port or every address
        assert rule.get("ports") and rule.get("to"), rule
    dns, api = egress
    assert sorted(_ports_of(dns)) == [("TCP", 53), ("UDP", 53)]
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    # The API server, whose address static manifests do not know: any, less link-local.
    # Where the API server listens: 443/6443 (kubeadm, k3s, clouds), 8443 (minikube), 16443 (MicroK8s).
    assert sorted(_ports_of(api)) == [("TCP", 443), ("TCP", 6443), ("TCP", 8443), ("TCP", 16443)]
    assert all(set(peer) == {"ipBlock"} for peer in api["to"])
    for address in ("10.96.0.1", "172.18.0.2", "fd00:10:96::1"):  # Service and API server addresses
        assert any(_allows(peer, address) for peer in api["to"]), address
    for address in METADATA_ADDRESSES:
        assert not any(_allows(peer, address) for rule in egress for peer in rule["to"]), address


def test_the_pods_own_traffic_stays_on_loopback(rendered: list[Manifest]) -> None:
    """What the egress policy leaves out, the pod must not need: the head reaches volunteers through
    the gateway's proxy on loopback, at loopback virtual addresses; neither container exports
    traces (OTEL_*) or uses a proxy elsewhere."""
    pod = _find(rendered, "Deployment", "koinon-gateway")["spec"]["template"]["spec"]
    head = next(c for c in pod["containers"] if c["name"] == "ray-head")
    env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env", [])}
    assert not [name for name in env if name.startswith("OTEL_")]
    assert urllib.parse.urlsplit(env["grpc_proxy"] or "").hostname == "127.0.0.1"
    assert not {"http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"} & set(env)
    loopback = ipaddress.ip_network("127.0.0.0/8")
    args = dict(a.removeprefix("--").split("=", 1) for a in _gateway_args(rendered) if "=" in a)
    assert ipaddress.ip_network(args["vip-cidr"]).subnet_of(loopback)  # type: ignore[arg-type]
    assert ipaddress.ip_address(args["head-address"]) in loopback
    assert "--disable-usage-stats" in head["command"]


def test_ray_tmp_is_bounded(rendered: list[Manifest]) -> None:
    """A runaway on the head (a pinned task spilling objects or writing logs) evicts this pod rather
    than filling the node's disk; a normal head's --temp-dir holds far less (about 2 MB once started)."""
    pod = _find(rendered, "Deployment", "koinon-gateway")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["ray-tmp"]["emptyDir"] == {"sizeLimit": "10Gi"}
    head = next(c for c in pod["containers"] if c["name"] == "ray-head")
    assert "--temp-dir=/tmp/ray" in head["command"]
    assert {"name": "ray-tmp", "mountPath": "/tmp"} in head["volumeMounts"]


READ_ONLY_ROOT_SCRIPT = r"""
set -eu
project="$1"; shift
mount --make-rprivate /
mount --bind / / && mount -o remount,bind,ro /
# The ray-tmp emptyDir on /tmp. A checkout under /tmp (a CI clone) stays visible in it, read-only
# like the rest of the image.
original=/mnt  # any directory outside /tmp: the bind stays in this mount namespace
mount --bind /tmp "$original"
mount -t tmpfs -o size=1g tmpfs /tmp
case "$project" in
  /tmp/*) mkdir -p "$project" && mount --bind "$original/${project#/tmp/}" "$project" ;;
esac
ip link set lo up
if touch /.koinon-write-probe 2>/dev/null; then echo "root is writable"; exit 3; fi
mkdir -p /tmp/auth && python -c "import secrets; print(secrets.token_hex(32))" > /tmp/auth/token
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/auth/token
"$@" > /tmp/head.log 2>&1 &
for _ in $(seq 120); do ray job list --address http://127.0.0.1:8265 >/dev/null 2>&1 && break; sleep 0.5; done
ray job submit --address http://127.0.0.1:8265 -- python -c "print('job ran on a read-only root')"
# The container's probes, as the kubelet sends them (port/path; no Ray token).
for probe in $PROBES; do
  python -c "$PROBE_CODE" "$probe"
done
! grep -rli "read-only file system" /tmp/ray/session_latest/logs /tmp/head.log
"""


PROBES = ("readinessProbe", "livenessProbe")
PROBE_CODE = (
    "import sys, urllib.request as u; r = u.urlopen('http://127.0.0.1:' + sys.argv[1], timeout=5); "
    "print('probe', sys.argv[1], r.status, r.read().decode())"
)


@pytest.mark.timeout(240)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_the_ray_head_command_runs_on_a_read_only_root(rendered: list[Manifest]) -> None:
    """The manifest sets readOnlyRootFilesystem for the Ray head: its own command, run on a
    read-only root with /tmp writable (in a mount, network and PID namespace of its own), serves a job."""
    pod = _find(rendered, "Deployment", "koinon-gateway")["spec"]["template"]["spec"]
    head = next(c for c in pod["containers"] if c["name"] == "ray-head")
    assert head["securityContext"]["readOnlyRootFilesystem"] is True
    assert [m["mountPath"] for m in head["volumeMounts"] if m["name"] == "ray-tmp"] == ["/tmp"]
    command = [arg.replace("--dashboard-host=0.0.0.0", "--dashboard-host=127.0.0.1") for arg in head["command"]]
    ports = {port["name"]: port["containerPort"] for port in head["ports"]}
    probes = sorted({f"{ports[head[p]['httpGet']['port']]}{head[p]['httpGet']['path']}" for p in PROBES})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PROBES": " ".join(probes)}
    env["PROBE_CODE"] = PROBE_CODE
    result = subprocess.run(
        # A PID namespace of its own too: the head's processes end with the script (the kernel kills
        # them with its init), and nothing here can stop another Ray on the host. `ray stop` did:
        # it finds Ray's processes by name, every one the host runs (a developer's `koinon dev up`).
        ["unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", READ_ONLY_ROOT_SCRIPT,
         "head", str(REPO), *command],
        capture_output=True, text=True, timeout=200, env=env, cwd="/",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "job ran on a read-only root" in output and re.search(r"Job '\S+' succeeded", output), output[-2000:]
    assert probes == ["8265/api/gcs_healthz"]
    assert "probe 8265/api/gcs_healthz 200 success" in output, output[-2000:]
