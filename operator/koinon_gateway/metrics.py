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
    # VolunteerNodes deleted because their agent never connected (unconnected_nodes.py).
    unconnected_nodes_deleted: int = 0
    # Ray node ids agents reported as their own that GCS has at another address (never confirmed:
    # any volunteer can list the others' ids), each once per node session and id.
    ray_node_claims_refused: int = 0
    connections_opened: int = 0
    connections_active: int = 0
    # The most proxied connections one node has held at once since the start (to size
    # max_streams_per_node against what real nodes use).
    node_streams_peak: int = 0
    # The most connections the head has held open (or been opening) to one node at once through the
    # head proxy since the start (to size max_head_connections_per_node).
    head_connections_peak: int = 0
    # Payload bytes of Data frames read from nodes' streams ("from_nodes") and written to them
    # ("to_nodes"): a volunteer-to-volunteer byte counts once each way.
    tunnel_bytes: Counter[str] = field(default_factory=Counter)

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
        """Prometheus text exposition (0.0.4): HELP and TYPE before each family."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, int]]) -> None:
            lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"))
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        # Agents whose Control stream is registered now (what a fleet dashboard plots).
        family("koinon_gateway_sessions_connected", "gauge", "Agents with a registered Control stream.",
               [("", sessions_connected)])  # fmt: skip
        family("koinon_gateway_connections_opened_total", "counter", "Proxied connections opened.",
               [("", self.connections_opened)])  # fmt: skip
        family("koinon_gateway_connections_active", "gauge", "Proxied connections open now.",
               [("", self.connections_active)])  # fmt: skip
        family("koinon_gateway_node_streams_peak", "gauge",
               "Most Connect streams one node has held open at once since the start (silent and refused ones too).",
               [("", self.node_streams_peak)])  # fmt: skip
        family("koinon_gateway_head_connections_peak", "gauge",
               "Most connections the head has held open to one node at once since the start (opening ones too).",
               [("", self.head_connections_peak)])  # fmt: skip
        family("koinon_gateway_tunnel_bytes_total", "counter",
               "Payload bytes carried through the tunnel, by direction as seen from the nodes.",
               [(f'{{direction="{d}"}}', self.tunnel_bytes[d]) for d in ("from_nodes", "to_nodes")])  # fmt: skip
        family("koinon_gateway_unconnected_nodes_deleted_total", "counter",
               "VolunteerNodes deleted because their agent never connected after joining.",
               [("", self.unconnected_nodes_deleted)])  # fmt: skip
        family("koinon_gateway_ray_node_claims_refused_total", "counter",
               "Ray node ids agents reported as their own that GCS has at another address (once per session and id).",
               [("", self.ray_node_claims_refused)])  # fmt: skip
        for name, counter, help_text in (
            ("joins", self.joins, "Join calls by outcome: ok or the refusal reason."),
            ("refused_dials", self.refused_dials, "Dials through the tunnel refused, by reason."),
            ("refused_streams", self.refused_streams, "Control and Connect streams refused or ended, by reason."),
            ("previous_nodes", self.previous_nodes, "What a rejoin did with the node its expired credential named."),
        ):
            samples = [(f'{{reason="{reason}"}}', count) for reason, count in sorted(counter.items())]
            family(f"koinon_gateway_{name}_total", "counter", help_text, samples)
        return "\n".join(lines) + "\n"
