"""What a node may report about itself (at Join, Register and in every heartbeat).

Shared with the agent (koinon_agent.config, koinon_agent.gpus), which checks its own settings and
the GPUs it detects against these: a value the gateway would refuse is then a configuration error
naming its flag (exit 2), or a GPU left out with a log line, rather than a join refused as if the
token were bad (exit 3), and nothing is clamped here while Ray is told another number there.
"""

from __future__ import annotations

MAX_GPUS = 64
MAX_TEXT = 128  # characters of a GPU model, name hint, region, agent version
MAX_GPU_MEMORY_MIB = 1 << 24  # 16 TiB per GPU
