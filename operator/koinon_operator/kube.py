"""The few direct Kubernetes API calls the operator makes outside kopf (kopf has no delete)."""

from __future__ import annotations

import asyncio

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from koinon_operator.api.constants import AIJOB_PLURAL, GROUP, VERSION


def load_config() -> None:
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]


async def delete_aijob(namespace: str, name: str, uid: str) -> None:
    """Deletes the AIJob ``namespace/name`` if it is still the object ``uid``: one deleted and
    created again under the same name meanwhile is another job, and stays."""

    def call() -> None:
        load_config()
        api = client.CustomObjectsApi()
        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid))
        try:
            api.delete_namespaced_custom_object(GROUP, VERSION, namespace, AIJOB_PLURAL, name, body=options)
        except ApiException as error:
            if error.status not in (404, 409):  # gone, or another object under that name now
                raise

    await asyncio.to_thread(call)
