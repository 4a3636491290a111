"""Port blocks and virtual address ranges claimed by the local control planes running on this host.

As plain processes, volunteers bind their Ray ports on the host. A bind probe only sees the ports
in use now: a running control plane's volunteers bind a few ports of each block (raylet, object
manager) and none of the blocks kept for volunteers still to come, so a second control plane (the
tests while a user's `make up` runs) could hand the same ports out again. Each control plane
records what it took, under its work dir's name; a claim whose work dir is gone (`down` removes
it) is over.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from koinon_dev.processes import free_port_range


@dataclass(frozen=True)
class Claim:
    port_low: int
    port_high: int
    vip_octet: int  # the control plane's volunteers get 127.<octet>.0.0/24


def claims_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"koinon-dev-claims-{os.getuid()}"


def claim(work_dir: Path, ports: int, low: int, high: int, octets: range = range(20, 220)) -> Claim:
    """Takes a block of ``ports`` free ports between ``low`` and ``high`` and an octet that no
    live control plane of this user holds, and records them for ``work_dir``."""
    directory = claims_dir()
    directory.mkdir(mode=0o700, exist_ok=True)
    with open(directory / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        held = _live_claims(directory, besides=f"{work_dir.name}.json")  # a claim again replaces ours
        taken = [range(c.port_low, c.port_high + 1) for c in held]
        for _ in range(200):
            port_low, port_high = free_port_range(ports, low=low, high=high, reserve=False)
            if not any(port_low <= r.stop - 1 and r.start <= port_high for r in taken):
                break
        else:
            raise RuntimeError(f"no free block of {ports} ports between {low} and {high} that no control plane holds")
        free_octets = [o for o in octets if o not in {c.vip_octet for c in held}]
        if not free_octets:
            raise RuntimeError("every virtual address range is held by a running control plane")
        result = Claim(port_low, port_high, random.choice(free_octets))
        record = {"work_dir": str(work_dir), **result.__dict__}
        (directory / f"{work_dir.name}.json").write_text(json.dumps(record))
        return result


def _live_claims(directory: Path, besides: str) -> list[Claim]:
    held = []
    for path in directory.glob("*.json"):
        if path.name == besides:
            continue
        try:
            record = json.loads(path.read_text())
            alive = Path(record["work_dir"]).is_dir()
            found = Claim(int(record["port_low"]), int(record["port_high"]), int(record["vip_octet"]))
        except (OSError, ValueError, KeyError, TypeError):
            alive = False
        if not alive:
            path.unlink(missing_ok=True)  # its control plane is down (or the record is unreadable)
            continue
        held.append(found)
    return held
