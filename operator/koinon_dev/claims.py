"""Port blocks and virtual address ranges claimed by the local control planes running on this host.

As plain processes, volunteers bind their Ray ports on the host. A bind probe only sees the ports
in use now: a running control plane's volunteers bind a few ports of each block (raylet, object
manager) and none of the blocks kept for volunteers still to come, so a second control plane (the
tests while a user's `make up` runs) could hand the same ports out again. Each control plane
records what it took, and then which process holds it (its gateway, which lives as long as it
does); a claim whose holder is gone, or that no holder took within a few minutes, is over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import random
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from koinon_dev.processes import boot_id, ports_free, process_start_time

# A claim not yet held by a process (the gateway starts right after the claim) lasts this long.
UNHELD_CLAIM_S = 600.0


@dataclass(frozen=True)
class Claim:
    port_low: int
    port_high: int
    vip_octet: int  # the control plane's volunteers get 127.<octet>.0.0/24


def claims_dir() -> Path:
    """One place per user and host, whatever the environment: after $TMPDIR (which one shell sets
    and another does not), two control planes of the user kept their claims apart and took the
    same ports and addresses. In the user's home from the password database (not $HOME, which sudo
    may keep), where no other user can create it first: a fixed name in /tmp, which anyone may
    take, locked the user out until the next boot. One directory per boot of the machine (its boot
    id), as ports, 127.x addresses and the pids that hold them are the running machine's: a home
    shared by several hosts (NFS) must not let one host judge another's claims dead, and a host
    renamed while a control plane runs (DHCP) must still see that plane's claims. /tmp only where
    the home cannot take it."""
    home = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "koinon" / "dev-claims"
    if _can_create(home):
        return home / boot_id()
    return Path("/tmp") / f"koinon-dev-claims-{os.getuid()}"


def _can_create(path: Path) -> bool:
    """Whether this user can make ``path`` (or use it, if it exists): its nearest existing
    ancestor is a directory the user may write in."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def _own_directory() -> Path:
    """The claims dir, created private; refused when it is not (another local user made it first,
    or put a link there): its records decide what this user's control planes may take."""
    directory = claims_dir()
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise RuntimeError(f"{directory} is not a private directory of this user; remove it and try again")
    return directory


def claim(work_dir: Path, ports: int, low: int, high: int, octets: range = range(20, 220)) -> Claim:
    """Takes a slot of ``ports`` free ports between ``low`` and ``high`` (slots are aligned, so
    as many control planes fit as slots) and an octet that no live control plane of this user
    holds, and records them for ``work_dir``."""
    directory = _own_directory()
    with open(directory / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        held = _live_claims(directory, besides=_record_name(work_dir))  # a claim again replaces ours
        taken = [range(c.port_low, c.port_high + 1) for _, c in held]
        slots = list(range(low, high - ports + 1, ports))
        random.shuffle(slots)
        port_low = next(
            (
                start
                for start in slots
                if not any(start <= r.stop - 1 and r.start <= start + ports - 1 for r in taken)
                and ports_free(start, ports)
            ),
            None,
        )
        if port_low is None:
            holders = ", ".join(str(path) for path, _ in held) or "none"
            raise RuntimeError(
                f"no free block of {ports} ports between {low} and {high}; held by the control planes in: {holders}"
            )
        free_octets = [o for o in octets if o not in {c.vip_octet for _, c in held}]
        if not free_octets:
            raise RuntimeError("every virtual address range is held by a running control plane")
        result = Claim(port_low, port_low + ports - 1, random.choice(free_octets))
        record = {"work_dir": str(work_dir), "claimed_at": time.time(), **result.__dict__}
        (directory / _record_name(work_dir)).write_text(json.dumps(record))
        return result


def hold(work_dir: Path, pid: int) -> None:
    """Names the process that holds ``work_dir``'s claim: the claim lasts as long as it runs."""
    directory = _own_directory()
    with open(directory / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = directory / _record_name(work_dir)
        record = json.loads(path.read_text())
        record.update(pid=pid, pid_start=process_start_time(pid))
        path.write_text(json.dumps(record))


def _record_name(work_dir: Path) -> str:
    return f"{work_dir.name}.json"


def _live_claims(directory: Path, besides: str) -> list[tuple[Path, Claim]]:
    held = []
    for path in directory.glob("*.json"):
        if path.name == besides:
            continue
        try:
            record = json.loads(path.read_text())
            found = Claim(int(record["port_low"]), int(record["port_high"]), int(record["vip_octet"]))
            if "pid" in record:
                alive = (
                    record["pid_start"] is not None and process_start_time(int(record["pid"])) == record["pid_start"]
                )
            else:
                alive = Path(record["work_dir"]).is_dir() and time.time() - float(record["claimed_at"]) < UNHELD_CLAIM_S
        except (OSError, ValueError, KeyError, TypeError):
            alive = False
        if not alive:
            path.unlink(missing_ok=True)  # its control plane is down (or the record is unreadable)
            continue
        held.append((Path(record["work_dir"]), found))
    return held
