"""NetworkPolicy (networking.k8s.io/v1): served as a built-in kind, stored and validated as
kube-apiserver does, never enforced. The agent chart renders one by default, so before the
emulator served the kind, README.md's `helm template ... | kubectl apply -f -` against the local
control plane failed (`no matches for kind "NetworkPolicy" in version "networking.k8s.io/v1"`)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

GROUP_VERSION = "/apis/networking.k8s.io/v1"
POLICIES = f"{GROUP_VERSION}/namespaces/default/networkpolicies"
TABLE = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}


async def _json(response: aiohttp.ClientResponse) -> Any:
    return await response.json(content_type=None)


def policy(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name},
        "spec": {"podSelector": {"matchLabels": {"app": "a"}}, **spec},
    }


async def test_discovery_and_openapi_list_network_policies(http: aiohttp.ClientSession) -> None:
    groups = await _json(await http.get("/apis"))
    group = next(g for g in groups["groups"] if g["name"] == "networking.k8s.io")
    assert group["preferredVersion"]["groupVersion"] == "networking.k8s.io/v1"
    resources = await _json(await http.get(GROUP_VERSION))
    entry = next(r for r in resources["resources"] if r["name"] == "networkpolicies")
    assert entry["kind"] == "NetworkPolicy" and entry["namespaced"] is True
    assert entry["shortNames"] == ["netpol"] and "watch" in entry["verbs"]
    # No status subresource in networking.k8s.io/v1.
    assert not any(r["name"] == "networkpolicies/status" for r in resources["resources"])
    index = await _json(await http.get("/openapi/v3"))
    assert "apis/networking.k8s.io/v1" in index["paths"]


async def test_stored_with_the_api_servers_defaults(http: aiohttp.ClientSession) -> None:
    """SetDefaults_NetworkPolicy: policyTypes Ingress (plus Egress with egress rules), a port's
    protocol TCP, podSelector {} (the empty selector: every pod of the namespace)."""
    created = await http.post(POLICIES, json=policy("p1", egress=[{"ports": [{"port": 53}]}]))
    assert created.status == 201, await created.text()
    stored = await _json(await http.get(f"{POLICIES}/p1"))
    assert stored["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert stored["spec"]["egress"] == [{"ports": [{"port": 53, "protocol": "TCP"}]}]
    bare = {"metadata": {"name": "deny-ingress"}, "spec": {}}
    assert (await http.post(POLICIES, json=bare)).status == 201
    stored = await _json(await http.get(f"{POLICIES}/deny-ingress"))
    assert stored["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    assert (await http.post("/apis/networking.k8s.io/v1/namespaces/nowhere/networkpolicies", json=bare)).status == 404


async def test_table_shows_the_pod_selector(http: aiohttp.ClientSession) -> None:
    """kubectl get netpol: NAME, POD-SELECTOR (as kubectl formats selectors), AGE."""
    selector = {"matchLabels": {"b": "2", "a": "1"}, "matchExpressions": [{"key": "x", "operator": "Exists"}]}
    await http.post(POLICIES, json={"metadata": {"name": "sel"}, "spec": {"podSelector": selector}})
    await http.post(POLICIES, json={"metadata": {"name": "all"}, "spec": {}})
    table = await _json(await http.get(POLICIES, headers=TABLE))
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Pod-Selector", "Age"]
    cells = {row["cells"][0]: row["cells"][1] for row in table["rows"]}
    assert cells == {"sel": "a=1,b=2,x", "all": "<none>"}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"policyTypes": ["Ingress", "Sideways"]}, "spec.policyTypes[1]"),
        ({"policyTypes": ["Ingress", "Egress", "Ingress"]}, "spec.policyTypes"),
        ({"ingress": [{"ports": [{"protocol": "ICMP", "port": 1}]}]}, "spec.ingress[0].ports[0].protocol"),
        ({"ingress": [{"ports": [{"port": 70000}]}]}, "spec.ingress[0].ports[0].port"),
        ({"ingress": [{"ports": [{"port": "Not_A_Name"}]}]}, "spec.ingress[0].ports[0].port"),
        ({"egress": [{"ports": [{"port": 8000, "endPort": 7000}]}]}, "spec.egress[0].ports[0].endPort"),
        ({"egress": [{"ports": [{"port": "http", "endPort": 90}]}]}, "spec.egress[0].ports[0].endPort"),
        ({"egress": [{"ports": [{"endPort": 90}]}]}, "spec.egress[0].ports[0].endPort"),
        ({"egress": [{"to": [{}]}]}, "spec.egress[0].to[0]"),
        ({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}, "spec.egress[0].to[0]"),
        ({"egress": [{"to": [{"ipBlock": {"cidr": "ten/8"}}]}]}, "spec.egress[0].to[0].ipBlock.cidr"),
        ({"egress": [{"to": [{"ipBlock": {"cidr": ""}}]}]}, "spec.egress[0].to[0].ipBlock.cidr"),
        (
            {"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}}]}]},
            "spec.egress[0].to[0].ipBlock.except[0]",
        ),
        (
            {"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}]},
            "spec.egress[0].to[0].ipBlock.except[0]",
        ),
        (
            {"ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]}}]}]},
            "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
        ),
        ({"podSelector": {"matchLabels": {"app": "has space"}}}, "spec.podSelector.matchLabels"),
    ],
)
async def test_invalid_policies_are_422(http: aiohttp.ClientSession, spec: dict[str, Any], field: str) -> None:
    """ValidateNetworkPolicy's refusals (422 with the field's cause), so a chart that a real
    cluster would refuse is refused here too."""
    response = await http.post(POLICIES, json=policy("bad", **spec))
    assert response.status == 422, await response.text()
    causes = (await _json(response))["details"]["causes"]
    assert field in [c["field"] for c in causes], causes


async def test_mistyped_fields_are_400_not_500(http: aiohttp.ClientSession) -> None:
    """A field of the wrong JSON type fails to decode in kube-apiserver: 400, not a server error."""
    mistyped: list[dict[str, Any]] = [
        {"ingress": "all"},
        {"egress": [{"ports": [{"port": True}]}]},
        {"podSelector": []},
    ]
    for spec in mistyped:
        response = await http.post(POLICIES, json=policy("typed", **spec))
        assert response.status == 400, (spec, await response.text())


async def test_valid_policies_of_every_shape_are_stored(http: aiohttp.ClientSession) -> None:
    spec = {
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [
            {
                "from": [
                    {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {}},
                    {"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}},
                ],
                "ports": [{"protocol": "UDP", "port": "dns-udp"}, {"protocol": "SCTP", "port": 9000, "endPort": 9100}],
            }
        ],
        "egress": [{"to": [{"ipBlock": {"cidr": "::/0", "except": ["fc00::/7"]}}]}],
    }
    response = await http.post(POLICIES, json=policy("ok", **spec))
    assert response.status == 201, await response.text()
    assert (await _json(await http.get(f"{POLICIES}/ok")))["spec"] == policy("ok", **spec)["spec"]


async def test_null_rules_and_ports_are_stored_as_empty_ones(http: aiohttp.ClientSession) -> None:
    """A null item of a rule or port list (YAML `ingress:\\n  -`) decodes in kube-apiserver as the
    zero rule (allow all) or the zero port (protocol defaulted to TCP); here it was a 500."""
    spec = {"ingress": [None], "egress": [{"ports": [None, {"port": 53}]}]}
    response = await http.post(POLICIES, json=policy("nulls", **spec))
    assert response.status == 201, await response.text()
    stored = (await _json(await http.get(f"{POLICIES}/nulls")))["spec"]
    assert stored["ingress"] == [{}]
    assert stored["egress"] == [{"ports": [{"protocol": "TCP"}, {"port": 53, "protocol": "TCP"}]}]


@pytest.mark.parametrize(
    "cidr",
    [
        "10.0.0.1",  # a bare address: Go's ParseCIDR wants ADDRESS/PREFIXLEN
        "2001:db8::1",
        "10.0.0.0/255.0.0.0",  # a netmask is not a prefix length
        "10.0.0.0/",
        "10.0.0.0/+8",
        "10.0.0.0/33",
        "fe80::%eth0/64",  # a zone is not part of a CIDR
    ],
)
async def test_what_is_not_a_cidr_is_refused(http: aiohttp.ClientSession, cidr: str) -> None:
    """IsValidCIDRForLegacyField (netutils.ParseCIDRSloppy): Python's ip_network took these."""
    for block in ({"cidr": cidr}, {"cidr": "0.0.0.0/0", "except": [cidr]}):
        response = await http.post(POLICIES, json=policy("bare", egress=[{"to": [{"ipBlock": block}]}]))
        assert response.status == 422, (block, await response.text())


