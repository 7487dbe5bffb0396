"""Web console sign-in: password (scrypt) + TOTP (RFC 6238), and server-side sessions.

The factors are stored in ``admin_signins``: the password as ``secrets.hash_password``
makes it (as for enrollment users), the TOTP secret sealed with the instance master key
(AES-GCM under a key derived for this purpose only, the admin id as associated data).
A session token is ``cgs_<id>_<secret>`` (``secrets.new_secret``); only the secret's
SHA-256 is stored. The CSRF token of a session is an HMAC of its secret: bound to the
session, never stored, and unknown to anyone without the cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from urllib.parse import quote

import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from certgate.console.services import ca
from certgate.console.services.secrets import (
    hash_password,
    new_secret,
    password_matches,
    secret_matches,
    split_secret,
)
from certgate.console.store.models import Admin, AdminSignIn, WebSession
from certgate.errors import AuthError, BadRequest
from certgate.pki.keystore import MasterKey

SESSION_PREFIX = "cgs"
TOTP_STEP_S = 30  # RFC 6238 section 4.1, the default X
TOTP_WINDOW = 1  # one step either side, for clock drift (section 5.2)
ISSUER = "certgate"
_NONCE = 12


@dataclass(frozen=True, slots=True)
class Timeouts:
    idle: timedelta
    absolute: timedelta


@dataclass(frozen=True, slots=True)
class SignedIn:
    """A live session: its admin, and the token's secret (for the CSRF token)."""

    admin: Admin
    session_id: str
    secret: str

    @property
    def csrf(self) -> str:
        return csrf_token(self.secret)

    def __repr__(self) -> str:
        return f"SignedIn(admin={self.admin.username!r}, session_id={self.session_id!r})"


def purpose_aead(master: MasterKey, purpose: bytes) -> AESGCM:
    """AES-GCM under a key derived from the master key for ``purpose`` only."""
    return AESGCM(master.derive(purpose))


def _totp_aead(master: MasterKey) -> AESGCM:
    return purpose_aead(master, b"certgate admin totp v1")


def seal_totp(master: MasterKey, admin_id: str, secret: str) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + _totp_aead(master).encrypt(nonce, secret.encode(), admin_id.encode())


def unseal_totp(master: MasterKey, admin_id: str, blob: bytes) -> str:
    try:
        plain = _totp_aead(master).decrypt(blob[:_NONCE], blob[_NONCE:], admin_id.encode())
    except InvalidTag as exc:
        raise AuthError("TOTP secret does not open: wrong master key or tampered row") from exc
    return plain.decode()


def totp_step(secret: str, code: str, at: datetime, after_step: int) -> int | None:
    """The time step ``code`` is valid for, within the window and later than
    ``after_step`` (a used step is never accepted again), or None."""
    if not (code.isdigit() and len(code) == 6):
        return None
    totp = pyotp.TOTP(secret, interval=TOTP_STEP_S)
    now_step = int(at.timestamp()) // TOTP_STEP_S
    for step in range(now_step - TOTP_WINDOW, now_step + TOTP_WINDOW + 1):
        expected = totp.at(step * TOTP_STEP_S)
        if step > after_step and hmac.compare_digest(expected, code):
            return step
    return None


def csrf_token(session_secret: str) -> str:
    return hmac.new(session_secret.encode(), b"certgate csrf v1", hashlib.sha256).hexdigest()


