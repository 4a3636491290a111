"""What the platform's job code, which runs in the volunteer's agent pod, can reach and fill there:
the chart's NetworkPolicy and /tmp size limit; and the agent's message when the join token's
Secret is missing (its reference is optional, so Kubernetes says nothing)."""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

import pytest
import yaml
from koinon_agent import cli
from koinon_agent.config import ENV_VARS

from .helpers import (
    CHART,
    GATEWAY,
    REPO,
    TOKEN,
    Manifest,
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


def policy_of(tools: Tools, values: dict[str, str | None] | None = None, *, extra: tuple[str, ...] = ()) -> Manifest:
    return one(render(tools, values, extra=extra), "NetworkPolicy")


def reachable(policy: Manifest, address: str, port: int, protocol: str = "TCP") -> bool:
    """Whether the policy's egress rules let the pod connect to address:port (NetworkPolicy
    semantics: a rule without ports allows every port, one without peers every address). Peers
    that select pods by label (extraEgress `to`) match pods, not addresses: they are skipped."""
    ip = ipaddress.ip_address(address)
    for rule in policy["spec"].get("egress", []):
        ports = rule.get("ports")
        if ports and not any(
            p.get("protocol", "TCP") == protocol and p["port"] <= port <= p.get("endPort", p["port"]) for p in ports
        ):
            continue
        peers = rule.get("to")
        if not peers:
            return True
        for peer in peers:
            if "ipBlock" not in peer:
                assert set(peer) <= {"namespaceSelector", "podSelector"}, peer
                continue
            assert set(peer) == {"ipBlock"}, peer
            block = peer["ipBlock"]
            network = ipaddress.ip_network(block["cidr"])
            excepted = [ipaddress.ip_network(cidr) for cidr in block.get("except", [])]
            if ip.version == network.version and ip in network and not any(ip in e for e in excepted):
                return True
    return False


# What job code must not reach: the cloud metadata service (IPv4, and AWS's IPv6 one), a home
# router, a LAN host, the cluster's DNS and other Services and pods, a Docker bridge, a CGNAT or
# Tailscale peer, a private IPv6 network, an IPv6 link-local host, and IPv4 hosts through NAT64
# (IPv6-only clusters with DNS64, 464XLAT: 64:ff9b::c0a8:101 is 192.168.1.1, 64:ff9b::a9fe:a9fe
# the metadata service, 64:ff9b:1::a00:14 10.0.0.20 through a local-use prefix).
PRIVATE = [
    "169.254.169.254",
    "fd00:ec2::254",
    "192.168.1.1",
    "10.0.0.20",
    "10.43.0.10",
    "10.42.1.7",
    "172.17.0.1",
    "100.100.100.100",
    "fd12:3456::1",
    "fe80::1",
    "64:ff9b::c0a8:101",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::a00:14",
]
PUBLIC = ["1.1.1.1", "151.101.0.223", "2606:4700::1111"]  # e.g. a DNS resolver, pypi.org's CDN


def test_the_network_policy_is_on_by_default_and_selects_the_agents_pod(tools: Tools) -> None:
    docs = render(tools)
    policy = one(docs, "NetworkPolicy")
    deployment = one(docs, "Deployment")
    assert policy["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert policy["spec"]["podSelector"] == {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    # No ingress at all: nothing in the pod listens (exec probes, no ports, no hostNetwork).
    assert not policy["spec"].get("ingress")
    pod = deployment["spec"]["template"]["spec"]
    container = agent_container(deployment)
    assert "ports" not in container and "hostNetwork" not in pod
    for probe in ("livenessProbe", "readinessProbe"):
        assert set(container[probe]) - {"periodSeconds", "failureThreshold", "timeoutSeconds"} == {"exec"}


def test_egress_is_dns_anywhere_and_public_addresses_only(tools: Tools) -> None:
    policy = policy_of(tools)
    for address in PRIVATE:
        assert not reachable(policy, address, 443), f"job code reaches {address}"
        assert not reachable(policy, address, 80), f"job code reaches {address}"
    for address in PUBLIC:
        assert reachable(policy, address, 443), f"job code cannot reach {address} (pip installs)"
    # DNS, UDP and TCP, to any address: the cluster's DNS Service, a node-local cache.
    for address in ("10.43.0.10", "169.254.20.10", "fd00::a", "1.1.1.1"):
        assert reachable(policy, address, 53, "UDP") and reachable(policy, address, 53, "TCP")
    # The ranges themselves, as values.yaml and the README list them.
    blocks = {
        peer["ipBlock"]["cidr"]: peer["ipBlock"].get("except")
        for r in policy["spec"]["egress"]
        for peer in r.get("to", [])
    }
    assert set(blocks["0.0.0.0/0"]) == {
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
    }
    assert set(blocks["::/0"]) == {"fc00::/7", "fe80::/10", "64:ff9b::/96", "64:ff9b:1::/48"}


@pytest.mark.parametrize(
    ("gateway", "address", "cidr"),
    [
        ("192.168.1.20:7443", "192.168.1.20", "192.168.1.20/32"),
        ("10.0.0.20:443", "10.0.0.20", "10.0.0.20/32"),
        ("[fd00::5]:7443", "fd00::5", "fd00::5/128"),
    ],
)
def test_a_gateway_given_by_a_private_ip_literal_is_allowed_that_port_only(
    tools: Tools, gateway: str, address: str, cidr: str
) -> None:
    policy = policy_of(tools, {"gateway.address": gateway})
    port = int(gateway.rsplit(":", 1)[1])
    assert reachable(policy, address, port)
    assert not reachable(policy, address, 22)  # the gateway's host, not every port of it
    neighbour = str(ipaddress.ip_address(address) + 1)
    assert not reachable(policy, neighbour, port)
    assert any(peer["ipBlock"]["cidr"] == cidr for r in policy["spec"]["egress"] for peer in r.get("to", []))


def _notes(tools: Tools, *args: str) -> str:
    result = tools.run(tools.helm, "install", "vol", str(CHART), "--dry-run=client", *args)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split("NOTES:", 1)[1].split())


def test_the_notes_say_a_clusterip_gateway_needs_its_pods_selected(tools: Tools) -> None:
    """An IP-literal gateway.address gets an ipBlock rule; if it is a Service's ClusterIP (10.43.17.5
    on k3s) that rule lets nothing through on most plugins (kube-router, Calico, Cilium check the
    pod address kube-proxy translated it to), so the NOTES say what works instead."""
    notes = _notes(tools, "--set", "gateway.address=10.43.17.5:7443", "--set", f"joinToken.value={TOKEN}")
    assert "10.43.17.5/32" in notes and "ClusterIP" in notes and "networkPolicy.extraEgress" in notes
    assert "labels" in notes


def test_a_gateway_given_by_name_gets_no_rule_of_its_own_and_the_notes_say_what_to_do(tools: Tools) -> None:
    policy = policy_of(tools)  # gateway.example.org: reached as a public address
    assert [r for r in policy["spec"]["egress"] if r.get("ports") and r.get("to")] == []
    notes = _notes(tools, "--set", f"gateway.address={GATEWAY}", "--set", f"joinToken.value={TOKEN}")
    assert "networkPolicy.extraEgress" in notes and GATEWAY in notes
    # A gateway Service of this cluster: by its pods' labels, not the ClusterIP the name resolves to.
    assert "ClusterIP" in notes and "labels" in notes


def test_extra_egress_allows_private_destinations(tools: Tools, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        "networkPolicy:\n"
        "  extraEgress:\n"
        "    - cidr: 192.168.1.20/32\n"
        "      ports: [{port: 7443}]\n"
        "    - cidr: 10.20.0.0/16\n"  # every port
        "    - cidr: fd00:1::/64\n"
        "      ports: [{port: 30000, endPort: 30100, protocol: UDP}]\n"
    )
    policy = policy_of(tools, extra=("-f", str(values)))
    assert reachable(policy, "192.168.1.20", 7443) and not reachable(policy, "192.168.1.20", 7444)
    assert not reachable(policy, "192.168.1.20", 7443, "UDP")  # TCP unless given
    assert reachable(policy, "10.20.3.4", 3128) and reachable(policy, "10.20.3.4", 22)
    assert not reachable(policy, "10.21.0.1", 3128)
    assert reachable(policy, "fd00:1::7", 30050, "UDP") and not reachable(policy, "fd00:1::7", 30101, "UDP")
    assert not reachable(policy, "169.254.169.254", 80)  # the rest stays closed


# The README's example for a gateway in this cluster (the labels of manifests/gateway's pods).
GATEWAY_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "koinon-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "koinon-gateway"}},
}


