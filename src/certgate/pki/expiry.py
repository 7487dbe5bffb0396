"""Certificates in use and their renewal window: the one rule for every component.

A certificate is due for renewal within ``profiles.RENEWAL_WINDOW`` of its end. Tunnel
nodes (``/healthz`` ``sync.certificates``, their metrics) and the console (``/healthz``)
list what they present or trust with ``in_use`` and warn with ``warnings``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509

from certgate.pki.profiles import RENEWAL_WINDOW

__all__ = ["RENEWAL_WINDOW_S", "CertificateInUse", "in_use", "warnings"]

RENEWAL_WINDOW_S = RENEWAL_WINDOW.total_seconds()


@dataclass(frozen=True, slots=True)
class CertificateInUse:
    name: str  # what rotates it: tunnel-identity, console-identity, device-root, ...
    not_after: float  # POSIX seconds
    expires_in_s: float

    @property
    def renewal_due(self) -> bool:
        return self.expires_in_s <= RENEWAL_WINDOW_S

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "not_after": int(self.not_after),
            "expires_in_s": int(self.expires_in_s),
            "renewal_due": self.renewal_due,
        }


def in_use(certs: Mapping[str, x509.Certificate], now: float) -> list[CertificateInUse]:
    """Each named certificate with its time to expiry at POSIX time ``now``."""
    return [
        CertificateInUse(name, end, end - now)
        for name, cert in certs.items()
        for end in [cert.not_valid_after_utc.timestamp()]
    ]


def warnings(certs: Iterable[Mapping[str, object]], command: str) -> list[str]:
    """A line for each certificate (as ``to_dict`` gives it) within its renewal window;
    ``command`` says how to renew it (``{name}`` is replaced by the certificate's name)."""
    return [
        f"{cert['name']} expires in {int(str(cert['expires_in_s'])) // 86400} days:"
        f" {command.format(name=cert['name'])}"
        for cert in certs
        if cert["renewal_due"]
    ]
