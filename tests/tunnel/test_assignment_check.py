"""What the agent accepts from the gateway about its own node (koinon_agent.assignment_check)."""

from __future__ import annotations

import pytest
from koinon_agent.assignment_check import address_problem, assignment_problem, port_allowed
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

BLOCK = pb.PortBlock(
    node_manager_port=40000, object_manager_port=40001, dashboard_agent_grpc_port=40002,
    dashboard_agent_listen_port=40003, metrics_export_port=40004, runtime_env_agent_port=40005,
    min_worker_port=40006, max_worker_port=40015,
)  # fmt: skip


@pytest.mark.parametrize("address", ["127.0.20.1", "127.64.0.2", "127.255.255.254"])
def test_virtual_loopback_addresses_are_taken(address: str) -> None:
    assert address_problem(address) is None


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.0.0.0", "127.255.255.255", "192.168.1.1", "169.254.169.254", "10.0.0.5",
     "metadata.google.internal", "localhost", "::1", "127.0.20.1,10.0.0.1", ""],
)  # fmt: skip
def test_anything_else_is_refused(address: str) -> None:
    assert address_problem(address) is not None


def test_ports_outside_the_block_are_not_served() -> None:
    allowed = [p for p in range(39990, 40030) if port_allowed(BLOCK, p)]
    assert allowed == list(range(40000, 40016))
    assert not port_allowed(BLOCK, 22) and not port_allowed(BLOCK, 0) and not port_allowed(BLOCK, 1 << 20)


@pytest.mark.parametrize(
    "ports",
    [
        pb.PortBlock(node_manager_port=22, min_worker_port=40006, max_worker_port=40015),
        pb.PortBlock(node_manager_port=40000, min_worker_port=40015, max_worker_port=40006),
        pb.PortBlock(node_manager_port=40000, min_worker_port=2000, max_worker_port=65000),
    ],
)
def test_a_block_that_is_no_ray_port_block_is_refused(ports: pb.PortBlock) -> None:
    assert assignment_problem(pb.Assignment(address="127.0.20.1", ports=ports)) is not None


def test_a_later_assignment_must_keep_the_nodes_address() -> None:
    assignment = pb.Assignment(address="127.0.20.2", ports=BLOCK)
    assert assignment_problem(assignment) is None
    assert assignment_problem(assignment, stored_address="127.0.20.2") is None
    assert "not this node's" in (assignment_problem(assignment, stored_address="127.0.20.1") or "")


@pytest.mark.parametrize("field", ["node_name", "ray_address", "ray_auth_token"])
def test_values_that_no_process_can_be_given_are_refused_without_quoting_them(field: str) -> None:
    """ray start takes these as arguments and environment: a NUL in one makes starting it fail
    (ValueError) however often it is tried, so the assignment is refused, naming the field only
    (one is Ray's token)."""
    assignment = pb.Assignment(address="127.0.20.2", ports=BLOCK, node_name="vn-a", ray_address="10.0.0.1:6379")
    setattr(assignment, field, "secret\x00value")
    problem = assignment_problem(assignment) or ""
    assert field in problem and "secret" not in problem
