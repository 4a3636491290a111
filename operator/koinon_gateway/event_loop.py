"""Runs the gateway's and the agent's asyncio programs on uvloop when it is installed.

uvloop's libuv-based loop roughly halves the per-wakeup cost of the tunnel's data path (each
proxied message crosses several event-loop wakeups; see workers/koinon_agent/README.md). grpc.aio
works on it. Without uvloop (e.g. a platform it does not support) the stdlib loop is used.

``run`` also tunes glibc's allocator for the data path (see ``tune_allocator``), and importing this
module selects gRPC's iomgr TCP endpoints (see ``GRPC_EXPERIMENTS``): the gateway's and the agent's
entry points import it before anything imports grpc.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# gRPC core's EventEngine TCP client/listener hand each received message through more threads
# (seen with strace: poller, two pool workers, then the completion queue's poller) than iomgr's
# endpoints. Using iomgr's cut the tunnel's added round trip by ~70 us at p50 (bench/tunnel, 2 cores)
# and some gateway CPU per byte. grpc reads GRPC_EXPERIMENTS once, when it is imported, so this must
# happen first; an explicit setting in the environment wins.
GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"
# Whether this module put GRPC_EXPERIMENTS into the environment: then it is the agent's tuning,
# not the user's, and the processes the agent starts (Ray's) must not inherit it.
GRPC_EXPERIMENTS_SET_HERE = "grpc" not in sys.modules and "GRPC_EXPERIMENTS" not in os.environ
if GRPC_EXPERIMENTS_SET_HERE:
    os.environ["GRPC_EXPERIMENTS"] = GRPC_EXPERIMENTS


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 << 20
TRIM_THRESHOLD_BYTES = 32 << 20


def tune_allocator() -> bool:
    """Serves the data path's ~1 MiB buffers (gRPC slices, message bytes) from the heap.

    By default glibc maps each allocation above 128 KiB (its threshold then adapts) with mmap and
    gives freed memory back to the kernel soon; at ~1 GB/s that means page faults and zeroing of
    every megabyte moved. In bench/tunnel this cut the agent's CPU time per GiB by about a fifth
    and the gateway's by about a tenth. Returns False where mallopt is not available (not glibc);
    explicit MALLOC_*_ environment settings win.
    """
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def run(main: Coroutine[Any, Any, T]) -> T:
    """Like ``asyncio.run``, on uvloop where available, with the allocator tuned."""
    tune_allocator()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
