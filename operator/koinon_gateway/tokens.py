"""Join tokens, modelled on kubeadm bootstrap tokens.

A token is ``<token-id>.<token-secret>`` (6 and 16 characters of ``[a-z0-9]``). It is stored as a
Kubernetes Secret of type ``koinon.dev/join-token`` named ``koinon-join-token-<token-id>`` with data
``token-id``, ``token-secret-sha256`` (only a hash of the secret is kept), ``expiration`` (RFC3339,
optional), ``usage-limit`` (optional), ``usages-count``, ``revoked`` ("true" to revoke; deleting the
Secret revokes too, except a ``--bootstrap-token``'s, which the next gateway start creates again
while the flag is given: revoke that one with ``revoked``), ``owner`` and ``region`` (copied to the VolunteerNode spec;
``owner`` is required: a token without one is refused as broken data).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

TOKEN_RE = re.compile(r"^(?P<id>[a-z0-9]{6})\.(?P<secret>[a-z0-9]{16})$")
SECRET_TYPE = "koinon.dev/join-token"
SECRET_PREFIX = "koinon-join-token-"
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
# How long after a join counted its use a retry of it (same join id: its reply was lost) is still
# taken as that join (an agent retries within a minute or two), in the token stores and the gateway.
COUNTED_JOIN_RETRY_S = 15 * 60
# How long a gateway waits, having first seen a join's node left without an address, before it
# takes the node for a dead gateway's and deletes it (service.py, _undo_half_made); the stores
# honour a counted join that much longer than COUNTED_JOIN_RETRY_S, so that a retry first seen
# near the end of that window still joins on the use its first try counted.
HALF_MADE_WAIT_S = 120
COUNTED_JOIN_HONOURED_S = COUNTED_JOIN_RETRY_S + HALF_MADE_WAIT_S
# How many of a token's latest counted joins a store keeps for that.
COUNTED_JOINS_KEPT = 32


class TokenError(Exception):
    """A join token was refused; ``reason`` is machine readable, the message is for humans."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class JoinToken:
    token_id: str
    secret_sha256: str
    expiration: dt.datetime | None = None
    usage_limit: int | None = None
    usages_count: int = 0
    revoked: bool = False
    owner: str = ""
    region: str = ""


@dataclass(frozen=True)
class JoinGrant:
    """What a consumed token entitles the joining node to."""

    token_id: str
    owner: str
    region: str
    join_key: str = ""
    """The join the use was counted for ("" when none was named)."""
    expiration: dt.datetime | None = None
    """The token's, as read (None: it never expires)."""


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """Returns (token_id, token_secret) drawn from a CSPRNG."""
    return (
        "".join(secrets.choice(_ALPHABET) for _ in range(6)),
        "".join(secrets.choice(_ALPHABET) for _ in range(16)),
    )


def parse_token(token: str) -> tuple[str, str]:
    match = TOKEN_RE.match(token.strip())
    if match is None:
        raise TokenError("malformed", "token: expected '<6 chars [a-z0-9]>.<16 chars [a-z0-9]>'")
    return match["id"], match["secret"]


def check_genuine(stored: JoinToken, secret: str) -> None:
    """Raises TokenError unless ``secret`` matches and the token is not revoked."""
    if not hmac.compare_digest(stored.secret_sha256, hash_secret(secret)):
        raise TokenError("invalid-secret", f"token {stored.token_id}: secret does not match")
    if stored.revoked:
        raise TokenError("revoked", f"token {stored.token_id}: revoked")


def check_token(stored: JoinToken, secret: str, now: dt.datetime) -> None:
    """Raises TokenError unless ``secret`` matches and the token may still be used."""
    check_genuine(stored, secret)
    if stored.expiration is not None and now >= stored.expiration:
        raise TokenError("expired", f"token {stored.token_id}: expired at {stored.expiration.isoformat()}")
    if stored.usage_limit is not None and stored.usages_count >= stored.usage_limit:
        raise TokenError("usage-limit", f"token {stored.token_id}: usage limit {stored.usage_limit} reached")


