"""Koinon Kubernetes API emulator: an in-memory stand-in for kube-apiserver for tests and local dev.

It serves the subset of the Kubernetes API that kopf and kubectl use (see README.md in this package).
"""

from .kubeconfig import write_kubeconfig
from .server import KubeEmulator

__all__ = ["KubeEmulator", "write_kubeconfig"]
