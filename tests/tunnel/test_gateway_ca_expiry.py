"""A gateway whose CA expires while it runs says so, by name and not at every handshake."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
from koinon_gateway.server_tls import RenewingServerCert

from .test_gateway_pki import _ca


def test_a_ca_that_expires_while_the_gateway_runs_is_reported_by_name(caplog: pytest.LogCaptureFixture) -> None:
    """RenewingServerCert caps each certificate at the CA's notAfter. Once the CA has expired,
    each handshake (fetch) issues a new, already expired certificate and logs only INFO
    "server certificate renewed" (within 5 minutes of the expiry), then a traceback per handshake
    ("The not valid after date must be after the not valid before date"). Nothing says the CA
    expired; the gateway looks healthy while every agent's handshake fails."""
    caplog.set_level(logging.INFO)
    now = dt.datetime.now(dt.UTC)
    bundle = _ca(now - dt.timedelta(days=3650), now + dt.timedelta(seconds=1))
    clock = [now]
    cert = RenewingServerCert(bundle, ["koinon-gateway"], clock=lambda: clock[0])
    clock[0] = now + dt.timedelta(seconds=2)  # the CA expired while the gateway ran
    for _ in range(3):  # three agents connect
        cert.fetch()
    renewals = [r for r in caplog.records if "renewed" in r.getMessage()]
    assert len(renewals) <= 1, f"an already expired certificate 'renewed' at each handshake: {len(renewals)}"
    assert any(
        r.levelno >= logging.ERROR and "CA" in r.getMessage() and "expire" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1  # not at every handshake


def test_after_the_ca_expired_the_renewal_error_names_the_ca(caplog: pytest.LogCaptureFixture) -> None:
    now = dt.datetime.now(dt.UTC)
    fresh = _ca(now - dt.timedelta(days=3650), now + dt.timedelta(days=1))
    expired = _ca(now - dt.timedelta(days=3650), now - dt.timedelta(minutes=10))
    bundles = iter([fresh, expired, expired, expired])
    from koinon_gateway.pki import issue_server_cert

    cert = RenewingServerCert(
        fresh, ["koinon-gateway"], issue=lambda _b, names: issue_server_cert(next(bundles), names)
    )
    cert._renew_at = now  # due
    for _ in range(3):
        cert.fetch()
    tracebacks = [r for r in caplog.records if r.exc_info]
    messages = [r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in caplog.records]
    assert any("CA" in m and "expire" in m for m in messages), messages
    assert len(tracebacks) <= 1, f"a traceback per handshake: {len(tracebacks)}"