def test_extra_egress_selects_an_in_cluster_gateways_pods_by_label(tools: Tools, tmp_path: Path) -> None:
    """A rule for a Service's ClusterIP does not let the pod reach it on most plugins (they check
    egress after kube-proxy's DNAT, against the gateway pod's own address), so an in-cluster
    gateway is allowed by NetworkPolicy peers: its namespace and pods, on the pod's port."""
    gateway = yaml.safe_load((REPO / "manifests" / "gateway" / "deployment.yaml").read_text())
    assert gateway["metadata"]["namespace"] == "koinon-system"
    pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert GATEWAY_PEER["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in gateway["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports["agents"] == 7443
    readme = (CHART / "README.md").read_text()
    assert "kubernetes.io/metadata.name: koinon-system" in readme and "app.kubernetes.io/name: koinon-gateway" in readme

    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump({"networkPolicy": {"extraEgress": [{"to": [GATEWAY_PEER], "ports": [{"port": 7443}]}]}})
    )
    for allow_external in ("true", "false"):  # a gateway by name then needs no address rule at all
        policy = policy_of(
            tools,
            {
                "gateway.address": "koinon-gateway.koinon-system.svc:7443",
                "networkPolicy.allowExternalEgress": allow_external,
            },
            extra=("-f", str(values)),
        )
        rules = [r for r in policy["spec"]["egress"] if r.get("to") == [GATEWAY_PEER]]
        assert rules == [{"to": [GATEWAY_PEER], "ports": [{"protocol": "TCP", "port": 7443}]}]
        assert not reachable(policy, "10.43.17.5", 7443)  # the ClusterIP itself is no rule


