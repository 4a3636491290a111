"""Suite-wide collection rules."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group into the node id
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make test` runs two pytest-xdist workers (`--dist loadgroup`): tests that start Ray or
    several processes, or use network namespaces, all go to one of them, one after another as
    they always ran, while the other worker takes the rest. Two Ray clusters and their volunteers
    never share the 2 cores at once, and the quick tests fill the time the heavy ones spend waiting."""
    for item in items:
        if item.get_closest_marker("slow") or item.get_closest_marker("netns"):
            item.add_marker(pytest.mark.xdist_group("heavy"))
