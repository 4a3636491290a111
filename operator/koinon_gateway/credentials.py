"""Per-node credentials: an HMAC-signed statement binding one node name to one virtual address.

Format: ``kn1.<base64url(json)>.<base64url(hmac-sha256)>``. It travels only inside TLS, in the
``authorization`` metadata of every Control and Connect call. It names the VolunteerNode object
itself, not just its name (claim ``u``: the object's ``metadata.uid``): deleting the VolunteerNode
revokes it (the gateway checks on every registration that the object exists and is the one the
credential was issued for), and an object created again under the same name later (an admin
re-applying it, a join that drew the same name) is another object with another uid, which no
credential of the deleted one opens. It expires (claim ``exp``) and the gateway renews it for the
connected session. So a stolen copy, used before it expires, buys the thief the node for as long
as it stays connected (and renewed), ending the real agent's session; the real agent's reconnect
ends the thief's in turn. Deleting the VolunteerNode is what ends both for good.

Credentials issued before the uid claim existed carry none (``NodeIdentity.uid == ""``). The gateway
takes them, name and address checked as before (and only for an object created before they were
issued: a later one is another object under the name), until they expire rather than refuse them: refused,
every connected agent would lose its session on the gateway's upgrade and join again, spending a
token use (one-use tokens are spent already, so those agents would stop) and leaving its old node
behind as a NotReady ghost (a credential still valid is never retired). Their window is bounded:
the registration they are used for is answered with a renewal that carries the uid, and no
uid-less credential is issued any more, so none is left once one credential lifetime has passed.
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
    # metadata.uid of the VolunteerNode it was issued for; "" in a credential issued before uids were
    # bound (see the module docstring).
    uid: str = ""

    def names(self, uid: str) -> bool:
        """Whether this credential was issued for the object with ``uid`` (one without a uid claim
        only names the node by name, until it expires)."""
        return not self.uid or self.uid == uid


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class IssuedCredential:
    token: str
    expires_at: int  # Unix seconds


def issue(
    key: bytes, node_name: str, address: str, lifetime_s: float, now: float | None = None, *, uid: str
) -> IssuedCredential:
    """A credential for the VolunteerNode ``node_name`` whose ``metadata.uid`` is ``uid``."""
    if not uid:  # a credential without it would name whatever object holds the name later
        raise ValueError("uid: the VolunteerNode's metadata.uid is required")
    issued_at = int(time.time() if now is None else now)
    expires_at = issued_at + max(1, int(lifetime_s))
    claims = {"n": node_name, "a": address, "u": uid, "iat": issued_at, "exp": expires_at}
    body = _b64(json.dumps(claims).encode())
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
        identity = NodeIdentity(
            str(claims["n"]), str(claims["a"]), int(claims["iat"]), int(claims["exp"]), str(claims.get("u") or "")
        )
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