def test_without_external_egress_only_dns_the_gateway_and_extra_egress_are_open(tools: Tools) -> None:
    policy = policy_of(tools, {"networkPolicy.allowExternalEgress": "false", "gateway.address": "203.0.113.9:7443"})
    assert reachable(policy, "203.0.113.9", 7443) and reachable(policy, "10.43.0.10", 53, "UDP")
    for address in PUBLIC + PRIVATE:
        assert not reachable(policy, address, 443), address
    # A gateway by name could then be reached by no rule: refused, naming what to do.
    result = helm_template(tools, {"networkPolicy.allowExternalEgress": "false"})
    assert result.returncode != 0
    assert "networkPolicy.allowExternalEgress" in result.stderr and "networkPolicy.extraEgress" in result.stderr
    with_extra: dict[str, str | None] = {
        "networkPolicy.allowExternalEgress": "false",
        "networkPolicy.extraEgress[0].cidr": "198.51.100.7/32",
    }
    assert reachable(policy_of(tools, with_extra), "198.51.100.7", 7443)


def test_a_disabled_network_policy_renders_nothing(tools: Tools) -> None:
    docs = render(tools, {"networkPolicy.enabled": "false"})
    assert not by_kind(docs, "NetworkPolicy")
    assert one(docs, "Deployment")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"networkPolicy.enabled": "yes"}, "/networkPolicy/enabled"),
        ({"networkPolicy.allowExternalEgress": "0"}, "/networkPolicy/allowExternalEgress"),
        ({"networkPolicy.ingress": "[]"}, "ingress"),
        ({"networkPolicy.extraEgress[0].cidr": "10.0.0.1"}, "/networkPolicy/extraEgress/0/cidr"),
        ({"networkPolicy.extraEgress[0].cidr": "10.0.0.0/33"}, "/networkPolicy/extraEgress/0/cidr"),
        ({"networkPolicy.extraEgress[0].cidr": "300.0.0.1/32"}, "/networkPolicy/extraEgress/0/cidr"),
        ({"networkPolicy.extraEgress[0].cidr": "mirror.lan/32"}, "/networkPolicy/extraEgress/0/cidr"),
        ({"networkPolicy.extraEgress[0].cidr": "fd00::/129"}, "/networkPolicy/extraEgress/0/cidr"),
        ({"networkPolicy.extraEgress[0].ports[0].port": "7443"}, "/networkPolicy/extraEgress/0"),  # no cidr
        (
            {"networkPolicy.extraEgress[0].cidr": "10.0.0.0/8", "networkPolicy.extraEgress[0].ports[0].port": "0"},
            "/networkPolicy/extraEgress/0/ports/0/port",
        ),
        (
            {"networkPolicy.extraEgress[0].cidr": "10.0.0.0/8", "networkPolicy.extraEgress[0].ports[0].port": "70000"},
            "/networkPolicy/extraEgress/0/ports/0/port",
        ),
        (
            {
                "networkPolicy.extraEgress[0].cidr": "10.0.0.0/8",
                "networkPolicy.extraEgress[0].ports[0].port": "53",
                "networkPolicy.extraEgress[0].ports[0].protocol": "ICMP",
            },
            "/networkPolicy/extraEgress/0/ports/0/protocol",
        ),
        (
            {
                "networkPolicy.extraEgress[0].cidr": "10.0.0.0/8",
                "networkPolicy.extraEgress[0].ports[0].port": "9000",
                "networkPolicy.extraEgress[0].ports[0].endPort": "8000",
            },
            "networkPolicy.extraEgress[0].ports: endPort 8000 is below port 9000",
        ),
        ({"networkPolicy.extraEgress[0].ports[0].port": "7443"}, "missing property 'to'"),  # nor to
        ({"networkPolicy.extraEgress[0].to": "x"}, "/networkPolicy/extraEgress/0/to"),
        ({"networkPolicy.extraEgress[0].to[0].ipBlock.cidr": "10.0.0.0/8"}, "/networkPolicy/extraEgress/0/to/0"),
        ({"networkPolicy.extraEgress[0].to[0].podSelector.matchLabels": "x"}, "/to/0/podSelector/matchLabels"),
        (
            {
                "networkPolicy.extraEgress[0].to[0].podSelector.matchExpressions[0].key": "app",
                "networkPolicy.extraEgress[0].to[0].podSelector.matchExpressions[0].operator": "Is",
            },
            "/to/0/podSelector/matchExpressions/0/operator",
        ),
        (
            {
                "networkPolicy.extraEgress[0].cidr": "10.0.0.0/8",
                "networkPolicy.extraEgress[0].to[0].podSelector.matchLabels.app": "gw",
            },
            "networkPolicy.extraEgress[0]: give cidr or to, not both",
        ),
        ({"hostNetwork": "true"}, "hostNetwork"),  # the policy would not apply to the host's network
        ({"tmpSizeLimit": "20GB"}, "/tmpSizeLimit"),
        ({"tmpSizeLimit": "512Mi"}, "tmpSizeLimit: 512Mi is less than 1Gi"),
        ({"tmpSizeLimit": "0"}, "/tmpSizeLimit"),  # a number: a quantity is written as a string
        ({"tmpSizeLimit": "0Gi"}, "tmpSizeLimit: 0Gi is less than 1Gi"),  # the kubelet would evict at once
    ],
)
def test_bad_isolation_values_are_refused_naming_the_value(
    tools: Tools, values: dict[str, str | None], expected: str
) -> None:
    assert_refused(tools, values, expected)


