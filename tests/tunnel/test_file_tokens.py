"""``--store file``: join tokens' usage counts survive a gateway restart (a new store on the same file)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from pathlib import Path

import pytest
from koinon_gateway.file_tokens import FileTokenStore
from koinon_gateway.main import build_parser, stores_from_args
from koinon_gateway.registry import FileNodeRegistry
from koinon_gateway.tokens import COUNTED_JOIN_HONOURED_S, TokenError

TOKEN = "abcdef.0123456789abcdef"
OTHER_SECRET = "abcdef.fedcba9876543210"


def restarted(path: Path, token: str = TOKEN, limit: int | None = 2) -> FileTokenStore:
    store = FileTokenStore(path=path)
    store.add_plain(token, usage_limit=limit, owner="alice")
    return store


def test_usage_limit_holds_across_restart(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    asyncio.run(restarted(path).consume(TOKEN))
    asyncio.run(restarted(path).consume(TOKEN))
    with pytest.raises(TokenError) as refused:
        asyncio.run(restarted(path).consume(TOKEN))
    assert refused.value.reason == "usage-limit"


def test_given_back_use_is_saved(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"

    async def join_and_give_back() -> None:
        store = restarted(path, limit=1)
        await store.give_back(await store.consume(TOKEN))

    asyncio.run(join_and_give_back())
    grant = asyncio.run(restarted(path, limit=1).consume(TOKEN))
    assert grant.owner == "alice"


def test_file_holds_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    asyncio.run(restarted(path).consume(TOKEN))
    text = path.read_text()
    assert TOKEN.split(".")[1] not in text
    assert json.loads(text)["abcdef"]["usages"] == 1


def test_new_secret_for_the_same_id_starts_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    asyncio.run(restarted(path, limit=1).consume(TOKEN))
    asyncio.run(restarted(path, OTHER_SECRET, limit=1).consume(OTHER_SECRET))


def test_unreadable_file_starts_from_zero_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "usage.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="koinon_gateway.file_tokens"):
        store = restarted(path, limit=1)
    assert "unreadable" in caplog.text
    asyncio.run(store.consume(TOKEN))
    assert json.loads(path.read_text())["abcdef"]["usages"] == 1


def test_a_use_that_cannot_be_saved_is_not_granted(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    store = restarted(path, limit=1)
    path.mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        asyncio.run(store.consume(TOKEN))
    assert store.tokens["abcdef"].usages_count == 0


def test_file_store_flags_use_the_state_dir(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["--head-address=127.0.0.1", "--store=file", f"--state-dir={tmp_path}", f"--bootstrap-token={TOKEN}:1"]
    )
    tokens, _, _ = stores_from_args(args)
    asyncio.run(tokens.consume(TOKEN))
    tokens_again, _, _ = stores_from_args(args)
    with pytest.raises(TokenError):
        asyncio.run(tokens_again.consume(TOKEN))
    assert (tmp_path / "join-token-usage.json").exists()


def test_a_count_survives_a_restart_that_left_its_token_out(tmp_path: Path) -> None:
    """Each save wrote only the tokens given this time: one left out (its flag dropped for a
    while) and given again later started from zero uses."""
    path = tmp_path / "usage.json"
    asyncio.run(restarted(path, limit=1).consume(TOKEN))
    asyncio.run(restarted(path, token="bbbbbb.0123456789abcdef").consume("bbbbbb.0123456789abcdef"))
    with pytest.raises(TokenError) as refused:
        asyncio.run(restarted(path, limit=1).consume(TOKEN))
    assert refused.value.reason == "usage-limit"


def test_a_join_retried_after_a_restart_is_counted_once_for_a_while(tmp_path: Path) -> None:
    """The store ignored the join key: a join whose gateway died after counting its use (or left
    its node without an address) was counted again on its retry, and a one-use token refused it."""
    path = tmp_path / "usage.json"
    asyncio.run(restarted(path, limit=1).consume(TOKEN, "join-a"))
    grant = asyncio.run(restarted(path, limit=1).consume(TOKEN, "join-a"))  # the retry, after a restart
    assert grant.join_key == "join-a" and json.loads(path.read_text())["abcdef"]["usages"] == 1
    with pytest.raises(TokenError) as refused:  # another join is a new use
        asyncio.run(restarted(path, limit=1).consume(TOKEN, "join-b"))
    assert refused.value.reason == "usage-limit"
    saved = json.loads(path.read_text())
    saved["abcdef"]["counted_joins"]["join-a"] = time.time() - COUNTED_JOIN_HONOURED_S - 1
    path.write_text(json.dumps(saved))
    with pytest.raises(TokenError) as late:  # honoured only for a while, as in the Kubernetes store
        asyncio.run(restarted(path, limit=1).consume(TOKEN, "join-a"))
    assert late.value.reason == "usage-limit"


def test_a_given_back_use_is_no_longer_counted_for_its_join(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"

    async def join_and_give_back() -> None:
        store = restarted(path, limit=2)
        await store.give_back(await store.consume(TOKEN, "join-a"))

    asyncio.run(join_and_give_back())
    saved = json.loads(path.read_text())["abcdef"]
    assert (saved["usages"], saved["counted_joins"]) == (0, {})
    asyncio.run(restarted(path, limit=2).consume(TOKEN, "join-a"))  # counted afresh
    asyncio.run(restarted(path, limit=2).consume(TOKEN, "join-b"))
    with pytest.raises(TokenError):
        asyncio.run(restarted(path, limit=2).consume(TOKEN, "join-c"))


def test_a_join_that_made_its_node_is_no_longer_honoured_for_its_id_also_after_a_restart(tmp_path: Path) -> None:
    """Its node deleted (the volunteer cut off), a spent one-use token resending the join's id made
    a new node: the store still honoured the use counted for it. Forgotten once the node is made."""
    path = tmp_path / "usage.json"

    async def join_and_make_the_node() -> None:
        store = restarted(path, limit=1)
        await store.node_made(await store.consume(TOKEN, "join-a"))

    asyncio.run(join_and_make_the_node())
    saved = json.loads(path.read_text())["abcdef"]
    assert (saved["usages"], saved["counted_joins"]) == (1, {})
    with pytest.raises(TokenError) as refused:
        asyncio.run(restarted(path, limit=1).consume(TOKEN, "join-a"))
    assert refused.value.reason == "usage-limit"


def test_a_made_node_that_cannot_be_saved_leaves_its_join_honoured_to_be_saved_again(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    store = restarted(path, limit=1)
    grant = asyncio.run(store.consume(TOKEN, "join-a"))
    path.unlink()
    path.mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        asyncio.run(store.node_made(grant))
    assert list(store.counted_joins["abcdef"]) == ["join-a"]  # as the file still says
    path.rmdir()
    asyncio.run(store.node_made(grant))  # the retry's (a replayed join)
    assert json.loads(path.read_text())["abcdef"]["counted_joins"] == {}


@pytest.fixture
def disk_steps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The syncs and renames made from here on, in order."""
    steps: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        steps.append("sync directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "sync file")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        steps.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return steps


def test_counts_are_synced_to_disk_before_and_after_the_rename(tmp_path: Path, disk_steps: list[str]) -> None:
    """The temporary file was renamed over the counts unsynced: after a power loss the file could be
    empty, read as no counts, and a one-use token was usable again."""
    path = tmp_path / "usage.json"
    store = restarted(path, limit=1)
    disk_steps.clear()
    asyncio.run(store.consume(TOKEN))
    assert disk_steps == ["sync file", "rename", "sync directory"]
    assert json.loads(path.read_text())["abcdef"]["usages"] == 1


def test_volunteer_nodes_are_synced_to_disk_before_and_after_the_rename(tmp_path: Path, disk_steps: list[str]) -> None:
    """The file node registry renamed its file unsynced too: after a power loss an empty file was
    read as no VolunteerNodes, and their addresses handed out again."""
    path = tmp_path / "nodes.json"
    registry = FileNodeRegistry(path)
    asyncio.run(registry.create("vn-a", {"owner": "alice"}, {}))
    assert disk_steps == ["sync file", "rename", "sync directory"]
    assert "vn-a" in json.loads(path.read_text())