@pytest.mark.parametrize(
    ("cidr", "inside", "outside"),
    [
        # Leading zeros read as decimal, as Go's pre-1.17 parser did (Python's ipaddress refuses them).
        ("010.000.0.0/08", "010.1.0.0/16", "11.0.0.0/16"),
        ("10.1.2.3/8", "10.1.0.0/16", "11.0.0.0/16"),  # host bits set: the network is 10.0.0.0/8
        ("::ffff:010.0.0.0/104", "::ffff:10.1.0.0/112", "::ffff:11.0.0.0/112"),
        ("2001:DB8::/32", "2001:db8:1::/48", "2001:db9::/48"),
    ],
)
async def test_cidrs_the_api_server_takes_are_stored(
    http: aiohttp.ClientSession, cidr: str, inside: str, outside: str
) -> None:
    """ParseCIDRSloppy's leniencies (the StrictIPCIDRValidation gate is off by default): stored as
    given, and each except checked against the network the CIDR denotes."""
    block = {"cidr": cidr, "except": [inside]}
    response = await http.post(POLICIES, json=policy("sloppy", egress=[{"to": [{"ipBlock": block}]}]))
    assert response.status == 201, await response.text()
    stored = (await _json(await http.get(f"{POLICIES}/sloppy")))["spec"]["egress"][0]["to"][0]["ipBlock"]
    assert stored == block
    refused = {"cidr": cidr, "except": [outside]}
    response = await http.post(POLICIES, json=policy("outside", egress=[{"to": [{"ipBlock": refused}]}]))
    assert response.status == 422, await response.text()