def test_a_values_file_that_empties_the_network_policy_section_gets_the_default_policy(
    tools: Tools, tmp_path: Path
) -> None:
    """`networkPolicy:` with its keys commented out is null, which Helm drops (as it is missing
    from a release of a chart before 0.2.1): the policy values.yaml describes, not none."""
    values = tmp_path / "values.yaml"
    values.write_text("networkPolicy:\n  # enabled: false\n")
    assert policy_of(tools, extra=("-f", str(values)))["spec"] == policy_of(tools)["spec"]
    # One key left out means its default too.
    policy = policy_of(tools, {"networkPolicy.enabled": "null", "networkPolicy.allowExternalEgress": "null"})
    assert policy["spec"] == policy_of(tools)["spec"]


def _chart_of_a_release_from_0_2_0(tmp_path: Path) -> Path:
    """This chart with the values a release installed from chart 0.2.0 has. `helm upgrade
    --reuse-values` renders the new chart with the old release's coalesced values in place of its
    values.yaml (Helm's upgrade action: chart.Values = the old values), so keys the new chart added
    are missing, not defaulted. 0.2.0's values.yaml (commit bc1d9fe) was this one without
    networkPolicy and tmpSizeLimit."""
    chart = tmp_path / "koinon-agent"
    shutil.copytree(CHART, chart)
    old = yaml.safe_load((CHART / "values.yaml").read_text())
    del old["networkPolicy"]
    assert "tmpSizeLimit" not in old
    (chart / "values.yaml").write_text(yaml.safe_dump(old))
    return chart


