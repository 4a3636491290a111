"""What the agent accepts from the gateway about its own node: a virtual address and a port block.

The gateway names the address the Ray node binds to and, for each connection it opens towards the
node, a port there. A compromised or buggy gateway must not turn that into a way into the
volunteer's machine: the address must be a virtual one on the loopback network (127/8, where the
Ray node binds it), never 127.0.0.1 (where the volunteer's own services listen), a LAN or metadata
address or a host name; and connections go only to the ports of the node's own Ray port block.
What `ray start` is given of it must be something a process can be given at all.
"""

from __future__ import annotations

import ipaddress

from koinon_gateway.addresses import LOOPBACK_NETWORK as LOOPBACK
from koinon_gateway.addresses import LOOPBACK_OWN_SERVICES as OWN_SERVICES
from koinon_gateway.addresses import MAX_WORKER_PORTS
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

# The single ports of a block; its workers take the range min_worker_port..max_worker_port (at most
# MAX_WORKER_PORTS: a gateway handing out more is not describing a Ray port block).
NAMED_PORTS = (
    "node_manager_port",
    "object_manager_port",
    "dashboard_agent_grpc_port",
    "dashboard_agent_listen_port",
    "metrics_export_port",
    "runtime_env_agent_port",
)


def address_problem(address: str) -> str | None:
    """Why ``address`` cannot be this node's virtual address (None: it can)."""
    try:
        parsed = ipaddress.IPv4Address(address)
    except ValueError:
        return f"{address[:64]!r} is not an IPv4 address"
    if parsed not in LOOPBACK or parsed in (OWN_SERVICES, LOOPBACK.network_address, LOOPBACK.broadcast_address):
        return f"{address} is not a virtual loopback address (127.0.0.0/8 other than 127.0.0.1)"
    return None


def ports_problem(ports: pb.PortBlock) -> str | None:
    """Why ``ports`` is not a Ray port block the node may serve (None: it is)."""
    values = [getattr(ports, name) for name in NAMED_PORTS] + [ports.min_worker_port, ports.max_worker_port]
    if any(not 1024 <= value <= 65535 for value in values):
        return "a port of the block is outside 1024-65535"
    if not 0 <= ports.max_worker_port - ports.min_worker_port < MAX_WORKER_PORTS:
        span = f"{ports.min_worker_port}-{ports.max_worker_port}"
        return f"worker ports {span} are no range of at most {MAX_WORKER_PORTS} ports"
    return None


# What of the assignment `ray start` takes as arguments or environment (ray_node.ray_start_command,
# ray_environment).
PROCESS_FIELDS = ("node_name", "ray_address", "ray_auth_token")


def process_values_problem(assignment: pb.Assignment) -> str | None:
    """Why ``assignment`` cannot be handed to ``ray start`` (None: it can). A NUL character fits
    no argument or environment variable: starting Ray would fail (ValueError) on every try. The
    field is named, its value never quoted (one is Ray's token)."""
    for name in PROCESS_FIELDS:
        if "\x00" in getattr(assignment, name):
            return f"{name} holds a NUL character, which no process argument or environment variable can"
    return None


def assignment_problem(assignment: pb.Assignment, stored_address: str | None = None) -> str | None:
    """Why the agent must not act on ``assignment`` (None: it may). ``stored_address``: the address
    this node joined with; a later assignment must keep it."""
    problem = (
        address_problem(assignment.address) or ports_problem(assignment.ports) or process_values_problem(assignment)
    )
    if problem is None and stored_address is not None and assignment.address != stored_address:
        problem = f"address {assignment.address} is not this node's ({stored_address})"
    return problem


def port_allowed(ports: pb.PortBlock, port: int) -> bool:
    """A connection the gateway opens towards this node may reach only its Ray port block."""
    return port in {getattr(ports, name) for name in NAMED_PORTS} or (
        ports.min_worker_port <= port <= ports.max_worker_port
    )
