"""Rendered chart and manifests/ applied with the real kubectl to the Kubernetes API emulator.

The emulator takes no protobuf bodies, so `helm install` cannot talk to it: `helm template |
kubectl apply -f -` is used instead. It serves Deployments and NetworkPolicies (stored, not
enforced) but not DaemonSets or PVCs, so the DaemonSet kind and persistence.type=pvc are covered
by the rendering tests only, and what the NetworkPolicies allow by theirs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .helpers import MANIFESTS, Tools, helm_template, parse_documents

pytestmark = pytest.mark.timeout(60)


def kubectl(tools: Tools, kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    result = tools.run(tools.kubectl, *args, stdin=stdin, kubeconfig=kubeconfig)
    assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
    return result.stdout


def test_manifests_apply_and_read_back(tools: Tools, emulator_kubeconfig: Path) -> None:
    documents = parse_documents(kubectl(tools, emulator_kubeconfig, "kustomize", str(MANIFESTS)))
    [policy] = [d for d in documents if d["kind"] == "NetworkPolicy"]
    rendered = yaml.safe_dump_all(documents)
    out = kubectl(tools, emulator_kubeconfig, "apply", "-f", "-", stdin=rendered)
    assert "deployment.apps/koinon-gateway created" in out
    assert "service/koinon-gateway created" in out
    assert "networkpolicy.networking.k8s.io/koinon-gateway created" in out
    stored = json.loads(
        kubectl(tools, emulator_kubeconfig, "get", "netpol", "koinon-gateway", "-n", "koinon-system", "-o", "json")
    )
    assert stored["spec"] == policy["spec"]
    deployment = json.loads(
        kubectl(tools, emulator_kubeconfig, "get", "deployment", "koinon-gateway", "-n", "koinon-system", "-o", "json")
    )
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "koinon-gateway"
    services = json.loads(
        kubectl(
            tools,
            emulator_kubeconfig,
            "get",
            "services",
            "-n",
            "koinon-system",
            "-l",
            "app.kubernetes.io/name=koinon-gateway",
            "-o",
            "json",
        )
    )
    assert sorted(s["metadata"]["name"] for s in services["items"]) == ["koinon-gateway", "koinon-gateway-internal"]
    role = json.loads(
        kubectl(tools, emulator_kubeconfig, "get", "role", "koinon-gateway", "-n", "koinon-system", "-o", "json")
    )
    assert role["rules"][0]["resources"] == ["secrets"]
    # Applying again changes nothing.
    again = kubectl(tools, emulator_kubeconfig, "apply", "-f", "-", stdin=rendered)
    assert "deployment.apps/koinon-gateway unchanged" in again
    assert "networkpolicy.networking.k8s.io/koinon-gateway unchanged" in again


def test_chart_applies_and_reads_back(tools: Tools, emulator_kubeconfig: Path) -> None:
    kubectl(
        tools,
        emulator_kubeconfig,
        "apply",
        "-f",
        "-",
        stdin='{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"volunteer"}}',
    )
    result = helm_template(tools, {"gpus.simulate": "1", "node.region": "eu-west"}, namespace="volunteer")
    assert result.returncode == 0, result.stderr
    documents = parse_documents(result.stdout)
    [policy] = [d for d in documents if d["kind"] == "NetworkPolicy"]
    out = kubectl(tools, emulator_kubeconfig, "apply", "-f", "-", stdin=result.stdout)
    assert "deployment.apps/vol-koinon-agent created" in out
    assert "networkpolicy.networking.k8s.io/vol-koinon-agent created" in out
    stored = json.loads(
        kubectl(tools, emulator_kubeconfig, "get", "netpol", "vol-koinon-agent", "-n", "volunteer", "-o", "json")
    )
    assert stored["spec"]["egress"] == policy["spec"]["egress"]
    assert stored["spec"]["policyTypes"] == ["Ingress", "Egress"]
    deployment = json.loads(
        kubectl(tools, emulator_kubeconfig, "get", "deployment", "vol-koinon-agent", "-n", "volunteer", "-o", "json")
    )
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KOINON_REGION"]["value"] == "eu-west"
    assert env["KOINON_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "vol-koinon-agent-join-token"
    names = kubectl(
        tools,
        emulator_kubeconfig,
        "get",
        "secret,serviceaccount",
        "-n",
        "volunteer",
        "-l",
        "app.kubernetes.io/instance=vol",
        "-o",
        "name",
    )
    assert sorted(names.split()) == ["secret/vol-koinon-agent-join-token", "serviceaccount/vol-koinon-agent"]