def test_helm_upgrade_reuse_values_from_chart_0_2_0_gets_the_policy_and_the_tmp_limit(
    tools: Tools, tmp_path: Path
) -> None:
    """Failed with "missing property 'networkPolicy'" (the schema required it), and /tmp had no limit."""
    chart = _chart_of_a_release_from_0_2_0(tmp_path)

    def upgrade(*values: str) -> list[Manifest]:
        base = ("--set", f"gateway.address={GATEWAY}", "--set", f"joinToken.value={TOKEN}")
        result = tools.run(tools.helm, "template", "vol", str(chart), "--namespace", "koinon-volunteer", *base, *values)
        assert result.returncode == 0, result.stderr
        return parse_documents(result.stdout)

    docs = upgrade()
    assert one(docs, "NetworkPolicy")["spec"] == policy_of(tools)["spec"]
    tmp = next(v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "tmp")
    assert tmp == {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}}
    # `--reuse-values --set networkPolicy....`: the keys not given keep their defaults.
    docs = upgrade(
        "--set", "networkPolicy.allowExternalEgress=false", "--set", "networkPolicy.extraEgress[0].cidr=203.0.113.9/32"
    )
    policy = one(docs, "NetworkPolicy")
    assert reachable(policy, "203.0.113.9", 7443) and not reachable(policy, "1.1.1.1", 443)
    assert not by_kind(upgrade("--set", "networkPolicy.enabled=false"), "NetworkPolicy")
    for none in ("tmpSizeLimit=null", "tmpSizeLimit="):
        volumes = one(upgrade("--set", none), "Deployment")["spec"]["template"]["spec"]["volumes"]
        assert next(v for v in volumes if v["name"] == "tmp") == {"name": "tmp", "emptyDir": {}}


def _tmp_volume(tools: Tools, values: dict[str, str | None] | None = None) -> Manifest:
    pod = one(render(tools, values), "Deployment")["spec"]["template"]["spec"]
    volume: Manifest = next(v for v in pod["volumes"] if v["name"] == "tmp")
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "tmp")
    assert mount["mountPath"] == "/tmp"  # Ray's temp dir (KOINON_TEMP_DIR=/tmp/ray) and HOME
    return volume


