"""``koinon-gateway token create|list|revoke|ca-hash``: join tokens kept as Secrets, and the CA hash
agents can pin (``koinon-agent --ca-cert-hash``) instead of carrying the CA.

The CA hash is read from the ConfigMap the gateway publishes (kube_ca.py), not from the CA Secret,
which also holds the CA's private key and the credential-signing key: ``ca-hash`` and ``create``
need no access to it (the Role ``koinon-gateway-token-issuer`` in manifests/gateway/token-roles.yaml
grants just what they need). Only where the ConfigMap is absent (not published yet) or refused
(403) is the Secret's certificate read, for callers allowed to, and a note says so.

``create`` prints ``<id>.<secret>`` once on stdout; only its SHA-256 is stored, and nothing logs it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import sys
from pathlib import Path

import aiohttp

from .kube_ca import published_ca_hash
from .kube_client import KubeApiError, KubeClient, KubeConfigError, kube_client, load_config
from .kube_tokens import KubeTokenStore
from .tokens import TOKEN_RE, JoinToken, TokenError

_DURATION_RE = re.compile(r"(\d+)([smhd])")
_TOKEN_ID_RE = re.compile(r"[a-z0-9]{6}")
MAX_TTL_S = 100 * 365 * 86400  # beyond this a date overflows soon enough; 0 says "never" anyway
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> dt.timedelta | None:
    """``24h``, ``1h30m``, ``90s``, ``7d``; ``0`` means the token never expires."""
    text = text.strip()
    if text == "0":
        return None
    if not text or _DURATION_RE.sub("", text):
        raise ValueError(f"--ttl: {text!r} is not a duration like 24h, 1h30m, 90s or 0 (never expires)")
    seconds = sum(int(n) * _UNIT_S[unit] for n, unit in _DURATION_RE.findall(text))
    if seconds <= 0:
        raise ValueError("--ttl: must be positive (or 0 for no expiry)")
    if seconds > MAX_TTL_S:
        raise ValueError(f"--ttl: at most {MAX_TTL_S // 86400}d (or 0 for no expiry)")
    return dt.timedelta(seconds=seconds)


def token_id_argument(text: str) -> str:
    """The id of ``revoke``'s argument: the id itself, or a whole token (only its id part is used,
    so the secret part never reaches a request URL, the API server's audit log or an error)."""
    if _TOKEN_ID_RE.fullmatch(text):
        return text
    match = TOKEN_RE.match(text.strip())
    if match is None:
        raise ValueError("revoke: expected a token id (6 characters [a-z0-9]) or a whole token")
    return match["id"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koinon-gateway token")
    parser.add_argument("--kubeconfig", type=Path, help="default: in-cluster, else $KUBECONFIG or ~/.kube/config")
    parser.add_argument("--namespace", help="the gateway's namespace (default: the kubeconfig context's)")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a join token and print it once")
    create.add_argument("--owner", required=True, help="owner of the machines that join with it")
    create.add_argument("--ttl", default="24h", help="lifetime, e.g. 24h, 1h30m, 0 for none (default 24h)")
    create.add_argument("--usage-limit", type=int, help="how many joins it allows (default: unlimited)")
    create.add_argument("--region", default="", help="region written to the nodes' spec (default: agent's)")
    commands.add_parser("list", help="list tokens (never their secrets)")
    revoke = commands.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("token_id")
    commands.add_parser(
        "ca-hash", help="print the gateway CA's hash for koinon-agent --ca-cert-hash (instead of its PEM)"
    )
    return parser


async def run(args: argparse.Namespace) -> int:
    config = load_config(args.kubeconfig)
    namespace = args.namespace or config.namespace
    async with kube_client(config) as client:
        store = KubeTokenStore(client, namespace)
        if args.command == "create":
            if args.usage_limit is not None and args.usage_limit < 1:
                raise ValueError("--usage-limit: must be at least 1")
            if not args.owner.strip():
                raise ValueError("--owner: required, not empty (every VolunteerNode has an owner)")
            print(
                await store.create(
                    owner=args.owner, ttl=parse_ttl(args.ttl), usage_limit=args.usage_limit, region=args.region
                )
            )
            await print_ca_hint(client, namespace)
        elif args.command == "ca-hash":
            published = await published_ca_hash(client, namespace)
            if published is None:
                raise ValueError(f"ca-hash: no gateway CA in namespace {namespace} yet (the gateway creates it)")
            pin, note = published
            if note:
                print(f"({note})", file=sys.stderr)
            print(pin)
        elif args.command == "list":
            print_table(await store.list())
        else:
            token_id = token_id_argument(args.token_id)
            await store.revoke(token_id)
            print(f"token {token_id} revoked")
    return 0


def print_table(tokens: list[JoinToken]) -> None:
    """One row per token, columns as wide as their widest cell and two spaces apart (as kubectl's)."""
    rows = [("ID", "OWNER", "USES", "EXPIRES", "REVOKED")]
    for token in tokens:
        limit = token.usage_limit if token.usage_limit is not None else "-"
        expires = token.expiration.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if token.expiration else "never"
        rows.append((token.token_id, token.owner, f"{token.usages_count}/{limit}", expires, str(token.revoked).lower()))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


async def print_ca_hint(client: KubeClient, namespace: str) -> None:
    """Best effort, after the token exists: a caller not allowed to read the published CA
    certificate (403), or a broken one, must not turn a created token into a failure."""
    try:
        published = await published_ca_hash(client, namespace)
    except (ValueError, KubeApiError) as exc:
        print(f"(the gateway CA's hash could not be read: {exc}; see `koinon-gateway token ca-hash`)", file=sys.stderr)
        return
    if published is not None:
        pin, note = published
        if note:
            print(f"({note})", file=sys.stderr)
        print(f"agents trust the gateway with: --ca-cert-hash {pin}", file=sys.stderr)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (ValueError, KubeConfigError, TokenError) as exc:
        print(f"koinon-gateway token: {exc}", file=sys.stderr)
        return 2
    except KubeApiError as exc:
        print(f"koinon-gateway token: Kubernetes API: {exc}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(f"koinon-gateway token: cannot reach the Kubernetes API: {exc}", file=sys.stderr)
        return 1
