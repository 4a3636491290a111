"""Join tokens kept as Kubernetes Secrets (the layout is described in ``tokens.py``).

Counting a use is a read-modify-write guarded by the Secret's ``resourceVersion``: the PUT of a
stale copy answers 409, and the consumer reads again and re-checks (the limit may have been reached
meanwhile). So two gateways, or two joins in one gateway, never both take the last use.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

from .kube_client import JSON, KubeApiError, KubeClient, b64, secret_path, unb64
from .tokens import (
    COUNTED_JOIN_HONOURED_S,
    COUNTED_JOINS_KEPT,
    SECRET_PREFIX,
    SECRET_TYPE,
    JoinGrant,
    JoinToken,
    TokenError,
    check_genuine,
    check_token,
    hash_secret,
    new_token,
    parse_token,
)

log = logging.getLogger(__name__)

TOKEN_LABEL = "koinon.dev/join-token"
MAX_CONFLICT_RETRIES = 50


def secret_name(token_id: str) -> str:
    return f"{SECRET_PREFIX}{token_id}"


def parse_rfc3339(text: str) -> dt.datetime:
    """The time, in UTC. One that UTC cannot hold (9999-12-31T23:59:59-05:00 is in year 10000
    there) is taken as the latest (or earliest) time it can: converting it later, to print it or
    compare it, would raise OverflowError, and both are centuries away from any clock reading."""
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("no time zone")
    try:
        return parsed.astimezone(dt.UTC)
    except OverflowError:
        return (dt.datetime.max if parsed.year == dt.MAXYEAR else dt.datetime.min).replace(tzinfo=dt.UTC)


def token_from_secret(secret: JSON) -> JoinToken:
    """Decodes the Secret; malformed data is refused with a reason naming the field. An empty
    owner is not refused here (``add_plain`` gives an older gateway's owner-less Secret the flag's
    owner) but when the token is used (``check_owner``)."""
    data: dict[str, Any] = secret.get("data") or {}
    name = (secret.get("metadata") or {}).get("name", "?")

    def field(key: str) -> str:
        try:
            return unb64(str(data[key])) if key in data else ""
        except ValueError as exc:
            raise TokenError("invalid-token-data", f"Secret {name}: data.{key}: not base64 UTF-8") from exc

    def integer(key: str) -> int | None:
        text = field(key)
        if not text:
            return None
        if not (text.isascii() and text.isdigit()):  # str.isdigit() alone takes "²", which int() refuses
            # The value stays out of the message: a join is refused with it before its secret is checked.
            raise TokenError("invalid-token-data", f"Secret {name}: data.{key}: not a non-negative integer")
        return int(text)

    expiration_text = field("expiration")
    try:
        expiration = parse_rfc3339(expiration_text) if expiration_text else None
    except ValueError as exc:
        raise TokenError("invalid-token-data", f"Secret {name}: data.expiration: not RFC3339") from exc
    token_id, digest = field("token-id"), field("token-secret-sha256")
    if not token_id or len(digest) != 64:
        raise TokenError("invalid-token-data", f"Secret {name}: data.token-id/token-secret-sha256: missing")
    if name != secret_name(token_id):  # a copied Secret: its cleanup would delete the token it names
        raise TokenError("invalid-token-data", f"Secret {name}: data.token-id does not match the Secret's name")
    return JoinToken(
        token_id=token_id,
        secret_sha256=digest,
        expiration=expiration,
        usage_limit=integer("usage-limit"),
        usages_count=integer("usages-count") or 0,
        revoked=field("revoked").strip().lower() == "true",
        owner=field("owner"),
        region=field("region"),
    )


def check_owner(stored: JoinToken) -> None:
    """Refuses, as broken token data, a token without an owner: the node it makes would be
    refused by the VolunteerNode CRD (spec.owner, minLength 1), each join given its use back and
    answered "retry" for ever, whereas broken data is refused for good and said so in the log."""
    if not stored.owner:
        raise TokenError(
            "invalid-token-data",
            f"Secret {secret_name(stored.token_id)}: data.owner: missing or empty (every VolunteerNode has an owner)",
        )


# Secret data field: the joins (service.join_key of their join ids) the latest uses were counted
# for, with when (`key@unix seconds`, comma-separated), so that the retry of a join whose counting
# write landed unanswered is not counted twice. Only for a while (an agent retries within a
# minute or two), and only for a join that made no node (the gateway asks for none otherwise, and
# drops the key once the join's node is recorded, before its reply goes out: a node deleted later
# must not leave its use honoured for the id): an old key honoured for ever would let a spent
# token make nodes by resending a join id.
COUNTED_JOINS_FIELD = "counted-joins"
CountedJoins: TypeAlias = list[str]  # (KubeTokenStore has a method named list)


def counted_joins(data: Mapping[str, Any]) -> CountedJoins:
    """The Secret data's counted joins; unreadable ones count as none (only a retry is affected)."""
    try:
        text = unb64(str(data[COUNTED_JOINS_FIELD])) if COUNTED_JOINS_FIELD in data else ""
    except ValueError:
        return []
    return [key for key in text.split(",") if key]


