"""Per-node credentials: an HMAC-signed statement binding one node name to one virtual address.

Format: ``kn1.<base64url(json)>.<base64url(hmac-sha256)>``. It travels only inside TLS, in the
``authorization`` metadata of every Control and Connect call. Deleting the VolunteerNode revokes it
(the gateway checks the object exists on every registration).
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


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(key: bytes, node_name: str, address: str) -> str:
    body = _b64(json.dumps({"n": node_name, "a": address, "iat": int(time.time())}).encode())
    signature = _b64(hmac.new(key, f"{PREFIX}.{body}".encode(), hashlib.sha256).digest())
    return f"{PREFIX}.{body}.{signature}"


def verify(key: bytes, credential: str) -> NodeIdentity:
    parts = credential.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise CredentialError("credential: not a kn1 node credential")
    expected = hmac.new(key, f"{PREFIX}.{parts[1]}".encode(), hashlib.sha256).digest()
    try:
        signature = _unb64(parts[2])
        claims = json.loads(_unb64(parts[1]))
    except (ValueError, json.JSONDecodeError) as exc:
        raise CredentialError("credential: undecodable") from exc
    if not hmac.compare_digest(expected, signature):
        raise CredentialError("credential: bad signature")
    if not isinstance(claims, dict) or not all(k in claims for k in ("n", "a", "iat")):
        raise CredentialError("credential: missing claims")
    return NodeIdentity(str(claims["n"]), str(claims["a"]), int(claims["iat"]))


def from_metadata(metadata: Any) -> str:
    """Reads the bearer credential from call metadata (a sequence of (key, value) pairs)."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            if text.startswith("Bearer "):
                return text[len("Bearer ") :]
    raise CredentialError("credential: missing 'authorization: Bearer <credential>' metadata")
