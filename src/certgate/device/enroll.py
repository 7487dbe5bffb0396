"""Talking to the console as a device: enrollment, and Proxy-mode app authentication.

Every private key is generated here and only its CSR (RFC 2986) is sent. Every
certificate the console returns is checked before it is stored: it must certify our key,
name exactly the identity we asked for (docs/CONVENTIONS.md), and chain to the console
root pinned at enrollment. Console answers are translated to the error tree in one place,
``_raise_for``; an unenrolled device gets :class:`DeviceUnenrolled`, whose message tells
the user how to enroll again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509

from certgate.device.state import AppFiles, CertifiedKey, Enrollment, StateDir
from certgate.errors import (
    AuthError,
    BadRequest,
    CertgateError,
    ChainError,
    ConfigError,
    Conflict,
    NotFound,
    PermissionDenied,
)
from certgate.pki import identity
from certgate.pki.csr import build_csr
from certgate.pki.identity import Identity, identity_of
from certgate.pki.keys import PrivateKey, generate_key
from certgate.pki.verify import crosses_of, verify_client_chain
from certgate.tlsconf import client_context

__all__ = [
    "AppCredentials",
    "ConsoleAPI",
    "ConsoleUnreachable",
    "DeviceUnenrolled",
    "authenticate_app",
    "check_issued",
    "default_platform",
    "enroll",
    "reenroll_guidance",
]

TIMEOUT_S = 30.0
MAX_ERROR_DETAIL = 500


class ConsoleUnreachable(CertgateError):
    """The console could not be reached (network, TLS, timeout)."""


class DeviceUnenrolled(PermissionDenied):
    """The console unenrolled (or wiped) this device: its certificates are revoked."""


class ConsoleAPI:
    """The console's device API over HTTPS, trusting only the pinned console root."""

    def __init__(
        self,
        url: str,
        trust: list[x509.Certificate],
        credential: str | None = None,
        client_identity: CertifiedKey | None = None,
    ) -> None:
        if urlsplit(url).scheme != "https":
            # The credential and enrollment secrets must never travel in clear.
            raise ConfigError(f"the console URL must be https://..., got {url!r}")
        mine = client_identity
        chain = [mine.cert, *mine.chain] if mine else []
        ctx = client_context(trust, chain=chain, key=mine.key if mine else None)
        headers = {"authorization": f"Bearer {credential}"} if credential else {}
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url, verify=ctx, headers=headers, timeout=TIMEOUT_S
        )

    @classmethod
    def for_state(cls, state: StateDir) -> ConsoleAPI:
        enrollment = state.enrollment()
        return cls(enrollment.console_url, state.console_ca(), state.credential())

    @classmethod
    def with_device_cert(cls, state: StateDir) -> ConsoleAPI:
        """Calls authenticated by the device certificate over mTLS (posture check-ins)."""
        device = state.device_identity()
        if device is None:
            raise ConfigError("no device certificate yet: run `certgate device profile`")
        return cls(state.enrollment().console_url, state.console_ca(), client_identity=device)

    def __enter__(self) -> ConsoleAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return _json(self._send(method, path, json=body), path)

    def _send(self, method: str, path: str, **options: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **options)
        except httpx.HTTPError as exc:
            raise ConsoleUnreachable(f"console {self.url}: {exc}") from exc
        _raise_for(response)
        return response

    def device_status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.call("GET", "/api/v1/device")
        return status

    def check_in(self, report: dict[str, Any]) -> dict[str, Any]:
        """Report posture (needs the device certificate: ``with_device_cert``); the answer
        is the compliance verdict."""
        verdict: dict[str, Any] = self.call("POST", "/api/v1/device/checkin", report)
        return verdict

    def device_policy(self, after: int, wait_s: float) -> Any:
        """The group policy if newer than version ``after`` (the console holds the request
        up to ``wait_s``), else None."""
        path = "/api/v1/device/policy"
        timeout = httpx.Timeout(TIMEOUT_S, read=wait_s + TIMEOUT_S)
        response = self._send("GET", path, params={"after": after, "wait": wait_s}, timeout=timeout)
        return None if response.status_code == 204 else _json(response, path)


def _json(response: httpx.Response, path: str) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise CertgateError(f"console answered {path} with something not JSON") from exc


def _raise_for(response: httpx.Response) -> None:
    """The one place where console statuses become errors."""
    if response.is_success:
        return
    detail = _detail(response)
    status = response.status_code
    if status == 403 and "enroll it again" in detail:
        raise DeviceUnenrolled(detail)
    errors: dict[int, type[CertgateError]] = {
        400: BadRequest,
        401: AuthError,
        403: PermissionDenied,
        404: NotFound,
        409: Conflict,
        413: BadRequest,
        422: BadRequest,
    }
    raise errors.get(status, CertgateError)(f"console answered {status}: {detail}")


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        detail = body.get("detail") if isinstance(body, dict) else None
    except ValueError:
        detail = None
    return str(detail or response.text)[:MAX_ERROR_DETAIL]


