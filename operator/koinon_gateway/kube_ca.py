"""The gateway's CA and credential-signing key in one Secret (``koinon-gateway-ca``), and the CA's
certificate alone, public, in a ConfigMap (``koinon-gateway-ca-cert``, key ``ca.crt``).

Several gateway replicas may start at once: each creates the Secret only when absent, and a loser of
that race (409 AlreadyExists) keeps what is stored; ``load_or_create_ca`` reads back after saving, so
every replica serves the one CA that won.

The ConfigMap is what ``koinon-gateway token ca-hash`` (and the hint after ``token create``) read,
as kubeadm publishes its CA in the ``cluster-info`` ConfigMap: RBAC grants a Secret whole, so a
caller allowed to read the CA Secret for its certificate could also read the CA's private key and
the key that signs every node credential, forge any node's credential and pose as the gateway. The
gateway writes the ConfigMap each time it loads its CA, so it holds the CA being served once a start
has published it (best effort: a failure is logged, and the next start tries again); one
it cannot update (planted ``immutable``) it deletes and creates again. The pin read there is only
as trustworthy as write access to ConfigMaps in the gateway's namespace (as kubeadm's cluster-info
rests on who may write kube-public); the gateway's next start rewrites it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from dataclasses import dataclass

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .kube_client import JSON, KubeApiError, KubeClient, configmap_path, secret_path
from .pki import CABundle, bundle_problem, ca_cert_hash

log = logging.getLogger(__name__)

CA_SECRET_NAME = "koinon-gateway-ca"
CA_SECRET_TYPE = "kubernetes.io/tls"
CREDENTIAL_KEY = "credential.key"
CA_CERT_CONFIGMAP_NAME = "koinon-gateway-ca-cert"
CA_CERT_KEY = "ca.crt"
LABELS = {"app.kubernetes.io/part-of": "koinon", "app.kubernetes.io/component": "gateway"}


def ca_secret(namespace: str, bundle: CABundle) -> JSON:
    data = {"tls.crt": bundle.cert_pem, "tls.key": bundle.key_pem, CREDENTIAL_KEY: bundle.credential_key}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": CA_SECRET_TYPE,
        "metadata": {
            "name": CA_SECRET_NAME,
            "namespace": namespace,
            "labels": dict(LABELS),
        },
        "data": {key: base64.b64encode(value).decode() for key, value in data.items()},
    }


def ca_cert_configmap(namespace: str, cert_pem: bytes) -> JSON:
    """The CA's certificate only: nothing in it is secret (agents receive it in every TLS handshake).

    Written anew from the parsed certificate: a tls.crt may carry what the gateway serves fine but
    is not plain PEM (a UTF-8 byte-order mark, the text ``openssl x509 -text`` puts around it)."""
    pem = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.PEM)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CA_CERT_CONFIGMAP_NAME, "namespace": namespace, "labels": dict(LABELS)},
        "data": {CA_CERT_KEY: pem.decode("ascii")},
    }


def bundle_from_secret(secret: JSON) -> CABundle:
    data = secret.get("data") or {}
    missing = [key for key in ("tls.crt", "tls.key", CREDENTIAL_KEY) if not data.get(key)]
    if missing:
        # Refuse rather than overwrite: replacing the CA would cut off every agent that trusts it.
        raise ValueError(f"Secret {CA_SECRET_NAME}: data.{missing[0]}: missing; fix or delete the Secret")
    bundle = CABundle(
        base64.b64decode(data["tls.crt"]), base64.b64decode(data["tls.key"]), base64.b64decode(data[CREDENTIAL_KEY])
    )
    problem = bundle_problem(bundle)
    if problem is not None:  # a short credential key would let anyone forge credentials
        raise ValueError(f"Secret {CA_SECRET_NAME}: {problem}; fix or delete the Secret")
    return bundle


@dataclass
class KubeCAStore:
    client: KubeClient
    namespace: str

    async def load(self) -> CABundle | None:
        """The stored CA (None: none yet); a usable one is also published in the ConfigMap."""
        secret = await self.client.get_or_none(secret_path(self.namespace, CA_SECRET_NAME))
        if secret is None:
            return None
        bundle = bundle_from_secret(secret)  # refuses a broken CA before anything is published
        await publish_ca_cert(self.client, self.namespace, bundle.cert_pem)
        return bundle

    async def save(self, bundle: CABundle) -> None:
        """Creates the Secret; when another gateway created it first, keeps theirs (read it with ``load``)."""
        try:
            await self.client.create(secret_path(self.namespace), ca_secret(self.namespace, bundle))
            log.info("created CA Secret %s/%s", self.namespace, CA_SECRET_NAME)
        except KubeApiError as exc:
            if not exc.conflict:
                raise
            log.info("CA Secret %s/%s created concurrently; using the stored one", self.namespace, CA_SECRET_NAME)


PUBLISH_ATTEMPTS = 5
# What a request to the API server may fail with besides an answer (KubeApiError): its 30 s
# timeout, a dropped or refused connection.
_NO_ANSWER = (asyncio.TimeoutError, aiohttp.ClientError, OSError)


async def publish_ca_cert(client: KubeClient, namespace: str, cert_pem: bytes) -> None:
    """Creates the ConfigMap, or brings it to ``cert_pem`` (one holding another certificate, left
    by a CA since replaced or written by someone else, would have volunteers pin the wrong CA).
    One that cannot be updated (``immutable: true``, which anyone allowed to create ConfigMaps in
    the namespace could have planted first, or an update refused as invalid, 422) is deleted, that
    very object only (its uid and resourceVersion as preconditions), and created again.

    Best effort: a gateway whose Role predates the ConfigMap (an image upgraded without applying
    manifests/gateway/rbac.yaml again), an API server that does not answer in time, or a
    certificate that cannot be written out still serves; ``token ca-hash`` then falls back to the
    CA Secret for those allowed to read it and says the certificate is not published. Not where
    the ConfigMap holds another CA's certificate (after a CA rotation) and cannot be brought to this
    one because the API server did not answer or failed (5xx): ``ca-hash`` would print that pin
    with no note, so the start fails (StalePin), as it would for the other stores, and the
    restarted gateway tries again. A refusal a restart cannot cure (a Role without the ConfigMap,
    an admission webhook, a planted ConfigMap a finalizer holds) is logged as an error instead:
    the gateway serves, and that pin is wrong until someone fixes the ConfigMap.
    """
    path = configmap_path(namespace, CA_CERT_CONFIGMAP_NAME)
    stale = False  # seen holding another CA's certificate: volunteers would be given a wrong pin
    try:
        wanted = ca_cert_configmap(namespace, cert_pem)
        for _ in range(PUBLISH_ATTEMPTS):
            current = await client.get_or_none(path)
            if current is None:
                try:
                    await client.create(configmap_path(namespace), wanted)
                except KubeApiError as exc:
                    if exc.conflict:  # another replica created it meanwhile: compare with theirs
                        continue
                    raise
                log.info("published the CA certificate in ConfigMap %s/%s", namespace, CA_CERT_CONFIGMAP_NAME)
                return
            if (current.get("data") or {}).get(CA_CERT_KEY) == wanted["data"][CA_CERT_KEY]:
                return
            stale = True
            if not current.get("immutable"):
                # resourceVersion kept: a concurrent writer makes this PUT answer 409, and we look again.
                replacement = {**current, "data": wanted["data"]}
                try:
                    await client.replace(path, replacement)
                except KubeApiError as exc:
                    if exc.conflict or exc.not_found:  # changed or deleted meanwhile: read again
                        continue
                    if not exc.invalid:  # 422: not updatable as it is (made immutable meanwhile)
                        raise
                else:
                    log.warning(
                        "ConfigMap %s/%s held another certificate; it now holds the CA this gateway serves",
                        namespace,
                        CA_CERT_CONFIGMAP_NAME,
                    )
                    return
            if await _delete_to_recreate(client, path, current):
                stale = False  # gone: ca-hash falls back to the Secret, and says so
        # What is there now decides (a delete a finalizer holds leaves the stale one in place).
        current = await client.get_or_none(path)
        stale = current is not None and (current.get("data") or {}).get(CA_CERT_KEY) != wanted["data"][CA_CERT_KEY]
        if stale:
            _log_stale(namespace, "it kept changing, or something holds it")
        else:
            log.warning("ConfigMap %s/%s: kept changing; not published", namespace, CA_CERT_CONFIGMAP_NAME)
    except (KubeApiError, *_NO_ANSWER) as exc:
        curable = not isinstance(exc, KubeApiError) or exc.status >= 500
        if stale and curable:
            # After a CA rotation the ConfigMap still names the old CA, and `token ca-hash` would
            # print its pin with no note: the start fails, as it did before publishing was best
            # effort, and the restarted gateway tries again.
            raise StalePin(namespace) from exc
        if stale:
            _log_stale(namespace, str(exc))
        elif isinstance(exc, KubeApiError):
            _log_unpublished_refused(namespace, exc)
        else:
            _log_unpublished(namespace, exc)
    except ValueError as exc:
        _log_unpublished(namespace, exc)


class StalePin(RuntimeError):
    """The CA certificate ConfigMap holds another CA's certificate and could not be brought to the
    one served."""

    def __init__(self, namespace: str) -> None:
        super().__init__(
            f"ConfigMap {namespace}/{CA_CERT_CONFIGMAP_NAME} holds another CA's certificate and could not "
            "be updated: `koinon-gateway token ca-hash` would give volunteers a pin of a CA this gateway "
            "does not serve; not starting (the restart tries again)"
        )


def _log_stale(namespace: str, why: str) -> None:
    log.error(
        "ConfigMap %s/%s holds another CA's certificate and could not be updated (%s): "
        "`koinon-gateway token ca-hash` gives volunteers a pin this gateway does not serve until "
        "it is fixed (delete the ConfigMap, and whatever holds it, and restart the gateway)",
        namespace,
        CA_CERT_CONFIGMAP_NAME,
        why,
    )


def _log_unpublished_refused(namespace: str, exc: Exception) -> None:
    log.warning(
        "cannot publish the CA certificate in ConfigMap %s/%s (%s): `koinon-gateway token ca-hash` "
        "needs the CA Secret until it is; see manifests/gateway/rbac.yaml",
        namespace,
        CA_CERT_CONFIGMAP_NAME,
        exc,
    )


def _log_unpublished(namespace: str, exc: Exception) -> None:
    # The error's type and text only: aiohttp's carry the URL, never the request's headers
    # (kube_client turns the one that would, ClientResponseError, into a KubeApiError).
    log.warning(
        "cannot publish the CA certificate in ConfigMap %s/%s (%s: %s); serving anyway, it is "
        "published at the next start",
        namespace,
        CA_CERT_CONFIGMAP_NAME,
        type(exc).__name__,
        exc,
    )


async def _delete_to_recreate(client: KubeClient, path: str, current: JSON) -> bool:
    """Deletes the ConfigMap as read, so that the next attempt creates it holding the served CA
    (True; one a finalizer holds is still there for that attempt to read); one changed or deleted
    meanwhile (409, 404) is left for that attempt to read again (False)."""
    metadata = current.get("metadata") or {}
    preconditions = {key: str(metadata[key]) for key in ("uid", "resourceVersion") if metadata.get(key)}
    try:
        await client.delete(path, preconditions)
    except KubeApiError as exc:
        if not (exc.conflict or exc.not_found):
            raise
        return False
    log.warning(
        "ConfigMap %s held another certificate and could not be updated (immutable, or the update was "
        "refused as invalid); deleted to be created again with the CA this gateway serves",
        path,
    )
    return True


NOT_PUBLISHED = (
    f"the gateway has not published ConfigMap {CA_CERT_CONFIGMAP_NAME} yet (it does at each start: "
    "restart it, with manifests/gateway/rbac.yaml applied)"
)


async def published_ca_hash(client: KubeClient, namespace: str) -> tuple[str, str] | None:
    """The CA's hash volunteers pin (``sha256:<hex>``) and a note (empty unless it did not come from
    the ConfigMap); None when there is no CA yet.

    Read from the public ConfigMap, so the caller needs no access to the CA Secret. Only where the
    ConfigMap is absent (a gateway that has not published it yet) or the caller may not read it
    (403: one granted the CA Secret alone, as before the ConfigMap) is the Secret read instead,
    and only its certificate used; a caller refused that too is told what is missing.
    """
    configmap = f"ConfigMap {namespace}/{CA_CERT_CONFIGMAP_NAME}"
    refused: KubeApiError | None = None
    try:
        published = await client.get_or_none(configmap_path(namespace, CA_CERT_CONFIGMAP_NAME))
    except KubeApiError as exc:
        if exc.status != 403:
            raise
        refused, published = exc, None
    if published is not None:
        pem = (published.get("data") or {}).get(CA_CERT_KEY)
        if not pem:
            raise ValueError(f"{configmap}: data.{CA_CERT_KEY}: missing; restart the gateway to publish it again")
        return _hash(str(pem).encode(), configmap), ""
    why = f"reading {configmap} was refused ({refused})" if refused is not None else NOT_PUBLISHED
    try:
        secret = await client.get_or_none(secret_path(namespace, CA_SECRET_NAME))
    except KubeApiError as exc:
        if exc.status != 403:
            raise
        if refused is not None:
            raise ValueError(
                f"namespace {namespace}: reading {configmap} was refused ({refused}), and so was "
                f"Secret {CA_SECRET_NAME} ({exc}): ask for get on ConfigMap {CA_CERT_CONFIGMAP_NAME} "
                "(Role koinon-gateway-token-issuer, manifests/gateway/token-roles.yaml)"
            ) from exc
        raise ValueError(f"namespace {namespace}: {NOT_PUBLISHED}") from exc
    if secret is None:
        return None
    where = f"Secret {namespace}/{CA_SECRET_NAME}"
    crt = (secret.get("data") or {}).get("tls.crt")
    if not crt:
        raise ValueError(f"{where}: data.tls.crt: missing")
    return _hash(base64.b64decode(crt), where), f"read from Secret {CA_SECRET_NAME}: {why}"


def _hash(cert_pem: bytes, where: str) -> str:
    try:
        return ca_cert_hash(cert_pem)
    except ValueError as exc:
        raise ValueError(f"{where}: not a PEM certificate: {exc}") from exc
