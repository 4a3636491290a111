"""The local control plane's ports: never from the kernel's ephemeral range, never handed out twice."""

from __future__ import annotations

import socket
from pathlib import Path

from koinon_dev.processes import SINGLE_PORTS, free_port_range, free_ports


def _ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_single_ports_are_free_distinct_and_outside_the_ephemeral_range() -> None:
    first, second = free_ports(20), free_ports(20)
    ports = first + second
    assert len(set(ports)) == len(ports)  # never handed out twice, also across calls
    ephemeral_low, _ = _ephemeral_range()
    for port in ports:
        assert SINGLE_PORTS[0] <= port < SINGLE_PORTS[1] < ephemeral_low
        with socket.socket() as probe:
            probe.bind(("0.0.0.0", port))  # free when handed out


def test_single_ports_stay_clear_of_worker_port_blocks() -> None:
    low, high = free_port_range(100)
    assert not set(free_ports(50)) & set(range(low, high + 1))
    assert low >= SINGLE_PORTS[1]
