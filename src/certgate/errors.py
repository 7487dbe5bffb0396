"""The certgate error tree: small, and translated to status codes at each server's edge.

Modelled on httpx's ``_exceptions.py``: callers catch the family they can handle, and every
server maps the family to an HTTP status in one place.
"""

from __future__ import annotations


class CertgateError(Exception):
    """Root of every error certgate raises on purpose."""


class ConfigError(CertgateError):
    """Configuration is invalid or unsafe; raised at startup, never mid-flight."""


class PKIError(CertgateError):
    """A certificate, key or CSR failed a check."""


class InvalidCSR(PKIError):
    """A certificate signing request is malformed, unsigned or asks for too much."""


class ChainError(PKIError):
    """A certificate does not chain to the expected authority or violates its profile."""


class KeystoreError(PKIError):
    """An encrypted key could not be loaded (wrong master key, tampered blob, bad mode)."""


class SignatureError(CertgateError):
    """A signed message failed verification (wrong signer, expired, replayed, malformed)."""


class AuthError(CertgateError):
    """Authentication failed (no or bad credentials). Maps to 401."""


class PermissionDenied(CertgateError):
    """Authenticated, but not allowed. Maps to 403."""


class NotFound(CertgateError):
    """The object does not exist, or the caller may not know that it does. Maps to 404."""


class Conflict(CertgateError):
    """The request conflicts with current state. Maps to 409."""


class BadRequest(CertgateError):
    """The request is malformed or out of bounds. Maps to 400 or 422."""


class Unavailable(CertgateError):
    """Something the request needs is unavailable now (a PKCS#11 token: module missing,
    token removed, PIN wrong). Maps to 503; nothing falls back."""


class RateLimited(CertgateError):
    """Too many failed authentications from this address or for this account. Maps to 429
    with ``Retry-After: retry_after_s``."""

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class TooLarge(BadRequest):
    """The request body or a field is over its limit. Maps to 413."""
