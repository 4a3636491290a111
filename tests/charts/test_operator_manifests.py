"""manifests/operator (and what both pods share): what `kubectl kustomize manifests` renders,
checked against what the operator's code and kopf call."""

from __future__ import annotations

import pytest

from .helpers import MANIFESTS, Manifest, Tools, parse_documents

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def rendered(tools: Tools) -> list[Manifest]:
    result = tools.run(tools.kubectl, "kustomize", str(MANIFESTS))
    assert result.returncode == 0, result.stderr
    return parse_documents(result.stdout)


def _find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_operator_rbac_is_least_privilege(rendered: list[Manifest]) -> None:
    # kopf: list/watch, PATCH only (finalizers, annotations, /status), core v1 Events (POST),
    # CRD discovery; no peering (standalone), no namespace listing (cluster-wide). The operator:
    # AIJob delete (TTL), VolunteerNode get and /status patch (reputation). No update anywhere.
    cluster_role = _find(rendered, "ClusterRole", "koinon-operator")
    assert cluster_role["rules"] == [
        {"apiGroups": ["koinon.dev"], "resources": ["aijobs"], "verbs": ["get", "list", "watch", "patch", "delete"]},
        {"apiGroups": ["koinon.dev"], "resources": ["volunteernodes"], "verbs": ["get", "list", "watch", "patch"]},
        {
            "apiGroups": ["koinon.dev"],
            "resources": ["aijobs/status", "volunteernodes/status"],
            "verbs": ["get", "patch"],
        },
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["get", "list", "watch"],
        },
    ]
    binding = _find(rendered, "ClusterRoleBinding", "koinon-operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "koinon-operator", "namespace": "koinon-system"}]
    assert binding["roleRef"]["name"] == "koinon-operator"


def test_operator_runs_cluster_wide(rendered: list[Manifest]) -> None:
    # The RBAC above has no namespaces rule: kopf lists namespaces only with --namespace.
    container = _find(rendered, "Deployment", "koinon-operator")["spec"]["template"]["spec"]["containers"][0]
    assert not any(arg.startswith("--namespace") for arg in container["command"] + container.get("args", []))
    assert "KOINON_NAMESPACE" not in {e["name"] for e in container["env"]}


def test_pods_meet_pod_security_restricted(rendered: list[Manifest]) -> None:
    # And the namespace enforces it: nothing less confined starts beside the gateway's keys.
    labels = _find(rendered, "Namespace", "koinon-system")["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", mode
    for name in ("koinon-gateway", "koinon-operator"):
        pod = _find(rendered, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        for volume in pod["volumes"]:
            assert set(volume) - {"name"} <= {"secret", "emptyDir", "projected", "configMap", "downwardAPI"}, volume
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert not context.get("privileged"), where
            assert "memory" in container["resources"]["limits"], where


def test_the_operator_may_hold_only_its_own_lease(rendered: list[Manifest]) -> None:
    """Leader election: the Lease in the operator's namespace (the Deployment tells it which),
    through a namespaced Role, not cluster-wide."""
    role = _find(rendered, "Role", "koinon-operator-leader-election")
    assert role["metadata"]["namespace"] == "koinon-system"
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update", "patch"]}
    ]
    binding = _find(rendered, "RoleBinding", "koinon-operator-leader-election")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "koinon-operator", "namespace": "koinon-system"}]
    deployment = _find(rendered, "Deployment", "koinon-operator")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


def test_namespace_users_get_aijobs_through_the_built_in_roles(rendered: list[Manifest]) -> None:
    """Kueue and KubeRay aggregate their resources into edit/admin/view: without it a user with the
    namespace's `edit` role could not `kubectl apply` an AIJob."""
    editor = _find(rendered, "ClusterRole", "koinon-aijob-editor")
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert {"create", "delete", "patch"} <= set(editor["rules"][0]["verbs"])
    assert editor["rules"][0]["resources"] == ["aijobs"]
    viewer = _find(rendered, "ClusterRole", "koinon-aijob-viewer")
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in viewer["rules"])