def _counted_since(counted: CountedJoins, key: str, now: float) -> bool:
    """Whether ``key``'s use was counted less than COUNTED_JOIN_HONOURED_S ago."""
    for entry in counted:
        name, _, when = entry.partition("@")
        if name == key and when.isdigit() and now - int(when) < COUNTED_JOIN_HONOURED_S:
            return True
    return False


def _without(counted: CountedJoins, key: str) -> CountedJoins:
    return [entry for entry in counted if entry.partition("@")[0] != key]


def token_secret(namespace: str, token: JoinToken) -> JSON:
    data = {
        "token-id": token.token_id,
        "token-secret-sha256": token.secret_sha256,
        "usages-count": str(token.usages_count),
        "revoked": "true" if token.revoked else "false",
        "owner": token.owner,
        "region": token.region,
    }
    if token.expiration is not None:
        data["expiration"] = token.expiration.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if token.usage_limit is not None:
        data["usage-limit"] = str(token.usage_limit)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE,
        "metadata": {
            "name": secret_name(token.token_id),
            "namespace": namespace,
            "labels": {TOKEN_LABEL: "true"},
        },
        "data": {key: b64(value) for key, value in data.items()},
    }


@dataclass
class KubeTokenStore:
    client: KubeClient
    namespace: str
    # 409s absorbed while counting uses (observability and tests).
    conflicts: int = 0

    async def create(
        self,
        *,
        owner: str,
        ttl: dt.timedelta | None = dt.timedelta(hours=24),
        usage_limit: int | None = None,
        region: str = "",
    ) -> str:
        """Creates a token Secret and returns ``id.secret``: the only time the secret exists in clear."""
        if not owner:
            raise ValueError("owner: required (VolunteerNode.spec.owner)")
        if usage_limit is not None and usage_limit < 1:
            raise ValueError("usage_limit: must be at least 1")
        if ttl is not None and ttl <= dt.timedelta(0):
            raise ValueError("ttl: must be positive")
        expiration = dt.datetime.now(dt.UTC).replace(microsecond=0) + ttl if ttl is not None else None
        for _ in range(5):
            token_id, secret = new_token()
            token = JoinToken(token_id, hash_secret(secret), expiration, usage_limit, 0, False, owner, region)
            try:
                await self.client.create(secret_path(self.namespace), token_secret(self.namespace, token))
            except KubeApiError as exc:
                if exc.conflict:  # token id taken (1 in 2e9): draw another
                    continue
                raise
            log.info("created join token %s for owner %s", token_id, owner)
            return f"{token_id}.{secret}"
        raise RuntimeError("could not draw an unused token id")

    async def add_plain(self, token: str, usage_limit: int | None = None, owner: str = "", region: str = "") -> None:
        """Registers a caller-chosen token (``--bootstrap-token``). When its Secret exists already
        (a restart), its owner and usage limit are brought to what the flag says now; its usage
        count, revocation and secret stay (another token with the same id is refused as before)."""
        token_id, secret = parse_token(token)
        stored = JoinToken(token_id, hash_secret(secret), None, usage_limit, 0, False, owner, region)
        try:
            await self.client.create(secret_path(self.namespace), token_secret(self.namespace, stored))
            return
        except KubeApiError as exc:
            if not exc.conflict:
                raise
        existing = await self.client.get_or_none(secret_path(self.namespace, secret_name(token_id)))
        if existing is None or existing.get("type") != SECRET_TYPE:
            return
        try:
            current = token_from_secret(existing)
        except TokenError as exc:  # a hand-edited Secret: leave it to its owner, start anyway
            log.warning("bootstrap token %s left as it is: %s", token_id, exc)
            return
        if current.secret_sha256 != stored.secret_sha256 or (current.owner, current.usage_limit) == (
            owner,
            usage_limit,
        ):
            return  # another token with this id (its joins refuse this secret), or nothing to change
        data = {"owner": b64(owner), "usage-limit": b64(str(usage_limit)) if usage_limit is not None else None}
        await self.client.merge_patch(secret_path(self.namespace, secret_name(token_id)), {"data": data})

    async def revoke(self, token_id: str) -> None:
        await self.client.merge_patch(
            secret_path(self.namespace, secret_name(token_id)), {"data": {"revoked": b64("true")}}
        )

    async def delete_expired(self, grace: dt.timedelta, now: dt.datetime | None = None) -> list[str]:
        """Deletes token Secrets that expired more than ``grace`` ago (as kubeadm's token cleaner
        does); returns their ids. Within the grace period a late join still hears "expired" rather
        than "not found". Secrets with unreadable data are left for a person to look at."""
        now = now or dt.datetime.now(dt.UTC)
        items, _ = await self.client.list_all(secret_path(self.namespace), f"{TOKEN_LABEL}=true")
        deleted: list[str] = []
        for item in items:
            if item.get("type") != SECRET_TYPE:
                continue
            try:
                token = token_from_secret(item)
            except TokenError as exc:
                log.warning("token cleanup skipped a Secret: %s", exc)
                continue
            # Not expiration + grace: past 9999-12-31 (an expiration of that day, meaning "never")
            # that raises OverflowError, and one such token stopped the cleanup of all the others.
            if token.expiration is None or token.expiration > now - grace:
                continue
            metadata = item.get("metadata") or {}
            # Only the Secret as read: one a person extended meanwhile stays (409 Conflict).
            preconditions = {k: str(metadata[k]) for k in ("uid", "resourceVersion") if metadata.get(k)}
            try:
                await self.client.delete(secret_path(self.namespace, str(metadata["name"])), preconditions)
            except KubeApiError as exc:
                if not (exc.not_found or exc.conflict):
                    raise
                continue
            deleted.append(token.token_id)
            log.info("deleted join token %s (expired at %s)", token.token_id, token.expiration.isoformat())
        return deleted

    async def list(self) -> list[JoinToken]:
        """The readable tokens; an unreadable Secret is logged and left out, not fatal to the rest."""
        items, _ = await self.client.list_all(secret_path(self.namespace), f"{TOKEN_LABEL}=true")
        tokens: list[JoinToken] = []
        for item in items:
            if item.get("type") != SECRET_TYPE:
                continue
            try:
                tokens.append(token_from_secret(item))
            except TokenError as exc:
                log.warning("token list skipped a Secret: %s", exc)
        return tokens

    async def consume(self, token: str, join_key: str = "") -> JoinGrant:
        token_id, secret = parse_token(token)

        def one_more(stored: JoinToken, counted: CountedJoins) -> tuple[int, CountedJoins] | None:
            check_owner(stored)  # before the secret, as other broken data (service.UNRECOGNIZED_TOKEN)
            now = dt.datetime.now(dt.UTC)
            if join_key and _counted_since(counted, join_key, now.timestamp()):
                # An earlier try of this join counted its use and the API's answer never came back
                # (a timeout): the retry must not be refused for that use, nor count a second. Its
                # expiry is checked again, though: this retry makes a node the first try did not,
                # and after expiry (absolute, as a kubeadm bootstrap token's) a token makes none.
                check_token(replace(stored, usages_count=stored.usages_count - 1), secret, now)
                return None
            check_token(stored, secret, now)
            if join_key:
                entry = f"{join_key}@{int(now.timestamp())}"
                counted = [*_without(counted, join_key), entry][-COUNTED_JOINS_KEPT:]
            return stored.usages_count + 1, counted

        # A KubeApiError (not a TokenError) when the retries run out: the agent should retry later.
        stored = await self._change_count(token_id, one_more, "too many concurrent uses, try again")
        if stored is None:
            raise TokenError("unknown", f"token {token_id}: not found (never issued or deleted)")
        return JoinGrant(token_id, stored.owner, stored.region, join_key)

    async def authenticate(self, token: str) -> JoinGrant:
        token_id, secret = parse_token(token)
        stored_secret = await self.client.get_or_none(secret_path(self.namespace, secret_name(token_id)))
        if stored_secret is None or stored_secret.get("type") != SECRET_TYPE:
            raise TokenError("unknown", f"token {token_id}: not found (never issued or deleted)")
        stored = token_from_secret(stored_secret)
        check_genuine(stored, secret)
        return JoinGrant(token_id, stored.owner, stored.region, expiration=stored.expiration)

    async def node_made(self, grant: JoinGrant) -> None:
        def forget_join(stored: JoinToken, counted: CountedJoins) -> tuple[int, CountedJoins] | None:
            remaining = _without(counted, grant.join_key)
            if not grant.join_key or remaining == counted:
                return None  # not among the counted (a replay whose first try forgot it): no write
            return stored.usages_count, remaining

        await self._change_count(grant.token_id, forget_join, "could not record that the join made its node")

    async def give_back(self, grant: JoinGrant) -> None:
        def one_less(stored: JoinToken, counted: CountedJoins) -> tuple[int, CountedJoins] | None:
            if stored.usages_count <= 0:
                return None
            return stored.usages_count - 1, _without(counted, grant.join_key)

        await self._change_count(grant.token_id, one_less, "could not give the use back")

    async def _change_count(
        self,
        token_id: str,
        change: Callable[[JoinToken, CountedJoins], tuple[int, CountedJoins] | None],
        when_stuck: str,
    ) -> JoinToken | None:
        """Sets the token's usage count and the joins it was counted for to ``change(token,
        counted joins)`` (None: leave them) with optimistic concurrency; returns the token as read,
        or None when there is no such token."""
        path = secret_path(self.namespace, secret_name(token_id))
        for attempt in range(MAX_CONFLICT_RETRIES):
            stored_secret = await self.client.get_or_none(path)
            if stored_secret is None or stored_secret.get("type") != SECRET_TYPE:
                return None
            stored = token_from_secret(stored_secret)
            data = stored_secret.setdefault("data", {})
            changed = change(stored, counted_joins(data))
            if changed is None:
                return stored
            count, counted = changed
            # resourceVersion stays in the body: a concurrent writer makes this PUT fail with 409.
            data["usages-count"] = b64(str(count))
            data[COUNTED_JOINS_FIELD] = b64(",".join(counted))
            try:
                await self.client.replace(path, stored_secret)
            except KubeApiError as exc:
                if exc.not_found:
                    # Deleted since the read (deleting the Secret revokes the token): as if it had
                    # never been found. A node_made then has nothing left to forget, and its join
                    # must not be answered "retry" for a token its retry would find gone.
                    return None
                if not exc.conflict:
                    raise
                self.conflicts += 1
                await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
                continue
            return stored
        raise KubeApiError(409, "Conflict", f"token {token_id}: {when_stuck}")
