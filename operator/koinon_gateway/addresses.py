"""Virtual addresses and Ray port blocks for volunteer nodes.

Each node gets one address from a 127.x.y.z pool (connectable on the node itself, DESIGN §2) and a
block of ports derived from the address's index, so that blocks never overlap even when several
nodes share one host (benchmarks, local demos).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# Offsets inside a block; workers take the rest of the block.
NODE_MANAGER, OBJECT_MANAGER, AGENT_GRPC, AGENT_HTTP, METRICS, RUNTIME_ENV = range(6)
FIRST_WORKER = 8
# Worker ports per block that agents take (koinon_agent.assignment_check.MAX_WORKER_PORTS).
MAX_WORKER_PORTS = 10_000
# Virtual addresses live on the volunteers' loopback network, never at 127.0.0.1 (their own
# services); agents take no other (koinon_agent.assignment_check).
LOOPBACK_NETWORK = ipaddress.IPv4Network("127.0.0.0/8")
LOOPBACK_OWN_SERVICES = ipaddress.IPv4Address("127.0.0.1")


@dataclass(frozen=True)
class PortBlock:
    node_manager_port: int
    object_manager_port: int
    dashboard_agent_grpc_port: int
    dashboard_agent_listen_port: int
    metrics_export_port: int
    runtime_env_agent_port: int
    min_worker_port: int
    max_worker_port: int

    def allows(self, port: int, from_head: bool = True) -> bool:
        """Whether a dial to ``port`` of this node may pass. Other volunteers need only what Ray's
        data plane uses between nodes (raylet, object manager, workers); the dashboard agent (task
        logs, profiling) and the metrics exporter serve the head alone."""
        fixed: tuple[int, ...] = (self.node_manager_port, self.object_manager_port)
        if from_head:
            fixed += (self.dashboard_agent_grpc_port, self.metrics_export_port)
        return port in fixed or self.min_worker_port <= port <= self.max_worker_port


class AddressPoolExhausted(Exception):
    pass


class AddressTaken(ValueError):
    """Another node holds the address."""


class AddressAllocator:
    def __init__(self, cidr: str, port_base: int, block_size: int) -> None:
        self.network = ipaddress.IPv4Network(cidr)
        if self.network.num_addresses < 4:  # hosts() of a /31 or /32 are not hosts _index accepts
            raise ValueError(f"vip_cidr: {cidr} holds no address to hand out; use a /30 or larger")
        if block_size < FIRST_WORKER + 2:
            raise ValueError(f"port_block_size: must be at least {FIRST_WORKER + 2}")
        capacity = self.network.num_addresses - 2
        if port_base < 1024 or port_base + capacity * block_size > 65535:
            raise ValueError(
                f"port_base/port_block_size: {capacity} blocks of {block_size} from {port_base} exceed 65535"
            )
        self.port_base = port_base
        self.block_size = block_size
        # address -> the node holding it: a release names the holder, so a late release (a deletion
        # reported after the address went to another node) cannot free someone else's address.
        self._holders: dict[str, str] = {}

    def reserve(self, address: str, holder: str) -> None:
        """Records ``holder`` as the holder of ``address``; an address another node holds is never
        taken over (AddressTaken), whatever order nodes are reserved in."""
        self._index(address)
        current = self._holders.get(address)
        if current not in (None, holder):
            raise AddressTaken(f"address {address} is held by {current}, not {holder}")
        self._holders[address] = holder

    def allocate(self, holder: str) -> str:
        for host in self.network.hosts():
            if str(host) not in self._holders:
                self._holders[str(host)] = holder
                return str(host)
        raise AddressPoolExhausted(f"vip_cidr {self.network}: no free address")

    def release(self, address: str, holder: str) -> bool:
        """Frees ``address`` if ``holder`` holds it; returns whether it did."""
        if self._holders.get(address) != holder:
            return False
        del self._holders[address]
        return True

    def release_holder(self, holder: str) -> str | None:
        """Frees the address ``holder`` holds, whatever its object records (a join whose undo
        failed keeps the address its status write may have recorded, service._record_node);
        returns it, or None when ``holder`` holds none. A scan of the pool: for deletions only."""
        address = self.held_by(holder)
        if address is not None:
            del self._holders[address]
        return address

    def held_by(self, holder: str) -> str | None:
        """The address ``holder`` holds, or None. A scan of the pool: for checks and diagnostics
        (which node a failed join's undo left holding an address), not for every join."""
        return next((address for address, current in self._holders.items() if current == holder), None)

    def holder(self, address: str) -> str | None:
        return self._holders.get(address)

    def contains(self, address: str) -> bool:
        """Whether ``address`` is a host address of the pool (not its network or broadcast address):
        one a node can hold."""
        try:
            self._index(address)
        except ValueError:
            return False
        return True

    def _index(self, address: str) -> int:
        ip = ipaddress.IPv4Address(address)
        if ip not in self.network or ip in (self.network.network_address, self.network.broadcast_address):
            raise ValueError(f"address {address}: not a host of {self.network}")
        return int(ip) - int(self.network.network_address) - 1

    def ports_for(self, address: str) -> PortBlock:
        base = self.port_base + self._index(address) * self.block_size
        return PortBlock(
            node_manager_port=base + NODE_MANAGER,
            object_manager_port=base + OBJECT_MANAGER,
            dashboard_agent_grpc_port=base + AGENT_GRPC,
            dashboard_agent_listen_port=base + AGENT_HTTP,
            metrics_export_port=base + METRICS,
            runtime_env_agent_port=base + RUNTIME_ENV,
            min_worker_port=base + FIRST_WORKER,
            max_worker_port=base + self.block_size - 1,
        )
