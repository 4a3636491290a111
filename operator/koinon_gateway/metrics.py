"""Counters the gateway exposes on /metrics and to tests."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class GatewayMetrics:
    joins: Counter[str] = field(default_factory=Counter)  # by outcome: ok or refusal reason
    refused_dials: Counter[str] = field(default_factory=Counter)  # by reason
    refused_streams: Counter[str] = field(default_factory=Counter)  # auth/protocol failures
    # What a rejoin did with the node an expired credential named: "retired" or "kept".
    previous_nodes: Counter[str] = field(default_factory=Counter)
    connections_opened: int = 0
    connections_active: int = 0
    # The most proxied connections one node has held at once since the start (to size
    # max_streams_per_node against what real nodes use).
    node_streams_peak: int = 0
    bytes_from_agents: int = 0

    @contextlib.contextmanager
    def connection(self) -> Iterator[None]:
        """One proxied connection, once open: counted in opened, and in active while it lasts (a
        volunteer-to-volunteer connection is one, though it takes two Connect streams)."""
        self.connections_opened += 1
        self.connections_active += 1
        try:
            yield
        finally:
            self.connections_active -= 1

    def render(self, sessions_connected: int = 0) -> str:
        lines = [
            # Agents whose Control stream is registered now (what a fleet dashboard plots).
            f"koinon_gateway_sessions_connected {sessions_connected}",
            f"koinon_gateway_connections_opened_total {self.connections_opened}",
            f"koinon_gateway_connections_active {self.connections_active}",
            f"koinon_gateway_node_streams_peak {self.node_streams_peak}",
        ]
        for name, counter in (
            ("joins", self.joins),
            ("refused_dials", self.refused_dials),
            ("refused_streams", self.refused_streams),
            ("previous_nodes", self.previous_nodes),
        ):
            for reason, count in sorted(counter.items()):
                lines.append(f'koinon_gateway_{name}_total{{reason="{reason}"}} {count}')
        return "\n".join(lines) + "\n"
