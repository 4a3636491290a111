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


async def delete_aijob(namespace: str, name: str) -> None:
    def call() -> None:
        load_config()
        api = client.CustomObjectsApi()
        try:
            api.delete_namespaced_custom_object(GROUP, VERSION, namespace, AIJOB_PLURAL, name)
        except ApiException as error:
            if error.status != 404:
                raise

    await asyncio.to_thread(call)