class TokenStore(Protocol):
    async def consume(self, token: str, join_key: str = "") -> JoinGrant:
        """Validates the token and counts one use atomically; raises TokenError when refused.
        ``join_key`` names the join: its use is counted once (for COUNTED_JOIN_RETRY_S), so that the
        retry of a join that made no node (a write that landed unanswered, a gateway that died) is
        not counted again. The gateway names it only for a join that made no node."""
        ...

    async def node_made(self, grant: JoinGrant) -> None:
        """The join ``grant`` counted its use for has made its node (recorded with its address;
        the gateway calls this before the reply goes out): that use is no longer honoured for the
        join's id, so a later join with it (the node deleted, say) counts a use of its own.
        Changes no count; does nothing when the join is not (or no longer) among the counted."""
        ...

    async def give_back(self, grant: JoinGrant) -> None:
        """Uncounts the use ``grant`` took: the join failed after the token was accepted (no free
        address, the node could not be recorded), and a retry must not find a limit-1 token spent."""
        ...

    async def authenticate(self, token: str) -> JoinGrant:
        """Checks that ``token`` is genuine and not revoked, counting no use and ignoring expiry and
        usage limit: for the retry of a join that already counted its use (its reply was lost)."""
        ...


@runtime_checkable
class ExpiredTokenCleaner(Protocol):
    """A token store whose expired tokens the gateway deletes from time to time."""

    async def delete_expired(self, grace: dt.timedelta, now: dt.datetime | None = None) -> list[str]: ...


@dataclass
class InMemoryTokenStore:
    """Token store for unit tests and benchmarks."""

    tokens: dict[str, JoinToken] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Per token id, the joins its latest uses were counted for (join key -> unix time), as the
    # Kubernetes store keeps them: a retry of a join that made no node (its gateway died after
    # counting, or left a node without an address) is not counted a second time, for a while. A
    # join leaves it once its node is made (node_made).
    counted_joins: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(
        self,
        *,
        expiration: dt.datetime | None = None,
        usage_limit: int | None = None,
        owner: str = "",
        region: str = "",
    ) -> str:
        """Creates a token and returns its plain text (the only time it exists unhashed)."""
        token_id, secret = new_token()
        self.tokens[token_id] = JoinToken(
            token_id, hash_secret(secret), expiration, usage_limit, 0, False, owner, region
        )
        return f"{token_id}.{secret}"

    def add_plain(self, token: str, usage_limit: int | None = None, owner: str = "", region: str = "") -> None:
        """Registers a token whose text the caller chose (``--bootstrap-token`` for local dev)."""
        token_id, secret = parse_token(token)
        self.tokens[token_id] = JoinToken(token_id, hash_secret(secret), None, usage_limit, 0, False, owner, region)

    def revoke(self, token: str) -> None:
        token_id, _ = parse_token(token)
        self.tokens[token_id] = replace(self.tokens[token_id], revoked=True)

    async def consume(self, token: str, join_key: str = "") -> JoinGrant:
        token_id, secret = parse_token(token)
        async with self._lock:
            stored = self.tokens.get(token_id)
            if stored is None:
                raise TokenError("unknown", f"token {token_id}: not found (never issued or deleted)")
            now = dt.datetime.now(dt.UTC)
            counted = self.counted_joins.setdefault(token_id, {})
            when = counted.get(join_key) if join_key else None
            if when is not None and now.timestamp() - when < COUNTED_JOIN_HONOURED_S:
                # This join's use is counted already: not refused for it, not counted again; its
                # expiry is checked again (this retry makes a node, and expiry is absolute).
                check_token(replace(stored, usages_count=stored.usages_count - 1), secret, now)
                return JoinGrant(token_id, stored.owner, stored.region, join_key)
            check_token(stored, secret, now)
            self.tokens[token_id] = replace(stored, usages_count=stored.usages_count + 1)
            if join_key:
                counted.pop(join_key, None)  # to the end: the oldest are dropped first
                counted[join_key] = now.timestamp()
                for old_key in list(counted)[:-COUNTED_JOINS_KEPT]:
                    del counted[old_key]
        return JoinGrant(token_id, stored.owner, stored.region, join_key)

    async def authenticate(self, token: str) -> JoinGrant:
        token_id, secret = parse_token(token)
        stored = self.tokens.get(token_id)
        if stored is None:
            raise TokenError("unknown", f"token {token_id}: not found (never issued or deleted)")
        check_genuine(stored, secret)
        return JoinGrant(token_id, stored.owner, stored.region, expiration=stored.expiration)

    async def node_made(self, grant: JoinGrant) -> None:
        async with self._lock:
            self.counted_joins.get(grant.token_id, {}).pop(grant.join_key, None)

    async def give_back(self, grant: JoinGrant) -> None:
        async with self._lock:
            stored = self.tokens.get(grant.token_id)
            if stored is not None and stored.usages_count > 0:
                self.tokens[grant.token_id] = replace(stored, usages_count=stored.usages_count - 1)
                self.counted_joins.get(grant.token_id, {}).pop(grant.join_key, None)
