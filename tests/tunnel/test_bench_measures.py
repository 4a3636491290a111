"""The tunnel benchmark's ways of measuring: paths in turns, paired Ray ratios, the plain relays."""

from __future__ import annotations

import shutil
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from bench.tunnel import netbench, plain_relay, sshd
from bench.tunnel.run import ray_figures


class EchoRecorder:
    """Stands in for a connected socket: echoes what is sent and notes which path was used."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.pending = b""
        self.closed = False

    def sendall(self, data: bytes) -> None:
        self.log.append(self.name)
        self.pending += data

    def recv(self, size: int) -> bytes:
        chunk, self.pending = self.pending[:size], self.pending[size:]
        return chunk

    def close(self) -> None:
        self.closed = True


def test_round_trips_are_taken_in_turns_of_a_block_per_path() -> None:
    log: list[str] = []
    paths = {name: EchoRecorder(name, log) for name in ("direct", "tunnel")}
    samples = netbench.interleaved_rtts_us(paths, count=120, block=50)  # type: ignore[arg-type]
    assert {name: len(taken) for name, taken in samples.items()} == {"direct": 120, "tunnel": 120}
    expected = []
    for turn in (50, 50, 20):
        expected += ["direct"] * turn + ["tunnel"] * turn
    assert log == expected
    assert all(path.closed for path in paths.values())
    assert all(sample >= 0 for taken in samples.values() for sample in taken)


def test_ray_ratio_is_the_median_of_same_round_ratios() -> None:
    # Round 2 ran at a slow moment for both paths. The ratio of the medians would be 5 / 2.5 = 2.0;
    # the rounds' own ratios are 1.5, 1.2, 2.0, so the paired figure is 1.5.
    times = {
        "tasks_tunnel": [3.0, 12.0, 5.0],
        "tasks_direct": [2.0, 10.0, 2.5],
        "object_tunnel": [2.0, 2.0, 2.0],
        "object_direct": [1.0, 1.0, 1.0],
    }
    figures = ray_figures(times)
    assert figures["ray_tasks_ratio"] == 1.5
    assert figures["ray_tasks_ratios_by_round"] == [1.5, 1.2, 2.0]
    assert figures["ray_tasks_tunnel_s"] == 5.0 and figures["ray_tasks_direct_s"] == 2.5
    assert figures["ray_object_ratio"] == 2.0
    assert figures["ray_object_warmup_s"] == {"tunnel": [], "direct": []}


def test_ray_warmup_times_are_reported_and_counted_in_no_figure() -> None:
    times = {
        "tasks_tunnel": [2.0],
        "tasks_direct": [1.0],
        "object_tunnel": [3.0],
        "object_direct": [2.0],
        "warmup_tasks_tunnel": [9.0],
        "warmup_tasks_direct": [4.0],
        "warmup_object_tunnel": [5.1, 2.1],
        "warmup_object_direct": [2.4, 1.5],
    }
    figures = ray_figures(times)
    assert figures["ray_tasks_ratio"] == 2.0 and figures["ray_object_ratio"] == 1.5
    assert figures["ray_object_tunnel_s"] == 3.0
    assert figures["ray_object_warmup_s"] == {"tunnel": [5.1, 2.1], "direct": [2.4, 1.5]}
    assert figures["ray_tasks_warmup_s"] == {"tunnel": [9.0], "direct": [4.0]}


def test_plain_relays_carry_bytes_both_ways_and_the_half_close() -> None:
    echo, echo_port = netbench.start_echo()
    sink, sink_port = netbench.start_sink()
    try:
        with plain_relay.relay_pair(echo_port) as port:
            samples = netbench.interleaved_rtts_us({"relays": netbench.open_via("127.0.0.1", port, None)}, 20)
            assert len(samples["relays"]) == 20
        with plain_relay.relay_pair(sink_port) as port:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"x" * (3 << 20))
            sock.shutdown(socket.SHUT_WR)  # the sink answers with its count only after EOF
            answer = b""
            while len(answer) < 8 and (chunk := sock.recv(8)):
                answer += chunk
            sock.close()
            assert struct.unpack("!Q", answer)[0] == 3 << 20
    finally:
        echo.close()
        sink.close()


@pytest.mark.skipif(
    shutil.which("ssh") is None or not Path(shutil.which("sshd") or "/usr/sbin/sshd").exists(),
    reason="needs OpenSSH (make bench-deps)",
)
def test_an_ssh_baseline_that_cannot_start_is_an_error_the_tunnel_bench_reports(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Not root, no /run/sshd: a PermissionError escaped the handler that reports ssh_error, and
    # the whole tunnel benchmark died with no figure at all.
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if str(self) == "/run/sshd":
            raise PermissionError(13, "Permission denied", "/run/sshd")
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(RuntimeError, match="sshd needs /run/sshd"), sshd.ssh_forward(tmp_path / "ssh", 9):
        pass
