"""The node's identity on disk, so a restarted agent reconnects instead of joining again."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoredIdentity:
    gateway: str
    node_name: str
    address: str
    credential: str
    expires_at: int = 0  # Unix seconds the gateway stops accepting the credential (0: not known)

    def expired(self, now: float) -> bool:
        return 0 < self.expires_at <= now


def _path(state_dir: Path) -> Path:
    return state_dir / "identity.json"


def load(state_dir: Path, gateway: str) -> StoredIdentity | None:
    path = _path(state_dir)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    identity = StoredIdentity(**data)
    # An identity belongs to the gateway that issued it.
    return identity if identity.gateway == gateway else None


def save(state_dir: Path, identity: StoredIdentity) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = _path(state_dir)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds a credential
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(identity), handle)
    tmp.replace(path)


def forget(state_dir: Path) -> None:
    _path(state_dir).unlink(missing_ok=True)
