"""The admin commands' remote mode: one client of the console's admin API.

``certgate console remote ... COMMAND`` sends what the local command would do to the
console's API (API key + admin client certificate, the console verified against a CA
file) and prints the answer as the local command prints its own. The console decides
everything (validation, RBAC, business rules); this module only knows which route serves
which command (``ROUTES``, the one mapping), follows page cursors, and turns the API's
JSON error (``{"error": code, "detail": reason}``) into a message and an exit code.
"""

from __future__ import annotations

import hmac
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, pkcs12

from certgate import tlsconf
from certgate.pki.keys import PrivateKey
from certgate.pki.thumbprint import ROOT_PIN_HINT, is_thumbprint, thumbprint

# Exit codes: 1 is what the local mode answers for any refused command, so a script sees
# the same code for "device not found" either way; the rest only exist over the network.
EXIT_REFUSED = 1
EXIT_UNAUTHENTICATED = 3  # 401: API key or client certificate not accepted
EXIT_FORBIDDEN = 4  # 403: authenticated, the role does not allow it
EXIT_UNREACHABLE = 5  # no answer, or the console's certificate did not verify
EXIT_CREDENTIALS = 6  # the local credentials could not be read (file, password, env var)
_EXIT_BY_STATUS = {401: EXIT_UNAUTHENTICATED, 403: EXIT_FORBIDDEN}

# The one mapping from commands to the API's routes (see docs/CONVENTIONS.md).
ROUTES: dict[str, tuple[str, str]] = {
    "group list": ("GET", "/api/v1/groups"),
    "group show": ("GET", "/api/v1/groups/{group_id}"),
    "group create": ("POST", "/api/v1/groups"),
    "group set": ("PATCH", "/api/v1/groups/{group_id}/settings"),
    "device list": ("GET", "/api/v1/groups/{group_id}/devices"),
    "device show": ("GET", "/api/v1/devices/{uid}"),
    "device set compliance": ("PUT", "/api/v1/devices/{uid}/compliance"),
    "device set action": ("POST", "/api/v1/devices/{uid}/{action}"),
    "device compliance": ("GET", "/api/v1/devices/{uid}/compliance"),
    "device compliance override": ("PUT", "/api/v1/devices/{uid}/compliance-override"),
    "device compliance clear": ("DELETE", "/api/v1/devices/{uid}/compliance-override"),
    "device enroll-user": ("POST", "/api/v1/groups/{group_id}/enrollment-users"),
    "device enroll-token": ("POST", "/api/v1/groups/{group_id}/enrollment-tokens"),
    "device scep-challenge": ("POST", "/api/v1/devices/{uid}/scep/challenge"),
    "device scep-profile-challenge": ("POST", "/api/v1/groups/{group_id}/scep/challenge"),
    "cert list": ("GET", "/api/v1/groups/{group_id}/certificates"),
    "cert revoke": ("POST", "/api/v1/certificates/{serial}/revoke"),
    "admin create": ("POST", "/api/v1/admins"),
    "admin list": ("GET", "/api/v1/admins"),
    "admin set-password": ("PUT", "/api/v1/admins/{admin_id}/password"),
    "admin totp": ("POST", "/api/v1/admins/{admin_id}/totp"),
    "pki chain": ("GET", "/pki/chain.pem"),
    "admin keys": ("GET", "/api/v1/admins/{admin_id}/api-keys"),
    "admin new-key": ("POST", "/api/v1/admins/{admin_id}/api-keys"),
    "admin grant": ("POST", "/api/v1/admins/{admin_id}/roles"),
    "admin revoke-key": ("DELETE", "/api/v1/api-keys/{key_id}"),
    "audit list": ("GET", "/api/v1/audit"),
    "audit verify": ("GET", "/api/v1/audit/verify"),
    "installer": ("GET", "/api/v1/groups/{group_id}/tunnel/installer"),
    "tunnel nodes": ("GET", "/api/v1/groups/{group_id}/tunnel/nodes"),
    "rotate status": ("GET", "/api/v1/groups/{group_id}/rotations"),
    "rotate renew": ("POST", "/api/v1/rotations/renew"),
    "rotate start": ("POST", "/api/v1/groups/{group_id}/rotations/{kind}"),
    "rotate switch": ("POST", "/api/v1/groups/{group_id}/rotations/{kind}/switch"),
    "rotate finish": ("POST", "/api/v1/groups/{group_id}/rotations/{kind}/finish"),
    "rotate renew-devices": (
        "POST",
        "/api/v1/groups/{group_id}/rotations/device-root/renew-devices",
    ),
}


