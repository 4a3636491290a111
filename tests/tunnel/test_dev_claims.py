"""Two local control planes on one host never share volunteers' port blocks or address ranges:
a bind probe alone handed out ports a running one's volunteers held but did not bind yet."""

from __future__ import annotations

import os
import pwd
import random
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from koinon_dev import claims
from koinon_dev.processes import boot_id, process_start_time

REAL_CLAIMS_DIR = claims.claims_dir  # the tests below keep their claims apart from the user's


@pytest.fixture(autouse=True)
def own_claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims, "claims_dir", lambda: tmp_path / "claims")
    # The claims are what these tests are about, not the host's ports: any process beside them (a
    # test's Ray) may hold an ephemeral port in a range, and a claim then failed on "no free block".
    # test_a_block_whose_ports_are_taken_is_skipped stands in for the probe itself.
    monkeypatch.setattr(claims, "ports_free", lambda start, count: True)


def test_a_block_whose_ports_are_taken_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probed: list[tuple[int, int]] = []

    def ports_free(start: int, count: int) -> bool:
        probed.append((start, count))
        return start != 40000  # something else on the host holds a port of the first block

    monkeypatch.setattr(claims, "ports_free", ports_free)
    monkeypatch.setattr(random, "shuffle", lambda slots: None)  # blocks tried in order
    work = tmp_path / "koinon-work"
    work.mkdir()
    claim = claims.claim(work, 40, low=40000, high=40200, octets=range(20, 21))
    assert claim.port_low == 40040 and probed == [(40000, 40), (40040, 40)]


