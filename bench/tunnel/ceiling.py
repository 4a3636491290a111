"""What this machine allows the tunnel at best, measured in the same run as the tunnel itself.

A byte through the tunnel crosses three loopback TCP hops (client -> agent proxy, agent -> gateway,
gateway -> server) and is encrypted once and decrypted once (TLS between agent and gateway). Direct
loopback TCP is one hop. So however little the proxies themselves cost, the tunnel needs at least

    3 x (CPU per byte of one hop, both ends) + AES-GCM encrypt + decrypt per byte

of CPU, and with every core busy its throughput cannot exceed cores / that. ``ceiling_vs_direct``
is that bound as a fraction of direct throughput: the ``tunnel_vs_direct`` target is out of reach
on a machine where this is below it, whatever the data path is written in.
"""

from __future__ import annotations

import os
import secrets
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import netbench

# TLS 1.2/1.3 records carry at most 16 KiB of plaintext; gRPC's TLS endpoint fills them.
TLS_RECORD_BYTES = 16 << 10


def hop_cpu_ns_per_byte(sink_port: int, volume: int) -> float:
    """CPU (user + system, sender and receiver together) per byte of one direct loopback transfer."""
    before = time.process_time()
    sock = netbench.open_via("127.0.0.1", sink_port, None)
    netbench.throughput_mbps(sock, volume)
    return (time.process_time() - before) * 1e9 / volume


def aes_gcm_ns_per_byte(volume: int) -> float:
    """CPU per byte to encrypt and then decrypt it in TLS-sized AES-128-GCM records (OpenSSL)."""
    cipher = AESGCM(AESGCM.generate_key(bit_length=128))
    record = secrets.token_bytes(TLS_RECORD_BYTES)
    nonce = os.urandom(12)
    sealed = cipher.encrypt(nonce, record, None)
    records = max(1, volume // TLS_RECORD_BYTES)
    before = time.process_time()
    for _ in range(records):
        cipher.encrypt(nonce, record, None)
        cipher.decrypt(nonce, sealed, None)
    return (time.process_time() - before) * 1e9 / (records * TLS_RECORD_BYTES)


def tunnel_ceiling(direct_mbps: float, hop_ns: float, aes_ns: float, cores: int) -> dict[str, float]:
    per_byte_ns = 3 * hop_ns + aes_ns
    ceiling_mbps = cores * 8e3 / per_byte_ns  # bytes/ns -> Mbit/s: x 8 bits x 1e3
    return {
        "hop_cpu_ns_per_byte": round(hop_ns, 3),
        "aes_gcm_ns_per_byte": round(aes_ns, 3),
        "tunnel_ceiling_mbps": round(ceiling_mbps, 1),
        "tunnel_ceiling_vs_direct": round(ceiling_mbps / direct_mbps, 3),
    }
