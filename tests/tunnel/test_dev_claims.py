"""Two local control planes on one host never share volunteers' port blocks or address ranges:
a bind probe alone handed out ports a running one's volunteers held but did not bind yet."""

from __future__ import annotations

from pathlib import Path

import pytest
from koinon_dev import claims


@pytest.fixture(autouse=True)
def own_claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims, "claims_dir", lambda: tmp_path / "claims")


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


def test_every_range_held_is_a_clear_error(tmp_path: Path) -> None:
    held = tmp_path / "koinon-held"
    held.mkdir()
    claims.claim(held, 40, low=40000, high=40100, octets=range(20, 21))
    other = tmp_path / "koinon-other"
    other.mkdir()
    with pytest.raises(RuntimeError, match="virtual address range"):
        claims.claim(other, 40, low=40100, high=40200, octets=range(20, 21))