def test_the_tmp_job_code_fills_is_bounded(tools: Tools, tmp_path: Path) -> None:
    assert _tmp_volume(tools) == {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}}
    assert _tmp_volume(tools, {"tmpSizeLimit": "50Gi"})["emptyDir"] == {"sizeLimit": "50Gi"}
    assert _tmp_volume(tools, {"tmpSizeLimit": "1.5Ti"})["emptyDir"] == {"sizeLimit": "1.5Ti"}
    # No limit, when asked for: null or empty, with --set or in a values file.
    assert _tmp_volume(tools, {"tmpSizeLimit": "null"})["emptyDir"] == {}
    assert _tmp_volume(tools, {"tmpSizeLimit": ""})["emptyDir"] == {}
    values = tmp_path / "values.yaml"
    for written in ("null", '""', "~"):
        values.write_text(f"tmpSizeLimit: {written}\n")
        pod = one(render(tools, extra=("-f", str(values))), "Deployment")["spec"]["template"]["spec"]
        assert next(v for v in pod["volumes"] if v["name"] == "tmp") == {"name": "tmp", "emptyDir": {}}, written


def _join_with_the_rendered_environment(
    docs: list[Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    """Runs `koinon-agent join` with the environment the kubelet gives the container when the
    token's Secret is not there (an optional secretKeyRef then sets no KOINON_TOKEN), on an empty
    state dir: a first join. Returns its error output; it must exit 2 without dialling."""
    env = env_map(agent_container(one(docs, "Deployment")))
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, entry in env.items():
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    monkeypatch.setenv("KOINON_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("KOINON_TEMP_DIR", str(tmp_path / "ray"))
    monkeypatch.setenv("KOINON_HEALTH_FILE", str(tmp_path / "health.json"))
    assert cli.main(["join", "--no-ray"]) == 2
    return capsys.readouterr().err


def test_a_misspelt_token_secret_is_named_as_the_cause(
    tools: Tools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """joinToken.existingSecret=koinon-jion (for koinon-join): the pod starts (the reference is
    optional, so that a joined node starts after its token's Secret is gone) with no KOINON_TOKEN,
    and the agent said only "token: required ... KOINON_TOKEN", a variable the volunteer never set."""
    values: dict[str, str | None] = {
        "joinToken.value": None,
        "joinToken.existingSecret": "koinon-jion",
        "joinToken.existingSecretKey": "jt",
    }
    docs = render(tools, values)
    env = env_map(agent_container(one(docs, "Deployment")))
    assert env["KOINON_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "koinon-jion", "key": "jt", "optional": True}
    hint = env["KOINON_TOKEN_HINT"]["value"]  # a plain value: it holds names, never the token
    assert hint == (
        'Secret "koinon-jion" (key "jt") in namespace koinon-volunteer was not found or is empty; '
        "check joinToken.existingSecret and joinToken.existingSecretKey"
    )
    error = _join_with_the_rendered_environment(docs, tmp_path, monkeypatch, capsys)
    assert "token: required for the first join" in error
    assert 'Secret "koinon-jion" (key "jt") in namespace koinon-volunteer' in error
    assert "joinToken.existingSecret" in error


def test_the_token_hint_names_the_charts_own_secret_or_the_missing_values(
    tools: Tools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    own = render(tools)
    hint = env_map(agent_container(one(own, "Deployment")))["KOINON_TOKEN_HINT"]["value"]
    assert 'Secret "vol-koinon-agent-join-token" (key "token")' in hint and "joinToken.value" in hint
    assert TOKEN not in hint
    none = render(tools, {"joinToken.value": None, "persistence.type": "pvc"})
    assert "KOINON_TOKEN" not in env_map(agent_container(one(none, "Deployment")))
    error = _join_with_the_rendered_environment(none, tmp_path, monkeypatch, capsys)
    assert "neither joinToken.value nor joinToken.existingSecret" in error