class RemoteFailure(Exception):
    """A remote command failed; ``message`` for stderr, ``exit_code`` for the shell."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass(frozen=True)
class Target:
    """Where the console is and how to prove who we are. Secrets come from environment
    variables named here, never from command-line values (those show in ``ps``)."""

    url: str
    ca_file: Path | None
    admin_cert: Path
    admin_key: Path | None = None
    api_key_env: str = "CERTGATE_API_KEY"
    password_env: str = "CERTGATE_ADMIN_CERT_PASSWORD"
    pin: str | None = None

    def api_key(self) -> str:
        value = os.environ.get(self.api_key_env, "").strip()
        if not value:
            raise RemoteFailure(f"no API key: set ${self.api_key_env}", EXIT_CREDENTIALS)
        return value

    def password(self) -> bytes | None:
        value = os.environ.get(self.password_env)
        return value.encode() if value else None


def identity(target: Target) -> tuple[list[x509.Certificate], PrivateKey]:
    """The admin's certificate chain and key: a PKCS#12 file, or PEM certificate(s) and
    a (preferably encrypted) PEM key; the password from ``target.password_env``."""
    try:
        data = target.admin_cert.read_bytes()
        if target.admin_key is None:
            key, cert, extra = pkcs12.load_key_and_certificates(data, target.password())
            if cert is None:
                raise ValueError("the PKCS#12 file holds no certificate")
            chain = [cert, *extra]
        else:
            chain = x509.load_pem_x509_certificates(data)
            key = load_pem_private_key(target.admin_key.read_bytes(), target.password())
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError("no EC or RSA private key in it")
        return chain, key
    except OSError as exc:
        raise RemoteFailure(f"cannot read the admin certificate: {exc}", EXIT_CREDENTIALS) from exc
    except (ValueError, TypeError) as exc:
        hint = f" (password from ${target.password_env})"
        raise RemoteFailure(
            f"cannot load the admin certificate: {exc}{hint}", EXIT_CREDENTIALS
        ) from exc


def tls_context(target: Target) -> ssl.SSLContext:
    """Trust only the CA file's certificates, or the pinned Root; present the admin's
    certificate."""
    chain, key = identity(target)
    return tlsconf.client_context(trust_of(target), chain=chain, key=key)


def trust_of(target: Target) -> list[x509.Certificate]:
    if (target.ca_file is None) == (target.pin is None):
        raise RemoteFailure("give one of --ca-file and --pin", EXIT_CREDENTIALS)
    if target.pin is not None:
        return [pinned_root(target.url, target.pin)]
    assert target.ca_file is not None
    try:
        return x509.load_pem_x509_certificates(target.ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise RemoteFailure(f"--ca-file {target.ca_file}: {exc}", EXIT_CREDENTIALS) from exc


def pinned_root(url: str, pin: str) -> x509.Certificate:
    """The console's Root, trusted because its SHA-256 thumbprint (as ``console init``
    prints it) is ``pin``. It is read from the public ``/pki/root.pem`` over a connection
    that is not verified yet and carries no credential; every later connection is verified
    against it (chain and host name), so a stand-in console cannot pass."""
    wanted = pin.lower().removeprefix("sha256:").replace(":", "")
    if not is_thumbprint(wanted):
        raise RemoteFailure(f"--pin {pin!r}: not a SHA-256 thumbprint (64 hex)", EXIT_CREDENTIALS)
    try:
        with httpx.Client(base_url=url, verify=False, timeout=30) as bootstrap:
            response = bootstrap.get("/pki/root.pem")
        root = x509.load_pem_x509_certificate(response.content)
    except httpx.TransportError as exc:
        raise RemoteFailure(f"cannot reach the console at {url}: {exc}", EXIT_UNREACHABLE) from exc
    except ValueError as exc:
        raise RemoteFailure(f"console {url} sent no Root certificate", EXIT_UNREACHABLE) from exc
    if not hmac.compare_digest(thumbprint(root), wanted):
        raise RemoteFailure(
            f"console {url} not trusted: its Root {thumbprint(root)} does not match --pin"
            f" {wanted}: {ROOT_PIN_HINT}",
            EXIT_UNREACHABLE,
        )
    return root


def issuer_chain(cert: x509.Certificate, pool: list[x509.Certificate]) -> list[x509.Certificate]:
    """The CAs above ``cert`` in ``pool``, issuer first, up to a self-signed root (what the
    local ``admin create`` writes after the admin's certificate)."""
    chain: list[x509.Certificate] = []
    current = cert
    while current.issuer != current.subject:
        parent = next((c for c in pool if c.subject == current.issuer), None)
        if parent is None or parent in chain:
            break
        chain.append(parent)
        current = parent
    return chain


def route(command: str, **params: str) -> tuple[str, str]:
    """The method and path serving ``command``, its path parameters filled in (quoted)."""
    method, template = ROUTES[command]
    return method, template.format(**{k: quote(v, safe="") for k, v in params.items()})


def failure_of(response: httpx.Response) -> RemoteFailure:
    """The API's JSON error as the local mode would say it (its ``detail``, the same text
    the service raised) with the exit code of its class."""
    try:
        body = response.json()
        detail = str(body["detail"])
    except (ValueError, KeyError, TypeError):
        detail = f"HTTP {response.status_code} from the console: {response.text[:200]}"
    code = _EXIT_BY_STATUS.get(response.status_code, EXIT_REFUSED)
    return RemoteFailure(detail, code)


class RemoteConsole:
    """An open connection to one console's admin API."""

    def __init__(self, target: Target) -> None:
        self._http = httpx.Client(
            base_url=target.url,
            verify=tls_context(target),
            headers={"authorization": f"Bearer {target.api_key()}"},
            timeout=60,
        )
        self._url = target.url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteConsole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self,
        command: str,
        *,
        body: object = None,
        query: dict[str, Any] | None = None,
        **params: str,
    ) -> httpx.Response:
        """``command``'s request; a RemoteFailure for any answer but 2xx."""
        method, path = route(command, **params)
        return self._checked(self._request(method, path, body, query))

    def call(
        self,
        command: str,
        *,
        body: object = None,
        query: dict[str, Any] | None = None,
        **params: str,
    ) -> Any:
        """``command``'s JSON answer (None for 204)."""
        response = self.send(command, body=body, query=query, **params)
        return response.json() if response.content else None

    def listing(
        self, command: str, limit: int, follow: bool, query: dict[str, Any], **params: str
    ) -> tuple[list[Any], bool]:
        """A listing's items, page by page (RFC 8288 ``Link: rel="next"``): only the first
        page unless ``follow``; and whether pages were left unread."""
        response = self.send(command, query={**query, "limit": limit}, **params)
        items: list[Any] = response.json()
        while follow and "next" in response.links:
            next_url = response.links["next"]["url"]
            response = self._checked(self._request("GET", next_url, None, None))
            items += response.json()
        return items, "next" in response.links

    def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        raise failure_of(response)

    def _request(
        self, method: str, path: str, body: object, query: dict[str, Any] | None
    ) -> httpx.Response:
        params = {k: v for k, v in (query or {}).items() if v is not None}
        try:
            return self._http.request(method, path, json=body, params=params or None)
        except httpx.ConnectError as exc:
            raise RemoteFailure(self._unreachable(exc), EXIT_UNREACHABLE) from exc
        except httpx.TransportError as exc:
            raise RemoteFailure(f"console {self._url}: {exc}", EXIT_UNREACHABLE) from exc

    def _unreachable(self, exc: httpx.ConnectError) -> str:
        cause: BaseException | None = exc
        while cause is not None:  # httpx wraps httpcore's error, which wraps ssl's
            if isinstance(cause, ssl.SSLCertVerificationError):
                return (
                    f"console {self._url} not trusted: its certificate does not verify"
                    f" against --ca-file ({cause.verify_message})"
                )
            cause = cause.__cause__ or cause.__context__
        return f"cannot reach the console at {self._url}: {exc}"
