"""Per-node credentials: an HMAC-signed statement binding one node name to one virtual address.

Format: ``kn1.<base64url(json)>.<base64url(hmac-sha256)>``. It travels only inside TLS, in the
``authorization`` metadata of every Control and Connect call. Deleting the VolunteerNode revokes it
(the gateway checks the object exists on every registration). It expires (claim ``exp``) and the
gateway renews it for the connected session. So a stolen copy, used before it expires, buys the thief
the node for as long as it stays connected (and renewed), ending the real agent's session; the real
agent's reconnect ends the thief's in turn. Deleting the VolunteerNode is what ends both for good.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

PREFIX = "kn1"


class CredentialError(Exception):
    pass


@dataclass(frozen=True)
class NodeIdentity:
    node_name: str
    address: str
    issued_at: int
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class IssuedCredential:
    token: str
    expires_at: int  # Unix seconds


def issue(key: bytes, node_name: str, address: str, lifetime_s: float, now: float | None = None) -> IssuedCredential:
    issued_at = int(time.time() if now is None else now)
    expires_at = issued_at + max(1, int(lifetime_s))
    body = _b64(json.dumps({"n": node_name, "a": address, "iat": issued_at, "exp": expires_at}).encode())
    signature = _b64(hmac.new(key, f"{PREFIX}.{body}".encode(), hashlib.sha256).digest())
    return IssuedCredential(f"{PREFIX}.{body}.{signature}", expires_at)


def verify(key: bytes, credential: str, now: float | None = None, check_expiry: bool = True) -> NodeIdentity:
    """The identity a credential signed with ``key`` states; ``check_expiry=False`` only to name the
    node of an expired credential, never to let it in.

    The signature is checked before anything of the body is parsed: whatever an unauthenticated
    caller sends is compared as bytes, never fed to a parser (a deeply nested body made the JSON
    parser raise RecursionError, which ended the call with UNKNOWN and a logged traceback).
    """
    parts = credential.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or not credential.isascii():
        raise CredentialError("credential: not a kn1 node credential")
    expected = hmac.new(key, f"{PREFIX}.{parts[1]}".encode(), hashlib.sha256).digest()
    # One spelling only: the signature must be exactly the encoding of the expected digest.
    if not hmac.compare_digest(_b64(expected).encode(), parts[2].encode()):
        raise CredentialError("credential: bad signature")
    try:  # signed by this gateway, so well formed unless the signing key leaked
        claims = json.loads(_unb64(parts[1]))
        if not isinstance(claims, dict) or not all(k in claims for k in ("n", "a", "iat", "exp")):
            raise CredentialError("credential: missing claims")
        identity = NodeIdentity(str(claims["n"]), str(claims["a"]), int(claims["iat"]), int(claims["exp"]))
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise CredentialError("credential: undecodable") from exc
    if check_expiry and (time.time() if now is None else now) >= identity.expires_at:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(identity.expires_at))
        raise CredentialError(f"credential: expired at {when}; join again with a new token")
    return identity


def from_metadata(metadata: Any) -> str:
    """Reads the bearer credential from call metadata (a sequence of (key, value) pairs)."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            if text.startswith("Bearer "):
                return text[len("Bearer ") :]
    raise CredentialError("credential: missing 'authorization: Bearer <credential>' metadata")
