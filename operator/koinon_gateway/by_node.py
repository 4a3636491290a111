"""One object per node name, made on first use and kept while something holds it.

The gateway's per-node budgets live as long as the node's connections that use them, not as long
as its session: a reconnecting node's old streams share them with its new ones, and a node with no
connection left costs nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ByNode(Generic[T]):
    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._held: weakref.WeakValueDictionary[str, T] = weakref.WeakValueDictionary()

    def of(self, node_name: str) -> T:
        value = self._held.get(node_name)
        if value is None:
            value = self._held[node_name] = self._make()
        return value

    def items(self) -> list[tuple[str, T]]:
        """A copy: the table may lose entries while the caller goes through them."""
        return list(self._held.items())
