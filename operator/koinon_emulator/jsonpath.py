"""The subset of Kubernetes JSONPath used by printer columns and ``kubectl wait --for=jsonpath``.

Supports ``.a.b``, ``['a.b']``, ``[n]``, ``[*]`` and filters ``[?(@.type=="Ready")]`` (``==``/``!=``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_TOKEN = re.compile(
    r"""\.(?P<field>[A-Za-z0-9_\-$]+)"""
    r"""|\[\s*'(?P<quoted>[^']*)'\s*\]"""
    r"""|\[\s*"(?P<dquoted>[^"]*)"\s*\]"""
    r"""|\[(?P<index>-?\d+)\]"""
    r"""|\[(?P<star>\*)\]|\.(?P<dotstar>\*)"""
    r"""|\[\?\(@(?P<fpath>(?:\.[A-Za-z0-9_\-]+)+)\s*(?P<op>==|!=)\s*(?P<fvalue>"[^"]*"|'[^']*'|[^)\s]+)\s*\)\]"""
)

Step = tuple[str, Any]


@lru_cache(maxsize=256)
def compile_path(path: str) -> tuple[Step, ...]:
    text = path.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    if text.startswith("$"):
        text = text[1:]
    if text and not text.startswith((".", "[")):
        text = "." + text
    steps: list[Step] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"unsupported JSONPath {path!r} at {text[position:]!r}")
        if match.group("field") is not None:
            steps.append(("field", match.group("field")))
        elif match.group("quoted") is not None or match.group("dquoted") is not None:
            steps.append(("field", match.group("quoted") or match.group("dquoted")))
        elif match.group("index") is not None:
            steps.append(("index", int(match.group("index"))))
        elif match.group("star") or match.group("dotstar"):
            steps.append(("all", None))
        else:
            value = match.group("fvalue").strip("\"'")
            fields = tuple(match.group("fpath").lstrip(".").split("."))
            steps.append(("filter", (fields, match.group("op"), value)))
        position = match.end()
    return tuple(steps)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def find(obj: Any, path: str) -> list[Any]:
    """All values the path selects (empty when nothing matches)."""
    current = [obj]
    for kind, arg in compile_path(path):
        following: list[Any] = []
        for value in current:
            field_hit = kind == "field" and isinstance(value, dict) and arg in value
            index_hit = kind == "index" and isinstance(value, list) and -len(value) <= arg < len(value)
            if field_hit or index_hit:
                following.append(value[arg])
            elif kind == "all":
                following.extend(
                    value if isinstance(value, list) else value.values() if isinstance(value, dict) else []
                )
            elif kind == "filter" and isinstance(value, list):
                fields, op, expected = arg
                for item in value:
                    probe: Any = item
                    for name in fields:
                        probe = probe.get(name) if isinstance(probe, dict) else None
                    if probe is None:
                        continue
                    if (_as_text(probe) == expected) == (op == "=="):
                        following.append(item)
        current = following
    return current