def test_a_second_control_plane_takes_other_ports_and_addresses(tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "koinon-first", tmp_path / "koinon-second"
    first_dir.mkdir()
    second_dir.mkdir()
    # A narrow range: a probe alone would pick the same free block again and again.
    first = claims.claim(first_dir, 40, low=40000, high=40200, octets=range(20, 22))
    for _ in range(20):
        second = claims.claim(second_dir, 40, low=40000, high=40200, octets=range(20, 22))
        assert second.port_high < first.port_low or second.port_low > first.port_high, (first, second)
        assert second.vip_octet != first.vip_octet


def test_a_claim_ends_with_its_control_plane(tmp_path: Path) -> None:
    gone = tmp_path / "koinon-gone"
    gone.mkdir()
    claims.claim(gone, 40, low=40000, high=40100, octets=range(20, 21))
    gone.rmdir()  # `koinon dev down` removes the work dir
    live = tmp_path / "koinon-live"
    live.mkdir()
    assert claims.claim(live, 40, low=40000, high=40100, octets=range(20, 21)).vip_octet == 20
    assert [p.name for p in (tmp_path / "claims").glob("*.json")] == ["koinon-live.json"]


def test_every_range_held_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    held = tmp_path / "koinon-held"
    held.mkdir()
    claims.claim(held, 40, low=40000, high=40100, octets=range(20, 21))
    other = tmp_path / "koinon-other"
    other.mkdir()
    with pytest.raises(RuntimeError, match="virtual address range"):
        claims.claim(other, 40, low=40100, high=40200, octets=range(20, 21))


def _dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def test_claims_of_control_planes_that_crashed_are_over(tmp_path: Path) -> None:
    """A claim lasted as long as its work dir, which a crashed run (SIGKILL, OOM, a test's timeout)
    keeps: after a few crashes every `up` failed. It lasts as long as its gateway now."""
    for number in range(4):  # every slot of the range, each held by a gateway that is gone
        crashed = tmp_path / f"koinon-crashed{number}"
        crashed.mkdir()
        claims.claim(crashed, 640, low=30000, high=32700)
        claims.hold(crashed, _dead_pid())
    fresh = tmp_path / "koinon-fresh"
    fresh.mkdir()
    claims.claim(fresh, 640, low=30000, high=32700)
    assert [p.name for p in (tmp_path / "claims").glob("*.json")] == ["koinon-fresh.json"]


def test_a_claim_held_by_a_running_process_stays_and_is_named_when_nothing_is_left(tmp_path: Path) -> None:
    running = subprocess.Popen(["sleep", "30"])
    try:
        for number in range(4):
            live = tmp_path / f"koinon-live{number}"
            live.mkdir()
            claims.claim(live, 640, low=30000, high=32700)
            claims.hold(live, running.pid)
        other = tmp_path / "koinon-other"
        other.mkdir()
        with pytest.raises(RuntimeError, match="koinon-live0"):
            claims.claim(other, 640, low=30000, high=32700)
    finally:
        running.kill()
        running.wait()


def test_a_claim_no_gateway_took_ends_after_a_while(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupted = tmp_path / "koinon-interrupted"
    interrupted.mkdir()
    claims.claim(interrupted, 40, low=40000, high=40400, octets=range(20, 21))
    later = time.time() + claims.UNHELD_CLAIM_S + 1
    monkeypatch.setattr("time.time", lambda: later)
    fresh = tmp_path / "koinon-fresh"
    fresh.mkdir()
    assert claims.claim(fresh, 40, low=40000, high=40400, octets=range(20, 21)).vip_octet == 20


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_claims_dir_another_user_made_or_linked_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A predictable name in the shared /tmp: another user could make it first and plant records
    that block every `up`, or link it to a directory whose *.json files `up` would then delete."""
    target = tmp_path / "claims"
    monkeypatch.setattr(claims, "claims_dir", lambda: target)
    target.mkdir(mode=0o777)
    target.chmod(0o777)
    os.chown(target, 65534, 65534)
    work = tmp_path / "koinon-victim"
    work.mkdir()
    with pytest.raises(RuntimeError, match="not a private directory"):
        claims.claim(work, 40, low=40000, high=40100)
    target.rmdir()
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "settings.json").write_text("{}")
    target.symlink_to(precious)
    with pytest.raises(RuntimeError, match="not a private directory"):
        claims.claim(work, 40, low=40000, high=40100)
    assert (precious / "settings.json").exists()


def test_every_control_plane_of_the_user_shares_one_claims_dir_whatever_its_tmpdir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The claims dir followed $TMPDIR while work dirs are always /tmp/koinon-*: a `make up` from a
    shell with TMPDIR set (libpam-tmpdir, a CI runner) and one without kept their claims apart,
    and both took the same port block and address range."""
    seen = set()
    for tmpdir in ("/tmp", "/var/tmp", "/tmp/user/0"):
        monkeypatch.setenv("TMPDIR", tmpdir)
        monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads $TMPDIR again
        seen.add(REAL_CLAIMS_DIR())
    assert seen == {Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "koinon" / "dev-claims" / boot_id()}


def test_another_user_cannot_take_the_claims_dir_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed name in /tmp (sticky: only its maker removes it) let any local user make the
    directory first and so refuse every `up` of the victim until the next boot."""
    monkeypatch.setenv("HOME", "/tmp")  # not what decides: a user's home is theirs
    assert REAL_CLAIMS_DIR().is_relative_to(pwd.getpwuid(os.getuid()).pw_dir)


def test_a_control_plane_on_another_host_sharing_the_home_does_not_erase_this_hosts_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims name this host's pids, ports and 127.x ranges; in a home shared by two hosts (NFS),
    a control plane on the other host judged this host's holders dead and deleted their records,
    and this host's next control plane took the range of the one still running."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: SimpleNamespace(pw_dir=str(home)))
    monkeypatch.setattr(claims, "claims_dir", REAL_CLAIMS_DIR)
    monkeypatch.setattr(claims, "boot_id", lambda: "boot-of-host-a")
    monkeypatch.setattr(claims, "ports_free", lambda start, count: True)
    here = process_start_time
    # Host A: a control plane is up, held by its gateway (this process, alive).
    first = tmp_path / "koinon-a1"
    first.mkdir()
    claims.claim(first, 40, low=40000, high=40400, octets=range(20, 21))
    claims.hold(first, os.getpid())
    # Host B (same home): its process table has no such pid (or another process under it).
    monkeypatch.setattr(claims, "boot_id", lambda: "boot-of-host-b")
    monkeypatch.setattr(claims, "process_start_time", lambda pid: None if pid == os.getpid() else here(pid))
    other_host = tmp_path / "koinon-b1"
    other_host.mkdir()
    claims.claim(other_host, 40, low=40000, high=40400, octets=range(20, 21))
    other_host.rmdir()  # B's work dir is in B's /tmp, which host A does not see
    # Back on host A: the first control plane still runs; a second one must not take its range.
    monkeypatch.setattr(claims, "boot_id", lambda: "boot-of-host-a")
    monkeypatch.setattr(claims, "process_start_time", here)
    second = tmp_path / "koinon-a2"
    second.mkdir()
    # The only range is held by A's running control plane: refused, as on a home of its own.
    with pytest.raises(RuntimeError, match="every virtual address range is held"):
        claims.claim(second, 40, low=40000, high=40400, octets=range(20, 21))


def test_a_hostname_change_does_not_hand_out_a_live_claims_octet_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims were kept per hostname: a machine renamed while a control plane ran (DHCP,
    hostnamectl) no longer saw that plane's claims and handed its range out again."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: SimpleNamespace(pw_dir=str(home)))
    monkeypatch.setattr(claims, "claims_dir", REAL_CLAIMS_DIR)
    monkeypatch.setattr(claims, "ports_free", lambda start, n: True)
    first, second = tmp_path / "plane-a", tmp_path / "plane-b"
    first.mkdir()
    second.mkdir()
    monkeypatch.setattr(socket, "gethostname", lambda: "laptop")
    a = claims.claim(first, 10, 20000, 20100, octets=range(20, 21))
    claims.hold(first, os.getpid())  # plane a runs on
    monkeypatch.setattr(socket, "gethostname", lambda: "laptop.dhcp.example")  # same machine, renamed
    with pytest.raises(RuntimeError, match="every virtual address range is held"):  # by plane a, running
        claims.claim(second, 10, 20000, 20100, octets=range(20, 21))
    assert a.vip_octet == 20
