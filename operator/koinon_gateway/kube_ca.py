"""The gateway's CA and credential-signing key in one Secret (``koinon-gateway-ca``).

Several gateway replicas may start at once: each creates the Secret only when absent, and a loser of
that race (409 AlreadyExists) keeps what is stored; ``load_or_create_ca`` reads back after saving, so
every replica serves the one CA that won.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

from .kube_client import JSON, KubeApiError, KubeClient, secret_path
from .pki import CABundle, bundle_problem

log = logging.getLogger(__name__)

CA_SECRET_NAME = "koinon-gateway-ca"
CA_SECRET_TYPE = "kubernetes.io/tls"
CREDENTIAL_KEY = "credential.key"


def ca_secret(namespace: str, bundle: CABundle) -> JSON:
    data = {"tls.crt": bundle.cert_pem, "tls.key": bundle.key_pem, CREDENTIAL_KEY: bundle.credential_key}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": CA_SECRET_TYPE,
        "metadata": {
            "name": CA_SECRET_NAME,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "koinon", "app.kubernetes.io/component": "gateway"},
        },
        "data": {key: base64.b64encode(value).decode() for key, value in data.items()},
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
        secret = await self.client.get_or_none(secret_path(self.namespace, CA_SECRET_NAME))
        return bundle_from_secret(secret) if secret is not None else None

    async def save(self, bundle: CABundle) -> None:
        """Creates the Secret; when another gateway created it first, keeps theirs (read it with ``load``)."""
        try:
            await self.client.create(secret_path(self.namespace), ca_secret(self.namespace, bundle))
            log.info("created CA Secret %s/%s", self.namespace, CA_SECRET_NAME)
        except KubeApiError as exc:
            if not exc.conflict:
                raise
            log.info("CA Secret %s/%s created concurrently; using the stored one", self.namespace, CA_SECRET_NAME)