def csrf_matches(signed_in: SignedIn, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(signed_in.csrf, presented)


def _factors(session: Session, admin: Admin) -> AdminSignIn:
    row = session.get(AdminSignIn, admin.id)
    if row is None:
        row = AdminSignIn(admin_id=admin.id, totp_last_step=0, updated_at=ca.now())
        session.add(row)
    return row


def set_password(session: Session, admin: Admin, password: str) -> None:
    try:
        hashed = hash_password(password)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    row = _factors(session, admin)
    row.password_hash, row.updated_at = hashed, ca.now()
    end_sessions_of(session, admin)  # a new password signs every browser out


def new_totp(session: Session, master: MasterKey, admin: Admin) -> str:
    """A fresh TOTP secret for ``admin``; answers its ``otpauth://`` URI (show it once)."""
    secret = pyotp.random_base32()
    row = _factors(session, admin)
    row.totp_sealed, row.totp_last_step = seal_totp(master, admin.id, secret), 0
    row.updated_at = ca.now()
    end_sessions_of(session, admin)
    label = quote(f"{ISSUER}:{admin.username}")
    return f"otpauth://totp/{label}?secret={secret}&issuer={ISSUER}&period={TOTP_STEP_S}"


def verify_factors(
    session: Session, master: MasterKey, username: str, password: str, code: str, at: datetime
) -> Admin:
    """The admin whose password and TOTP code these are; AuthError (one message for
    every cause, so a guesser learns nothing) otherwise. The code's step is consumed."""
    wrong = AuthError("wrong username, password or code")
    admin = session.execute(select(Admin).where(Admin.username == username)).scalar_one_or_none()
    row = session.get(AdminSignIn, admin.id) if admin is not None else None
    if admin is None or row is None or row.password_hash is None or admin.disabled:
        password_matches(password, _dummy_hash())  # the same scrypt cost either way
        raise wrong
    if not password_matches(password, row.password_hash):
        raise wrong
    consume_totp(master, admin, row, code, at)
    return admin


def verify_totp(session: Session, master: MasterKey, admin: Admin, code: str, at: datetime) -> None:
    """The TOTP factor alone (single sign-on that also asks for it); AuthError if wrong."""
    row = session.get(AdminSignIn, admin.id)
    if row is None or admin.disabled:
        raise AuthError("wrong username, password or code")
    consume_totp(master, admin, row, code, at)


def consume_totp(
    master: MasterKey, admin: Admin, row: AdminSignIn, code: str, at: datetime
) -> None:
    """Accept ``code`` once: its step becomes the last one used (no replay)."""
    if row.totp_sealed is None:
        raise AuthError("no TOTP second factor set (certgate console admin totp NAME)")
    step = totp_step(unseal_totp(master, admin.id, row.totp_sealed), code, at, row.totp_last_step)
    if step is None:
        raise AuthError("wrong username, password or code")
    row.totp_last_step = step


@cache
def _dummy_hash() -> str:
    return hash_password("certgate-timing-equaliser")


def open_session(session: Session, admin: Admin, client: str, limits: Timeouts) -> str:
    """A new session for ``admin``; answers the cookie value (its only copy). The admin's
    expired sessions are deleted here."""
    issued = new_secret(SESSION_PREFIX)
    at = ca.now()
    session.execute(
        delete(WebSession).where(
            WebSession.admin_id == admin.id,
            or_(
                WebSession.last_seen_at < at - limits.idle,
                WebSession.created_at < at - limits.absolute,
            ),
        )
    )
    session.add(
        WebSession(
            id=issued.id,
            admin_id=admin.id,
            secret_hash=issued.secret_hash,
            created_at=at,
            last_seen_at=at,
            client=client[:64],
        )
    )
    return issued.token


def session_for(session: Session, token: str | None, at: datetime, limits: Timeouts) -> SignedIn:
    """The live session the cookie names; AuthError for any other."""
    if not token:
        raise AuthError("not signed in")
    session_id, secret = split_secret(token, SESSION_PREFIX)
    row = session.get(WebSession, session_id)
    if row is None or not secret_matches(secret, row.secret_hash):
        raise AuthError("session unknown or ended")
    if at - row.last_seen_at > limits.idle or at - row.created_at > limits.absolute:
        raise AuthError("session expired")  # the row goes at its admin's next sign-in
    admin = session.get(Admin, row.admin_id)
    if admin is None or admin.disabled:
        raise AuthError("admin account disabled")
    if at - row.last_seen_at > min(limits.idle / 4, timedelta(minutes=1)):
        row.last_seen_at = at  # idle clock, written at most once a minute per session
    return SignedIn(admin, row.id, secret)


def close_session(session: Session, session_id: str) -> None:
    row = session.get(WebSession, session_id)
    if row is not None:
        session.delete(row)


def end_sessions_of(session: Session, admin: Admin) -> None:
    session.execute(delete(WebSession).where(WebSession.admin_id == admin.id))
