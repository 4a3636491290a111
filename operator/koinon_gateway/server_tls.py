"""The gateway's server certificate, renewed while the gateway runs.

Issued once at start, a certificate of a year (or of what is left of the CA's life) would expire
under a gateway that runs longer, and every join and reconnect would then fail its handshake.
gRPC asks ``fetch`` before each new handshake: past two thirds of the certificate's life, a fresh
one is issued from the same CA (agents trust the CA, not the certificate).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import cast

import grpc
from cryptography import x509

from .pki import CABundle, issue_server_cert

log = logging.getLogger(__name__)

RENEW_AT_FRACTION = 2 / 3
# How often the same trouble is logged again: fetch runs at every handshake.
ALARM_EVERY = dt.timedelta(minutes=10)
CA_EXPIRY_NOTICE = dt.timedelta(days=30)


class RenewingServerCert:
    def __init__(
        self,
        bundle: CABundle,
        hostnames: list[str],
        issue: Callable[[CABundle, list[str]], tuple[bytes, bytes]] = issue_server_cert,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._bundle, self._hostnames, self._issue, self._clock = bundle, hostnames, issue, clock
        self._lock = threading.Lock()  # gRPC calls fetch from its own threads
        self._ca_expires = x509.load_pem_x509_certificate(bundle.cert_pem).not_valid_after_utc
        self._last_said: dict[str, dt.datetime] = {}
        self._config, self._renew_at = self._new_config()

    def credentials(self) -> grpc.ServerCredentials:
        # gRPC's fetcher may return None ("keep the current one"); its stubs type it otherwise.
        fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch)
        return grpc.dynamic_ssl_server_credentials(self._config, fetcher, require_client_authentication=False)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-config fetcher: None keeps the current certificate."""
        with self._lock:
            now = self._clock()
            if now >= self._ca_expires:
                # Nothing signed by it verifies any more: every agent's handshake fails.
                if self._due("ca-expired", now, ALARM_EVERY):
                    log.error(
                        "the gateway's CA expired at %s: every agent's handshake fails; replace the CA "
                        "and give agents the new one", self._ca_expires.isoformat(),
                    )  # fmt: skip
                return None
            if self._ca_expires - now < CA_EXPIRY_NOTICE and self._due("ca-expiring", now, dt.timedelta(days=1)):
                log.warning("the gateway's CA expires at %s; replace it before then", self._ca_expires.isoformat())
            if now < self._renew_at:
                return None
            try:
                self._config, self._renew_at = self._new_config()
            except Exception:  # keep serving the current one; try again at the next handshake
                if self._due("renewal-failed", now, ALARM_EVERY):
                    log.exception("could not renew the server certificate (said at most every 10 min)")
                return None
            log.info("server certificate renewed; next renewal at %s", self._renew_at.isoformat())
            return self._config

    def _due(self, what: str, now: dt.datetime, every: dt.timedelta) -> bool:
        last = self._last_said.get(what)
        if last is not None and now - last < every:
            return False
        self._last_said[what] = now
        return True

    def _new_config(self) -> tuple[grpc.ServerCertificateConfiguration, dt.datetime]:
        chain, key = self._issue(self._bundle, self._hostnames)
        cert = x509.load_pem_x509_certificate(chain)
        issued = self._clock()
        renew_at = issued + (cert.not_valid_after_utc - issued) * RENEW_AT_FRACTION
        return grpc.ssl_server_certificate_configuration([(key, chain)]), renew_at
