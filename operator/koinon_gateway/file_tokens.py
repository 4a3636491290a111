"""Join tokens of the file store (``--store file``): usage counts survive a gateway restart.

With the file store, tokens come from ``--bootstrap-token`` and live in memory; without this, a
token limited to N joins would allow N more after every restart. Each consume and give-back
rewrites ``<state-dir>/join-token-usage.json`` (atomically, and synced to disk before it counts)
with each token's count, keyed by token id and the hash of its secret, so a token id reused with a
new secret starts from zero, and with the joins its latest uses were counted for (digests of their
join ids, with when), so that a join retried after a restart is counted once, as in the
Kubernetes store. Only hashes are written, never a secret.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .durable_files import write_durably
from .tokens import COUNTED_JOINS_KEPT, InMemoryTokenStore, JoinGrant, hash_secret, parse_token

log = logging.getLogger(__name__)


def _read_usage(path: Path) -> dict[str, dict[str, Any]]:
    """The saved counts; an unreadable or malformed file counts as none (and is reported)."""
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("join token usage file %s unreadable (%s): counts start from zero", path, exc)
        return {}
    if not isinstance(saved, dict):
        log.warning("join token usage file %s is not a JSON object: counts start from zero", path)
        return {}
    return {key: value for key, value in saved.items() if isinstance(value, dict)}


@dataclass
class FileTokenStore(InMemoryTokenStore):
    """``InMemoryTokenStore`` whose usage counts are kept in ``path``."""

    path: Path = field(default=Path("join-token-usage.json"))

    def add_plain(self, token: str, usage_limit: int | None = None, owner: str = "", region: str = "") -> None:
        super().add_plain(token, usage_limit=usage_limit, owner=owner, region=region)
        token_id, secret = parse_token(token)
        saved = _read_usage(self.path).get(token_id, {})
        count = saved.get("usages")
        if saved.get("secret_sha256") != hash_secret(secret):
            return
        if isinstance(count, int) and count > 0:
            self.tokens[token_id] = replace(self.tokens[token_id], usages_count=count)
        counted = saved.get("counted_joins")
        if isinstance(counted, dict):
            readable = [
                (float(when), str(key))
                for key, when in counted.items()
                if isinstance(when, int | float) and not isinstance(when, bool)
            ]
            # Oldest first, as the store keeps them (the file's keys are sorted by name).
            self.counted_joins[token_id] = {key: when for when, key in sorted(readable)[-COUNTED_JOINS_KEPT:]}

    async def consume(self, token: str, join_key: str = "") -> JoinGrant:
        grant = await super().consume(token, join_key)
        try:
            self._save()
        except OSError:
            await super().give_back(grant)  # a use that cannot be recorded is not granted
            raise
        return grant

    async def node_made(self, grant: JoinGrant) -> None:
        counted = self.counted_joins.get(grant.token_id, {})
        when = counted.get(grant.join_key)
        if when is None:
            return  # nothing to forget: no write (a replayed join asks again)
        await super().node_made(grant)
        try:
            self._save()
        except OSError:
            # Still in the file, it would be honoured again after a restart: kept here too, so
            # that the gateway's retry of this (the join answered "retry") writes it again.
            counted[grant.join_key] = when
            raise

    async def give_back(self, grant: JoinGrant) -> None:
        await super().give_back(grant)
        self._save()

    def _save(self) -> None:
        # Tokens not given this time (a restart without their flag) keep their counts: rewriting
        # only the ones in memory reset a token's uses to zero for when it is given again.
        usage = _read_usage(self.path) if self.path.exists() else {}
        usage.update(
            {
                token_id: {
                    "secret_sha256": stored.secret_sha256,
                    "usages": stored.usages_count,
                    "counted_joins": self.counted_joins.get(token_id, {}),
                }
                for token_id, stored in self.tokens.items()
            }
        )
        write_durably(self.path, json.dumps(usage, indent=1, sort_keys=True))
