"""The tunnel benchmark's ceiling: the least CPU per byte any tunnel needs, turned into a bound."""

from __future__ import annotations

import math

from bench.tunnel import ceiling, netbench


def test_ceiling_counts_three_hops_and_one_encrypt_decrypt_over_all_cores() -> None:
    # 3 x 0.5 ns + 1.0 ns = 2.5 ns of CPU per byte; 2 cores -> 0.8 bytes/ns = 6,400 Mbit/s.
    bound = ceiling.tunnel_ceiling(direct_mbps=25_600, hop_ns=0.5, aes_ns=1.0, cores=2)
    assert bound["tunnel_ceiling_mbps"] == 6400.0
    assert bound["tunnel_ceiling_vs_direct"] == 0.25
    # Cheaper crypto or more cores raise it; a costlier hop lowers it.
    assert ceiling.tunnel_ceiling(25_600, 0.5, 0.5, 2)["tunnel_ceiling_mbps"] > 6400
    assert ceiling.tunnel_ceiling(25_600, 0.5, 1.0, 4)["tunnel_ceiling_mbps"] == 12800.0
    assert ceiling.tunnel_ceiling(25_600, 1.0, 1.0, 2)["tunnel_ceiling_mbps"] < 6400


def test_measurements_are_per_byte_cpu_costs() -> None:
    sink, port = netbench.start_sink()
    try:
        hop = ceiling.hop_cpu_ns_per_byte(port, 32 << 20)
    finally:
        sink.close()
    aes = ceiling.aes_gcm_ns_per_byte(8 << 20)
    # Copying a byte through the kernel twice, or sealing and opening it, costs some CPU but far
    # less than a microsecond on any machine this runs on.
    for value in (hop, aes):
        assert math.isfinite(value) and 0.01 < value < 1000
