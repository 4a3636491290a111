"""The bookkeeping behind what one node may make the gateway hold for data that is not taken:
send_stalls (its connections stalled at once) and unread_writes (the gateway's writes to it that it
has not read). The flood tests in test_node_buffer_budget.py run them against real grpc."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest
from koinon_gateway.config import FROM_NODE_BYTES_PER_STREAM, GatewayConfig
from koinon_gateway.main import build_parser, config_from_args
from koinon_gateway.send_stalls import STALL_AFTER_S, SendStalls, StallSweeper
from koinon_gateway.tunnel_io import CountedFrameChannel
from koinon_gateway.unread_writes import UnreadWrites

T0 = 1000.0


async def parked() -> None:
    await asyncio.Event().wait()


async def test_only_writes_that_waited_long_enough_are_stalls_and_the_longest_waiting_past_the_share_are_tripped() -> (
    None
):
    stalls = SendStalls(max_stalled=2)
    tasks = [asyncio.ensure_future(parked()) for _ in range(5)]
    watches = []
    for i, task in enumerate(tasks):
        watch = stalls.watch()
        watch.task = task
        watch.waiting()
        stalls._waiting[watch] = T0 + i * 0.01  # started waiting in this order
        watches.append(watch)
    # Five writes waiting, none long enough yet: nothing is a stall.
    assert stalls.stalled(T0 + 0.04 + STALL_AFTER_S / 2) == 0
    assert stalls.sweep(T0 + 0.04 + STALL_AFTER_S / 2) == 0
    # The first one completes; the other four have now waited long enough: two past the share.
    watches[0].done()
    now = T0 + 0.04 + STALL_AFTER_S
    assert stalls.stalled(now) == 4
    assert stalls.sweep(now) == 2
    await asyncio.sleep(0)
    assert [w.tripped for w in watches] == [False, True, True, False, False]
    assert [t.cancelled() for t in tasks] == [False, True, True, False, False]
    # A tripped watch lets go of its task: the coroutine's frame holds the watch, and the task its
    # CancelledError (whose traceback holds that frame): a cycle that kept the message in hand.
    assert [w.task is None for w in watches] == [False, True, True, False, False]
    assert stalls.ended == 2 and stalls.stalled(now) == 2
    # Within the share, a sweep ends nothing more.
    assert stalls.sweep(now + 10) == 0
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_a_connection_whose_writes_complete_outlasts_one_that_never_moves() -> None:
    """A slow reader's connection waits anew after each write completes; a stuck one's wait goes on:
    the stuck one is ended first, whichever stalled first (the reviewer's case)."""
    stalls = SendStalls(max_stalled=1)
    moving, stuck = stalls.watch(), stalls.watch()
    moving.waiting()
    stalls._waiting[moving] = T0 - 5  # stalled first
    stuck.waiting()
    stalls._waiting[stuck] = T0
    moving.done()  # its write completes at T0 + 0.3, and its next one waits
    moving.waiting()
    stalls._waiting[moving] = T0 + 0.3
    assert stalls.sweep(T0 + 0.3 + STALL_AFTER_S) == 1
    assert stuck.tripped and not moving.tripped


async def test_a_write_that_completes_leaves_no_stall_behind() -> None:
    stalls = SendStalls(max_stalled=0)
    watch = stalls.watch()
    watch.waiting()
    watch.done()
    watch.close()  # the splice's end: a no-op now
    assert stalls.sweep(T0 + 3600) == 0 and not watch.tripped


def test_the_sweeper_keeps_one_table_per_node_while_it_is_used_and_reports_the_ends_by_node() -> None:
    sweeper = StallSweeper(max_stalled=0)
    a = sweeper.of("a")
    assert sweeper.of("a") is a and sweeper.of("b") is not a
    watch = a.watch()
    watch.waiting()
    a._waiting[watch] = T0
    assert sweeper.sweep(T0 + STALL_AFTER_S) == {"a": 1}
    assert watch.tripped  # no task to cancel: only marked
    del a, watch  # a watch holds its table
    assert sweeper.of("a").ended == 0  # a fresh table once nothing held the old one


async def test_unread_writes_count_what_fits_and_let_a_waiter_in_when_bytes_come_back() -> None:
    budget = UnreadWrites(limit_bytes=10)
    assert budget.take(25)  # the first write always fits, whatever its size
    assert not budget.take(1)
    budget.give_back(25)
    assert budget.take(6) and budget.take(4) and not budget.take(1)
    waiter = asyncio.ensure_future(budget.wait_to_take(5))
    await asyncio.sleep(0)
    assert not waiter.done()
    budget.give_back(4)  # 6 held: 5 more do not fit yet
    await asyncio.sleep(0)
    assert not waiter.done()
    budget.give_back(6)
    await asyncio.wait_for(waiter, 1)
    assert budget.held_bytes == 5


async def test_a_writer_cancelled_while_waiting_for_room_takes_nothing() -> None:
    budget = UnreadWrites(limit_bytes=10)
    assert budget.take(10)
    waiter = asyncio.ensure_future(budget.wait_to_take(5))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    budget.give_back(10)
    assert budget.held_bytes == 0 and not budget._waiters


class FakeContext:
    """A grpc.aio server context with one write pending until ``sent`` is set, as the gateway uses
    it; stands in for a node that does not read (test_node_buffer_budget.py does it with grpc)."""

    def __init__(self) -> None:
        self.sent = asyncio.Event()

    async def write(self, message: Any) -> None:
        await self.sent.wait()


class FakeRpc:
    """The RPC's task, as grpc.aio runs Connect's handler in it: the channel is built there, and the
    task ends with the call (``end``)."""

    def __init__(self, budget: UnreadWrites, counts: collections.Counter[str] | None = None) -> None:
        self.context = FakeContext()
        self._over = asyncio.Event()
        built: asyncio.Future[CountedFrameChannel] = asyncio.get_running_loop().create_future()

        async def handler() -> None:
            built.set_result(
                CountedFrameChannel(
                    self.context,
                    collections.Counter() if counts is None else counts,
                    "from",
                    "to",
                    unread_writes=budget,
                )
            )
            await self._over.wait()

        self.task = asyncio.ensure_future(handler())
        self.built = built

    async def end(self) -> None:
        self._over.set()
        await self.task
        await asyncio.sleep(0)  # the task's done callbacks run on the next turn


async def test_a_write_left_in_grpc_stays_counted_until_its_call_ends() -> None:
    budget = UnreadWrites(limit_bytes=1 << 20)
    rpc = FakeRpc(budget)
    channel = await rpc.built
    writer = asyncio.ensure_future(channel.write_frame(b"x" * 1000))
    await asyncio.sleep(0)
    assert budget.held_bytes == 1000
    writer.cancel()  # its writer gave up: grpc still holds the message, its status queued behind it
    await asyncio.gather(writer, return_exceptions=True)
    assert channel.write_held and budget.held_bytes == 1000
    await rpc.end()
    assert budget.held_bytes == 0


async def test_a_write_given_up_after_its_call_ended_is_given_back_at_once() -> None:
    """The call was cancelled by its client (the RPC's task ended) before the writer's cancellation
    reached the write: nothing would give its bytes back later."""
    budget = UnreadWrites(limit_bytes=1 << 20)
    rpc = FakeRpc(budget)
    channel = await rpc.built
    writer = asyncio.ensure_future(channel.write_frame(b"x" * 1000))
    await asyncio.sleep(0)
    await rpc.end()
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await asyncio.sleep(0)
    assert budget.held_bytes == 0


async def test_a_write_that_completes_gives_its_bytes_back_and_counts_as_sent() -> None:
    budget = UnreadWrites(limit_bytes=1 << 20)
    counts: collections.Counter[str] = collections.Counter()
    rpc = FakeRpc(budget, counts)
    channel = await rpc.built
    rpc.context.sent.set()
    await channel.write_frame(memoryview(b"y" * 300))
    assert budget.held_bytes == 0 and counts["to"] == 300 and not channel.write_held
    await rpc.end()
    assert budget.held_bytes == 0


def test_the_budgets_are_validated() -> None:
    with pytest.raises(ValueError, match=r"^max_stalled_bytes_per_node: at least 8650752"):
        GatewayConfig(max_stalled_bytes_per_node=FROM_NODE_BYTES_PER_STREAM - 1).validate()
    with pytest.raises(ValueError, match=r"^max_unread_write_bytes_per_node: at least 1 \(a byte\), got 0"):
        GatewayConfig(max_unread_write_bytes_per_node=0).validate()
    for flag, value in (("--max-stalled-bytes-per-node", "1000"), ("--max-unread-write-bytes-per-node", "0")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--head-address", "127.0.0.1", flag, value])
    args = build_parser().parse_args(
        ["--head-address", "127.0.0.1", "--max-stalled-bytes-per-node", str(2 * FROM_NODE_BYTES_PER_STREAM),
         "--max-unread-write-bytes-per-node", "4096"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.max_stalled_bytes_per_node == 2 * FROM_NODE_BYTES_PER_STREAM
    assert config.max_unread_write_bytes_per_node == 4096
