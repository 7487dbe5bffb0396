"""The Access identity service: OpenID Connect endpoints over HTTPS, as a FastAPI app.

The device certificate reaches Access only from the cert proxy: the proxy connects with
its own client certificate, whose thumbprint Access pins, and carries the device's
certificate in RFC 9440 ``Client-Cert`` / ``Client-Cert-Chain``. Those fields on any other
connection are refused (403) and logged, on every path, before routing
(:class:`ClientCertGuard`). Status mapping lives here: OAuth errors become RFC 6749 error
responses, other certgate errors a JSON error; every denial is logged with its reason and
never with a code, verifier, token or key.

Two tasks run beside the app (its lifespan): :class:`~certgate.access.trust.TrustFollower`
keeps the console's Device Roots (a device certificate is verified against the set in use,
its revocation against its issuer's CRL), and :func:`keep_renewed` renews Access's own
certificates before they expire (``certgate.access.renewal``) and puts them to use live.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from cryptography import x509
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from certgate import errors
from certgate.access import oidc, renewal
from certgate.access.config import AccessConfig, ClientRegistration, SignInStoreKind
from certgate.access.devicestatus import (
    ConsoleStatus,
    ConsoleUnavailable,
    DeviceDenied,
    admit,
    device_identity,
)
from certgate.access.install import Material
from certgate.access.signins import ConsoleSignIns
from certgate.access.trust import DeviceRoot, TrustFollower
from certgate.httperrors import RETRY_AFTER_S, ErrorShield
from certgate.httpserver import peer_cert_der
from certgate.metrics import (
    CertificateCollector,
    HttpMetrics,
    MetricsMiddleware,
    metrics_endpoint,
    route_templates,
)
from certgate.pki import expiry
from certgate.pki.thumbprint import thumbprint, thumbprint_der
from certgate.protocol.client_cert_header import (
    CLIENT_CERT,
    CLIENT_CERT_CHAIN,
    ClientCertHeaderError,
    decode_client_cert,
    decode_client_cert_chain,
    strip_client_cert_headers,
)
from certgate.ratelimit import SignInLimiter
from certgate.tlsconf import ClientAuth, client_context, load_identity, server_context

__all__ = [
    "AccessState",
    "ConsoleTransport",
    "access_tls_context",
    "console_client",
    "create_app",
    "keep_renewed",
    "renew_now",
]

log = logging.getLogger("certgate.access")
MAX_FORM_BODY = 8 * 1024
NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}  # RFC 6749 §5.1


@dataclass
class AccessState:
    """``material`` and ``pins`` change live (renewal); ``tls`` is the listening context
    (set by whoever serves the app), into which a renewed TLS identity is loaded."""

    config: AccessConfig
    material: Material
    status: ConsoleStatus
    store: oidc.SignInStore
    signer: oidc.IdTokenSigner
    trust: TrustFollower
    pins: tuple[str, ...]  # the cert proxy certificate(s) Access accepts: current, previous
    clients: dict[str, ClientRegistration] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None
    renewal_error: str | None = None

    @classmethod
    def build(
        cls,
        config: AccessConfig,
        material: Material,
        console: httpx.AsyncClient,
        console_transport: ConsoleTransport | None = None,
    ) -> AccessState:
        """``console_transport``: the console channel's, told of the console's Roots."""
        status = ConsoleStatus(console, config.status_ttl_s, config.console_budget_s)
        trust = TrustFollower(
            console,
            material.device_roots,
            config.files.device_roots,
            config.trust_refresh_s,
            on_roots=None if console_transport is None else console_transport.trust,
        )
        clients = {c.client_id: c for c in config.clients}
        signer = oidc.IdTokenSigner(material.id_token_key)
        store = signin_store(config, console)
        pins = (config.certproxy_thumbprint,)
        return cls(config, material, status, store, signer, trust, pins, clients)

    def certificates_in_use(self, now: float) -> list[expiry.CertificateInUse]:
        return expiry.in_use(renewal.certificates(self.material), now)

    def put_to_use(self, material: Material) -> None:
        """Renewed or replaced certificates, live: a new serving identity into the listening
        context (new connections get it), a new cert proxy certificate pinned beside the
        previous one (the proxy presents it once it has reloaded)."""
        chain, key = material.serving(self.config.tls_mode)
        if self.tls is not None and chain != self.material.serving(self.config.tls_mode)[0]:
            load_identity(self.tls, chain, key)
        if material.certproxy_cert != self.material.certproxy_cert:
            self.pins = (thumbprint(material.certproxy_cert), self.pins[0])
        self.material = material


def renew_now(state: AccessState, now: float) -> list[str]:
    """One renewal check at ``now``; a failure is logged, kept for ``/healthz`` and retried
    at the next check, with the certificates in use left as they are."""
    try:
        config, material, renewed = renewal.renew(state.config, state.material, now)
    except (errors.CertgateError, OSError) as exc:
        state.renewal_error = str(exc)
        log.error("renewal before expiry failed (retrying later): %s", exc)
        return []
    state.renewal_error = None
    if renewed:
        state.config = config
        state.put_to_use(material)
    return renewed


async def keep_renewed(state: AccessState) -> None:
    while True:
        await asyncio.sleep(state.config.renew_check_s)
        try:
            renew_now(state, time.time())
        except Exception:  # the loop must outlive a bug: the certificates in use stay
            state.renewal_error = "unexpected error, logged"
            log.exception("renewal before expiry failed (retrying later)")


def signin_store(config: AccessConfig, console: httpx.AsyncClient) -> oidc.SignInStore:
    """The store ``config.signins`` names: the console's (shared) or this node's memory."""
    if config.signins is SignInStoreKind.CONSOLE:
        return ConsoleSignIns(console, config.request_ttl_s, config.code_ttl_s)
    return oidc.MemorySignIns(
        oidc.TransactionStore(config.request_ttl_s, config.code_ttl_s, config.max_pending)
    )


def access_tls_context(config: AccessConfig, material: Material) -> ssl.SSLContext:
    """443: the self-signed or public certificate; a client certificate is asked for, and
    verified, only against the install root, so only the cert proxy's can be presented
    (clients choose certificates by the CA names this request lists, RFC 8446 §4.2.4)."""
    chain, key = material.serving(config.tls_mode)
    return server_context(
        chain,
        key,
        client_cas=[material.install_root],
        client_auth=ClientAuth.OPTIONAL,
        alpn=["http/1.1"],
    )


def console_context(
    material: Material, anchors: tuple[x509.Certificate, ...] | None = None
) -> ssl.SSLContext:
    """The console channel's TLS: the console's Roots Access trusts (``anchors``; unset,
    those of ``material``: the one pinned at install, or those a Root rotation brought),
    the admin certificate."""
    return client_context(
        list(material.device_roots.anchors if anchors is None else anchors),
        chain=[material.console_admin_cert],
        key=material.console_admin_key,
    )


class ConsoleTransport(httpx.AsyncBaseTransport):
    """The console channel's connections, verified with the console's Roots trusted now.

    An ``SSLContext`` can gain a CA but never drop one, so a Root rotation that retires a
    Root (perhaps because its key leaked) is followed by a new context and a new pool:
    ``trust`` swaps them, and every later request connects under the new Roots alone.
    Requests already on the old pool finish there; it is closed with the channel."""

    def __init__(self, material: Material) -> None:
        self._material = material
        self._pool = self._new_pool(None)
        self._retired: list[httpx.AsyncHTTPTransport] = []

    def _new_pool(self, anchors: tuple[x509.Certificate, ...] | None) -> httpx.AsyncHTTPTransport:
        return httpx.AsyncHTTPTransport(verify=console_context(self._material, anchors))

    def trust(self, anchors: tuple[x509.Certificate, ...]) -> None:
        """From now on, connect trusting ``anchors`` only (``TrustFollower``'s ``on_roots``)."""
        self._retired.append(self._pool)
        self._pool = self._new_pool(anchors)
        log.info("console channel: now trusting %d console Root(s) only", len(anchors))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._pool.handle_async_request(request)

    async def aclose(self) -> None:
        for pool in (*self._retired, self._pool):
            await pool.aclose()


def console_client(
    config: AccessConfig, material: Material, transport: ConsoleTransport | None = None
) -> httpx.AsyncClient:
    """mTLS to the console with the admin certificate, API key as bearer (admin API)."""
    return httpx.AsyncClient(
        base_url=config.console_url,
        transport=transport or ConsoleTransport(material),
        headers={"authorization": f"Bearer {material.console_api_key}"},
        timeout=config.console_timeout_s,
        follow_redirects=False,
    )


def _peer(scope: Mapping[str, Any]) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown"


def from_cert_proxy(scope: Mapping[str, Any], pins: Sequence[str]) -> bool:
    """True when this connection presented a pinned cert proxy client certificate."""
    der = peer_cert_der(scope)
    if der is None:
        return False
    presented = thumbprint_der(der)
    return any(hmac.compare_digest(presented, pinned) for pinned in pins)


class ClientCertGuard:
    """Refuse ``Client-Cert*`` fields (any spelling) on connections not from the cert proxy."""

    def __init__(self, app: Any, state: AccessState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers", [])
            carries = len(strip_client_cert_headers(headers)) != len(headers)
            if carries and not from_cert_proxy(scope, self.state.pins):
                log.warning(
                    "denied %s %s from %s: Client-Cert header on a connection that is not "
                    "the cert proxy's",
                    scope.get("method"),
                    scope.get("path"),
                    _peer(scope),
                )
                response = _error(
                    403,
                    "client_cert_not_accepted",
                    "Client-Cert headers are accepted only from the cert proxy; present the "
                    "device certificate to the cert proxy instead",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse(
        {"error": error, "error_description": description}, status_code=status, headers=NO_STORE
    )


def _redirect(location: str) -> RedirectResponse:
    return RedirectResponse(location, status_code=302, headers=NO_STORE)


def state_of(request: Request) -> AccessState:
    state: AccessState = request.app.state.access
    return state


async def _oauth_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, oidc.OAuthError)
    request.app.state.metrics.signin_failures.labels("oidc").inc()
    log.warning(
        "denied %s %s from %s: %s (%s)",
        request.method,
        request.url.path,
        _peer(request.scope),
        exc.error,
        exc.description,
    )
    if isinstance(exc, oidc.AuthorizeError) and exc.redirect_uri is not None:
        return _redirect(oidc.error_redirect(exc, state_of(request).config.issuer))
    response = _error(exc.status, exc.error, exc.description)
    if exc.error == "invalid_client":  # RFC 6749 §5.2: the scheme the client may use
        response.headers["www-authenticate"] = 'Basic realm="certgate access"'
    return response


async def _certgate_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.CertgateError)
    log.warning(
        "denied %s %s from %s: %s", request.method, request.url.path, _peer(request.scope), exc
    )
    if isinstance(exc, errors.Unavailable):
        response = _error(503, "unavailable", str(exc))
        response.headers["retry-after"] = str(RETRY_AFTER_S)
        return response
    status = 403 if isinstance(exc, errors.PermissionDenied) else 400
    return _error(status, "invalid_request", str(exc))


def _handle_of(request: Request) -> str:
    values = request.query_params.getlist("req")
    if len(values) != 1 or not 1 <= len(values[0]) <= 64:
        raise oidc.OAuthError("invalid_request", "the certificate step needs one req parameter")
    return values[0]


def _device_cert(request: Request, state: AccessState) -> tuple[x509.Certificate, DeviceRoot]:
    """The device certificate the cert proxy verified, checked again against the Device
    Roots in use; with the one that issued it."""
    values = request.headers.getlist(CLIENT_CERT)
    if not values:
        raise DeviceDenied("no device certificate was presented to the cert proxy")
    if len(values) != 1:
        raise DeviceDenied(f"{CLIENT_CERT} appears more than once")
    chain_value = request.headers.get(CLIENT_CERT_CHAIN)
    try:
        leaf = x509.load_der_x509_certificate(decode_client_cert(values[0]))
        if chain_value is not None:
            decode_client_cert_chain(chain_value)  # well-formed, but trust comes from config
    except ClientCertHeaderError as exc:
        raise DeviceDenied(f"malformed {CLIENT_CERT} from the cert proxy: {exc}") from exc
    try:
        return leaf, state.trust.current.issuer_of(leaf)
    except errors.ChainError as exc:
        raise DeviceDenied(str(exc)) from exc


async def authenticate_device(request: Request, state: AccessState) -> oidc.DeviceGrant:
    leaf, issuer = _device_cert(request, state)
    try:
        ident = device_identity(leaf)
    except errors.ChainError as exc:
        raise DeviceDenied(f"certificate carries no device identity: {exc}") from exc
    assert ident.device_uid is not None
    try:
        record = await state.status.device(ident.device_uid)
        revoked = await state.status.is_revoked(leaf, issuer)
        return admit(leaf, ident, record, revoked, int(time.time()))
    except ConsoleUnavailable as exc:
        raise DeviceDenied(f"device status is unavailable ({exc})", ident.device_uid) from exc
    except DeviceDenied as exc:
        exc.device_uid = ident.device_uid
        raise


def _forwarded_for(request: Request) -> str:
    return request.headers.get("x-forwarded-for", "?")[:100]


async def cert_step(request: Request) -> Response:
    """The certificate step, reached only through the cert proxy (with the device's cert)."""
    state = state_of(request)
    if not from_cert_proxy(request.scope, state.pins):
        raise oidc.OAuthError(
            "invalid_request",
            f"the certificate step is served by the cert proxy at {state.config.certproxy_url}",
            403,
        )
    handle = _handle_of(request)
    address = _forwarded_for(request)
    refused = _rate_limited(request, address)
    if refused is not None:
        return refused
    auth = await state.store.pending(handle)
    try:
        grant = await authenticate_device(request, state)
    except DeviceDenied as exc:
        await state.store.deny(handle)
        request.app.state.metrics.signin_failures.labels("device").inc()
        _limiter(request).failed(None, address, time.monotonic())
        log.warning(
            "denied device %s for client %s via cert proxy for %s: %s",
            exc.device_uid or "(unidentified)",
            auth.client_id,
            _forwarded_for(request),
            exc,
        )
        denied = oidc.AuthorizeError("access_denied", str(exc), auth.redirect_uri, auth.state)
        return _redirect(oidc.error_redirect(denied, state.config.issuer))
    code = await state.store.issue_code(handle, grant)
    log.info(
        "admitted device %s (group %s, cert %s) for client %s via cert proxy for %s",
        grant.device_uid,
        grant.group_id,
        grant.cert_thumbprint[:16],
        auth.client_id,
        _forwarded_for(request),
    )
    return _redirect(oidc.code_redirect(auth, code, state.config.issuer))


async def authorize(request: Request) -> Response:
    """OpenID Connect Core §3.1.2.1: GET with a query, or POST with a form body."""
    state = state_of(request)
    params = request.query_params.multi_items()
    if request.method == "POST":
        params = await _form(request)
    auth = oidc.parse_authorization_request(params, state.clients)
    handle = await state.store.begin(auth)
    log.info("started sign-in for client %s from %s", auth.client_id, _peer(request.scope))
    target = state.config.certproxy_url.rstrip("/") + oidc.CERT_STEP_PATH
    return _redirect(f"{target}?{urlencode({'req': handle})}")


async def token(request: Request) -> Response:
    state = state_of(request)
    address = request.client.host if request.client else "unknown"
    refused = _rate_limited(request, address)
    if refused is not None:
        return refused
    try:
        credentials = oidc.basic_credentials(request.headers.get("authorization"))
        token_request = oidc.parse_token_request(await _form(request), credentials)
        oidc.authenticate_client(token_request.client_id, credentials, state.clients)
        tx = await state.store.redeem(token_request)
    except oidc.OAuthError:
        _limiter(request).failed(None, address, time.monotonic())
        raise
    claims = oidc.id_token_claims(
        state.config.issuer, tx, int(time.time()), state.config.id_token_ttl_s
    )
    body_out = {
        "access_token": _opaque_token(),
        "token_type": "Bearer",
        "expires_in": state.config.id_token_ttl_s,
        "id_token": state.signer.sign(claims),
        "scope": " ".join(tx.request.scope),
    }
    log.info("issued ID token for device %s to client %s", claims["sub"], claims["aud"])
    return JSONResponse(body_out, headers=NO_STORE)


def _limiter(request: Request) -> SignInLimiter:
    limiter: SignInLimiter = request.app.state.limiter
    return limiter


def _rate_limited(request: Request, address: str) -> Response | None:
    """429 with Retry-After, logged, when this address has spent its failures (a denied
    device at the certificate step, a refused code at the token endpoint); else None."""
    wait_s = _limiter(request).retry_after(None, address, time.monotonic())
    if not wait_s:
        return None
    log.warning(
        "denied %s %s for %s: rate_limited (retry in %d s)",
        request.method,
        request.url.path,
        address,
        wait_s,
    )
    detail = f"too many failed sign-ins from this address; retry in {wait_s} s"
    response = _error(429, "rate_limited", detail)
    response.headers["retry-after"] = str(wait_s)
    return response


def _opaque_token() -> str:
    """OpenID Connect Core §3.1.3.3 requires an access token; Access serves no resource, so
    it is an opaque random value no endpoint accepts."""
    return secrets.token_urlsafe(32)


async def _form(request: Request) -> list[tuple[str, str]]:
    """An ``application/x-www-form-urlencoded`` body (RFC 6749 §4.1.3), bounded."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise oidc.OAuthError("invalid_request", "use application/x-www-form-urlencoded")
    body = await _bounded_body(request, MAX_FORM_BODY)
    try:
        return parse_qsl(body.decode("ascii"), keep_blank_values=True, max_num_fields=20)
    except ValueError as exc:
        raise oidc.OAuthError("invalid_request", "malformed form body") from exc


async def _bounded_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise oidc.OAuthError("invalid_request", f"request body over {limit} bytes", 413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise oidc.OAuthError("invalid_request", f"request body over {limit} bytes", 413)
    return body


def create_app(state: AccessState, console: httpx.AsyncClient | None = None) -> Any:
    """The ASGI app (FastAPI wrapped in :class:`ClientCertGuard`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(state.trust.run()), asyncio.create_task(keep_renewed(state))]
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if console is not None:
            await console.aclose()

    app = FastAPI(title="certgate access", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.openapi_url = None
    app.state.access = state
    app.state.limiter = SignInLimiter()  # failures only, per device address (certgate.ratelimit)
    app.add_exception_handler(oidc.OAuthError, _oauth_error)
    app.add_exception_handler(errors.CertgateError, _certgate_error)
    issuer = state.config.issuer
    app.add_api_route(oidc.DISCOVERY_PATH, lambda: oidc.discovery_document(issuer), methods=["GET"])
    app.add_api_route(oidc.JWKS_PATH, lambda: state.signer.jwks(), methods=["GET"])
    app.add_api_route("/healthz", lambda: healthz(state), methods=["GET"])
    app.add_api_route("/livez", lambda: {"status": "alive"}, methods=["GET"])
    app.add_api_route(oidc.AUTHORIZE_PATH, authorize, methods=["GET", "POST"])
    app.add_api_route(oidc.CERT_STEP_PATH, cert_step, methods=["GET"])
    app.add_api_route(oidc.TOKEN_PATH, token, methods=["POST"])
    metrics = HttpMetrics("access", (), signin_methods=("device", "oidc"))
    app.add_api_route("/metrics", metrics_endpoint(metrics), methods=["GET"])
    metrics.seed(route_templates(app))
    metrics.registry.register(CertificateCollector(lambda: state.certificates_in_use(time.time())))
    app.state.metrics = metrics
    app.add_middleware(ErrorShield, on_failure=metrics.failed)  # a JSON 500/503, never text
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return ClientCertGuard(app, state)


def healthz(state: AccessState) -> dict[str, Any]:
    """Serving (200): the Device Roots in use and whether the console confirmed them
    lately, the certificates in use with a warning for each within its renewal window
    (``pki.expiry``), and any failed refresh or renewal. Access goes on with what it
    has through either failure, so they are warnings, not a 503."""
    certs = [c.to_dict() for c in state.certificates_in_use(time.time())]
    warnings = expiry.warnings(certs, renewal.WARNING)
    trust = state.trust.health()
    if trust["error"]:
        warnings.append(f"Device Roots not refreshed from the console: {trust['error']}")
    if state.renewal_error:
        warnings.append(f"renewal failed: {state.renewal_error}")
    return {"status": "ok", "trust": trust, "certificates": certs, "warnings": warnings}