def reenroll_guidance(state: StateDir, console_url: str | None = None) -> str:
    """What to tell a user whose device the console unenrolled."""
    url = console_url or "<console URL>"
    return (
        "The console reports that this device is no longer enrolled (an administrator "
        "unenrolled or wiped it); its certificates are revoked and tunnels refuse them.\n"
        "To use certgate on this device again, get a new enrollment token (or use the "
        "enrollment user's password) and enroll again:\n"
        f"  certgate device enroll --force --state-dir {state.path} --console {url} "
        f"--ca-file {state.console_ca_path} --token <NEW TOKEN>\n"
        "then run `certgate device profile` and `certgate device app-auth` for each app."
    )


def default_platform() -> str:
    if sys.platform.startswith("darwin"):
        return "macos"
    if sys.platform.startswith("win"):
        return "windows"
    return "linux"


def enroll(
    state: StateDir,
    console_url: str,
    console_ca: bytes,
    *,
    token: str | None = None,
    username: str | None = None,
    password: str | None = None,
    platform: str | None = None,
    name: str = "",
    force: bool = False,
) -> tuple[Enrollment, str]:
    """Enroll with a one-time token or enrollment user + password; returns the enrollment
    and the compliance status the console reported."""
    if bool(token) == bool(username and password):
        raise ConfigError("enroll with either a token or an enrollment user and password")
    trust = _parse_ca(console_ca)
    state.create()
    if state.is_enrolled() and not force:
        raise ConfigError(f"{state.path} is already enrolled; use --force to enroll again")
    body = {"token": token, "username": username, "password": password}
    body |= {"platform": platform or default_platform(), "name": name}
    with ConsoleAPI(console_url, trust) as api:
        answer = api.call("POST", "/api/v1/enroll", body)
    enrollment = Enrollment(
        console_url=console_url.rstrip("/"),
        device_uid=_field(answer, "device_uid", identity.DEVICE_UID_RE.fullmatch),
        group_id=_field(answer, "group_id", identity.GROUP_ID_RE.fullmatch),
        platform=str(body["platform"]),
        name=name,
        enrolled_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    credential = _field(answer, "credential", str.isprintable)
    state.wipe()  # nothing of a previous enrollment may survive a forced one
    state.save_enrollment(enrollment, credential, console_ca)
    return enrollment, str(answer.get("compliance_status", "unknown"))


def _parse_ca(data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"the console CA file holds no PEM certificate: {exc}") from exc
    return certs


def _field(answer: Any, name: str, valid: Any) -> str:
    value = answer.get(name) if isinstance(answer, dict) else None
    if not isinstance(value, str) or not value or not valid(value):
        raise CertgateError(f"console answer has no valid {name!r}")
    return value


@dataclass(frozen=True, slots=True)
class AppCredentials:
    bundle_id: str
    identity: CertifiedKey
    files: AppFiles


def authenticate_app(
    state: StateDir,
    bundle_id: str,
    username: str,
    password: str,
    export_password: bytes | None = None,
) -> AppCredentials:
    """Proxy mode: the app's first authentication with the enrollment credentials earns
    its app+device certificate; a new key is generated for every authentication."""
    files = state.app_files(bundle_id)  # validates the bundle id before any network use
    enrollment = state.enrollment()
    key = generate_key()
    body = {"username": username, "password": password, "csr": build_csr(key, bundle_id).decode()}
    with ConsoleAPI.for_state(state) as api:
        answer = api.call("POST", f"/api/v1/device/apps/{bundle_id}/certificate", body)
    expected = identity.app(enrollment.device_uid, enrollment.group_id, bundle_id)
    issued = check_issued(answer, key, expected, state.console_ca())
    state.save_app(bundle_id, issued, export_password)
    return AppCredentials(bundle_id, issued, files)


def check_issued(
    answer: Any, key: PrivateKey, expected: Identity, roots: list[x509.Certificate]
) -> CertifiedKey:
    """Refuse an issued certificate that is not ours, names someone else, or does not chain
    to the pinned console root."""
    try:
        cert = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
        chain = [x509.load_pem_x509_certificate(str(c).encode()) for c in answer["chain"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ChainError(f"console answer holds no usable certificate: {exc}") from exc
    issued = CertifiedKey(key, cert, tuple(chain))
    issued.check_pair()
    if identity_of(cert) != expected:
        raise ChainError(f"issued certificate names {identity_of(cert).uri()}, not us")
    intermediates = [c for c in chain if c not in roots]
    # During a Root rotation the chain ends with a cross certificate the pinned Root signed.
    verify_client_chain(cert, intermediates, [*roots, *crosses_of(chain, roots)])
    return issued
