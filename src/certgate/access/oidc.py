"""OpenID Connect authorization code flow with PKCE, without I/O.

The flow (OpenID Connect Core 1.0 §3.1, RFC 6749 §4.1, RFC 7636):

1. ``/authorize`` validates the request and opens a :class:`Transaction` waiting for the
   device certificate; the browser is sent to the cert proxy with an opaque handle.
2. The cert proxy forwards the certificate step with the verified client certificate; once
   the device is admitted the transaction gets a one-time code bound to the client, the
   redirect URI and the PKCE challenge.
3. ``/token`` redeems the code once, with the PKCE verifier, for an ES256 ID token.

Each transaction is an explicit state machine (:class:`TxState`); every transition goes
through :meth:`Transaction.move`, and an unexpected one raises.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import ECKey

from certgate.access.config import ClientRegistration
from certgate.errors import BadRequest
from certgate.pki.keys import private_key_pem

__all__ = [
    "AUTHORIZE_PATH",
    "CERT_STEP_PATH",
    "DISCOVERY_PATH",
    "JWKS_PATH",
    "TOKEN_PATH",
    "AuthorizationRequest",
    "AuthorizeError",
    "ClientCredentials",
    "DeviceGrant",
    "IdTokenSigner",
    "MemorySignIns",
    "OAuthError",
    "SignInStore",
    "TokenRequest",
    "Transaction",
    "TransactionStore",
    "TxState",
    "authenticate_client",
    "basic_credentials",
    "check_bindings",
    "code_redirect",
    "discovery_document",
    "error_redirect",
    "id_token_claims",
    "parse_authorization_request",
    "parse_token_request",
    "s256",
    "secret_hash",
]

AUTHORIZE_PATH = "/authorize"
CERT_STEP_PATH = "/authorize/cert"
TOKEN_PATH = "/token"
JWKS_PATH = "/jwks.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"
ALG = "ES256"
MAX_PARAM_CHARS = 512
HANDLE_BYTES = 32
Clock = Callable[[], float]


class OAuthError(BadRequest):
    """An OAuth 2.0 error response (RFC 6749 §4.1.2.1, §5.2): ``error`` is the registered
    code, the message is the ``error_description``."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


class AuthorizeError(OAuthError):
    """An authorization error; redirected to the client when ``redirect_uri`` is known and
    trusted, shown to the user otherwise (RFC 6749 §4.1.2.1: never redirect to an
    unverified URI)."""

    def __init__(
        self,
        error: str,
        description: str,
        redirect_uri: str | None = None,
        state: str | None = None,
    ) -> None:
        super().__init__(error, description)
        self.redirect_uri, self.state = redirect_uri, state


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    client_id: str
    redirect_uri: str
    scope: tuple[str, ...]
    state: str
    nonce: str
    code_challenge: str


def _single_values(params: Sequence[tuple[str, str]]) -> dict[str, str]:
    """RFC 6749 §3.1: parameters MUST NOT be included more than once."""
    values: dict[str, str] = {}
    for name, value in params:
        if name in values:
            raise AuthorizeError("invalid_request", f"parameter {name!r} given more than once")
        values[name] = value
    return values


def _is_vschar(text: str) -> bool:
    """RFC 6749 Appendix A: state and similar values are printable ASCII (%x20-7E)."""
    return all(0x20 <= ord(c) <= 0x7E for c in text)


def _trusted_client(
    values: Mapping[str, str], clients: Mapping[str, ClientRegistration]
) -> tuple[str, str]:
    """Client id and exactly registered redirect URI, or a non-redirectable error."""
    client = clients.get(values.get("client_id", ""))
    if client is None:
        raise AuthorizeError("invalid_request", "unknown client_id")
    redirect_uri = values.get("redirect_uri", "")
    # OpenID Connect Core §3.1.2.1: redirect_uri is required and matches exactly (simple
    # string comparison, RFC 6749 §3.1.2.3 and RFC 9700 §4.1.3).
    if redirect_uri not in client.redirect_uris:
        raise AuthorizeError("invalid_request", "redirect_uri is not registered for this client")
    return client.client_id, redirect_uri


def _required(values: Mapping[str, str], name: str, fail: Callable[[str], AuthorizeError]) -> str:
    value = values.get(name, "")
    if not value:
        raise fail(f"{name} is required")
    if len(value) > MAX_PARAM_CHARS or not _is_vschar(value):
        raise fail(f"{name} must be 1-{MAX_PARAM_CHARS} printable ASCII characters")
    return value


def parse_authorization_request(
    params: Sequence[tuple[str, str]], clients: Mapping[str, ClientRegistration]
) -> AuthorizationRequest:
    """Validate an authorization request; raise AuthorizeError (redirectable once the client
    and its redirect URI are verified)."""
    values = _single_values(params)
    client_id, redirect_uri = _trusted_client(values, clients)
    state = values.get("state") if _is_vschar(values.get("state", "")) else None

    def fail(description: str, error: str = "invalid_request") -> AuthorizeError:
        return AuthorizeError(error, description, redirect_uri, state)

    if values.get("response_type") != "code":
        raise fail("only response_type=code is supported", "unsupported_response_type")
    scope = tuple(values.get("scope", "").split())
    if "openid" not in scope:  # OpenID Connect Core §3.1.2.1
        raise fail("scope must include openid", "invalid_scope")
    if values.get("code_challenge_method") != "S256":  # RFC 7636 §4.3; plain is refused
        raise fail("PKCE is required with code_challenge_method=S256 (RFC 7636)")
    challenge = values.get("code_challenge", "")
    if len(challenge) != 43 or not _is_base64url(challenge):  # RFC 7636 §4.2: 32 bytes
        raise fail("code_challenge must be BASE64URL(SHA-256(code_verifier)), 43 characters")
    return AuthorizationRequest(
        client_id=client_id,
        redirect_uri=redirect_uri,
        scope=scope,
        state=_required(values, "state", fail),
        nonce=_required(values, "nonce", fail),
        code_challenge=challenge,
    )


_BASE64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_UNRESERVED = _BASE64URL | frozenset(".~")


def _is_base64url(text: str) -> bool:
    return bool(text) and set(text) <= _BASE64URL


def s256(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL-ENCODE(SHA256(ASCII(code_verifier))), unpadded."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def check_pkce(verifier: str, challenge: str) -> None:
    """RFC 7636 §4.1 verifier syntax, §4.6 comparison (constant time)."""
    if not 43 <= len(verifier) <= 128 or not set(verifier) <= _UNRESERVED:
        raise OAuthError("invalid_grant", "code_verifier must be 43-128 unreserved characters")
    if not hmac.compare_digest(s256(verifier), challenge):
        raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge")


def _with_query(uri: str, params: Mapping[str, str]) -> str:
    """RFC 6749 §3.1.2: keep the redirect URI's own query and add ours."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def error_redirect(error: AuthorizeError, issuer: str) -> str:
    """RFC 6749 §4.1.2.1 error response; ``iss`` per RFC 9207 §2."""
    if error.redirect_uri is None:
        raise ValueError("this error must not be redirected")
    params = {"error": error.error, "error_description": error.description}
    if error.state is not None:
        params["state"] = error.state
    params["iss"] = issuer
    return _with_query(error.redirect_uri, params)


def code_redirect(request: AuthorizationRequest, code: str, issuer: str) -> str:
    """RFC 6749 §4.1.2 authorization response, with ``iss`` (RFC 9207 §2)."""
    return _with_query(request.redirect_uri, {"code": code, "state": request.state, "iss": issuer})


@dataclass(frozen=True, slots=True)
class DeviceGrant:
    """Who authenticated: the admitted device, as the console describes it."""

    device_uid: str
    group_id: str
    platform: str
    owner: str
    compliance: str
    cert_thumbprint: str
    auth_time: int  # when the device certificate was checked (seconds since the epoch)


class TxState(Enum):
    AWAITING_CERT = "awaiting-cert"
    CODE_ISSUED = "code-issued"
    DENIED = "denied"
    REDEEMED = "redeemed"


_TRANSITIONS: dict[TxState, frozenset[TxState]] = {
    TxState.AWAITING_CERT: frozenset({TxState.CODE_ISSUED, TxState.DENIED}),
    # A code is good for exactly one redemption attempt, successful or not.
    TxState.CODE_ISSUED: frozenset({TxState.REDEEMED}),
    TxState.DENIED: frozenset(),
    TxState.REDEEMED: frozenset(),
}


@dataclass
class Transaction:
    request: AuthorizationRequest
    created_at: float
    state: TxState = TxState.AWAITING_CERT
    grant: DeviceGrant | None = None
    code_issued_at: float | None = None

    def move(self, new: TxState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise OAuthError(
                "invalid_request", f"authorization is {self.state.value}, cannot become {new.value}"
            )
        self.state = new


def secret_hash(secret: str) -> str:
    """Stores are keyed by a hash, so a memory dump does not reveal usable handles."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenRequest:
    code: str
    redirect_uri: str
    client_id: str
    code_verifier: str


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """What a confidential client sent in its ``Authorization: Basic`` header."""

    client_id: str
    secret: str = field(repr=False)


def basic_credentials(authorization: str | None) -> ClientCredentials | None:
    """RFC 6749 §2.3.1: ``Basic base64(form-urlencoded id ":" form-urlencoded secret)``
    (RFC 7617 §2); None without the header. A malformed one is ``invalid_client``."""
    if authorization is None:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic" or len(encoded) > 4 * MAX_PARAM_CHARS:
        raise _invalid_client("only client_secret_basic authentication is supported")
    try:
        pair = base64.b64decode(encoded.strip(), validate=True).decode()
    except ValueError as exc:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise _invalid_client("malformed Basic credentials") from exc
    client_id, sep, secret = pair.partition(":")
    if not sep or not client_id or not secret:
        raise _invalid_client("malformed Basic credentials")
    return ClientCredentials(unquote_plus(client_id), unquote_plus(secret))


def authenticate_client(
    client_id: str, credentials: ClientCredentials | None, clients: Mapping[str, ClientRegistration]
) -> None:
    """A registered client; a confidential one proves its secret (compared as SHA-256, in
    constant time), a public one sends none (RFC 6749 §2.1, §3.2.1)."""
    client = clients.get(client_id)
    if client is None:
        raise _invalid_client("unknown client_id")
    if client.secret_sha256 is None:
        if credentials is not None:
            raise _invalid_client("a public client sends no client secret")
        return
    if credentials is None:
        raise _invalid_client("this client must authenticate (client_secret_basic)")
    if not hmac.compare_digest(secret_hash(credentials.secret), client.secret_sha256):
        raise _invalid_client("wrong client secret")


def _invalid_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, 401)  # RFC 6749 §5.2


def parse_token_request(
    params: Sequence[tuple[str, str]], credentials: ClientCredentials | None = None
) -> TokenRequest:
    """RFC 6749 §4.1.3; ``client_id`` from the body, or from ``credentials`` (then the
    body's, if any, must be the same)."""
    values: dict[str, str] = {}
    for name, value in params:
        if name in values:  # RFC 6749 §3.2
            raise OAuthError("invalid_request", f"parameter {name!r} given more than once")
        values[name] = value
    if values.get("grant_type") != "authorization_code":
        raise OAuthError("unsupported_grant_type", "only grant_type=authorization_code")
    if credentials is not None:
        if values.setdefault("client_id", credentials.client_id) != credentials.client_id:
            raise OAuthError("invalid_request", "client_id differs from the authenticated one")
    for name in ("code", "redirect_uri", "client_id", "code_verifier"):
        if not values.get(name):
            raise OAuthError("invalid_request", f"{name} is required")
        if len(values[name]) > 2048:
            raise OAuthError("invalid_request", f"{name} is too long")
    return TokenRequest(
        values["code"], values["redirect_uri"], values["client_id"], values["code_verifier"]
    )


def check_bindings(token: TokenRequest, request: AuthorizationRequest) -> None:
    """A spent code yields a token only to the client, redirect URI and PKCE verifier of
    its authorization request (RFC 6749 §4.1.3, RFC 7636 §4.6)."""
    if not hmac.compare_digest(token.client_id, request.client_id):
        raise OAuthError("invalid_grant", "code was issued to another client")
    if not hmac.compare_digest(token.redirect_uri, request.redirect_uri):
        raise OAuthError("invalid_grant", "redirect_uri differs from the authorization request")
    check_pkce(token.code_verifier, request.code_challenge)


class SignInStore(Protocol):
    """Where sign-in transactions live: this node's memory (:class:`MemorySignIns`) or the
    console's database, shared by every Access node (``certgate.access.signins``). Every
    refusal raises :class:`OAuthError`; a code is spent by its first redemption attempt."""

    async def begin(self, request: AuthorizationRequest) -> str:
        """Open a transaction; returns its handle."""

    async def pending(self, handle: str) -> AuthorizationRequest:
        """The request of the transaction waiting for its certificate step."""

    async def issue_code(self, handle: str, grant: DeviceGrant) -> str:
        """The device was admitted: returns the one-time code."""

    async def deny(self, handle: str) -> None:
        """The device was refused: the transaction ends without a code."""

    async def redeem(self, token: TokenRequest) -> Transaction:
        """Spend the code, then check its bindings; a REDEEMED transaction with its grant."""


@dataclass
class MemorySignIns:
    """Transactions in this process only: for a single Access node (no load balancer, or
    one that pins clients to a node)."""

    store: TransactionStore

    async def begin(self, request: AuthorizationRequest) -> str:
        return self.store.begin(request)

    async def pending(self, handle: str) -> AuthorizationRequest:
        return self.store.pending(handle).request

    async def issue_code(self, handle: str, grant: DeviceGrant) -> str:
        return self.store.issue_code(handle, grant)[1]

    async def deny(self, handle: str) -> None:
        self.store.deny(handle)

    async def redeem(self, token: TokenRequest) -> Transaction:
        return self.store.redeem(token)


@dataclass
class TransactionStore:
    """Open transactions, keyed by the hash of their handle and (later) of their code."""

    request_ttl_s: float
    code_ttl_s: float
    max_entries: int
    clock: Clock = time.monotonic
    _by_handle: dict[str, Transaction] = field(default_factory=dict)
    _by_code: dict[str, Transaction] = field(default_factory=dict)

    def begin(self, request: AuthorizationRequest) -> str:
        self._purge()
        if len(self._by_handle) >= self.max_entries:
            raise OAuthError("temporarily_unavailable", "too many pending sign-ins", 503)
        handle = secrets.token_urlsafe(HANDLE_BYTES)
        self._by_handle[secret_hash(handle)] = Transaction(request, self.clock())
        return handle

    def pending(self, handle: str) -> Transaction:
        """The transaction waiting for its certificate step; raises when there is none."""
        self._purge()
        tx = self._by_handle.get(secret_hash(handle))
        if tx is None:
            raise OAuthError("invalid_request", "unknown or expired sign-in; start again")
        if tx.state is not TxState.AWAITING_CERT:
            raise OAuthError("invalid_request", f"this sign-in is already {tx.state.value}")
        return tx

    def issue_code(self, handle: str, grant: DeviceGrant) -> tuple[Transaction, str]:
        tx = self.pending(handle)
        tx.move(TxState.CODE_ISSUED)
        tx.grant, tx.code_issued_at = grant, self.clock()
        code = secrets.token_urlsafe(HANDLE_BYTES)
        self._by_code[secret_hash(code)] = tx
        return tx, code

    def deny(self, handle: str) -> Transaction:
        tx = self.pending(handle)
        tx.move(TxState.DENIED)
        return tx

    def redeem(self, token: TokenRequest) -> Transaction:
        """Spend the code, then check its bindings (RFC 6749 §4.1.3, RFC 7636 §4.6)."""
        self._purge()
        tx = self._by_code.get(secret_hash(token.code))
        if tx is None:
            raise OAuthError("invalid_grant", "unknown or expired authorization code")
        if tx.state is TxState.REDEEMED:  # RFC 6749 §4.1.2: a code MUST NOT be used twice
            raise OAuthError("invalid_grant", "authorization code already used")
        tx.move(TxState.REDEEMED)
        check_bindings(token, tx.request)
        return tx

    def _purge(self) -> None:
        now = self.clock()
        for handle, tx in list(self._by_handle.items()):
            if now - tx.created_at > self.request_ttl_s + self.code_ttl_s:
                del self._by_handle[handle]
            elif tx.state is TxState.AWAITING_CERT and now - tx.created_at > self.request_ttl_s:
                del self._by_handle[handle]
        for code, tx in list(self._by_code.items()):
            if tx.code_issued_at is None or now - tx.code_issued_at > self.code_ttl_s:
                del self._by_code[code]

    def __len__(self) -> int:
        return len(self._by_handle)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def id_token_claims(issuer: str, tx: Transaction, now: int, ttl_s: int) -> dict[str, Any]:
    """OpenID Connect Core §2 ID token claims, plus the device and its owner."""
    grant = tx.grant
    if grant is None or tx.state is not TxState.REDEEMED:
        raise ValueError("ID tokens are minted only for redeemed, admitted transactions")
    return {
        "iss": issuer,
        "sub": grant.device_uid,
        "aud": tx.request.client_id,
        "azp": tx.request.client_id,
        "exp": now + ttl_s,
        "iat": now,
        "auth_time": grant.auth_time,
        "nonce": tx.request.nonce,
        "amr": ["mtls"],
        "group": grant.group_id,
        "platform": grant.platform,
        "compliance": grant.compliance,
        "cert_thumbprint": grant.cert_thumbprint,
        # RFC 8705 §3.1: the certificate the device authenticated with, as x5t#S256.
        "cnf": {"x5t#S256": _b64url(bytes.fromhex(grant.cert_thumbprint))},
        "owner": grant.owner,
        "preferred_username": grant.owner,
    }


class IdTokenSigner:
    """Signs ID tokens with one ES256 key and publishes it as a JWK Set (RFC 7517 §5)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        if key.curve.name != "secp256r1":
            raise ValueError("ES256 needs a P-256 key (RFC 7518 §3.4)")
        self._jwk = ECKey.import_key(private_key_pem(key))
        self.kid = self._jwk.thumbprint()  # RFC 7638 thumbprint as the key id

    def jwks(self) -> dict[str, Any]:
        public = self._jwk.as_dict(private=False)
        return {"keys": [{**public, "kid": self.kid, "use": "sig", "alg": ALG}]}

    def sign(self, claims: Mapping[str, Any]) -> str:
        header = {"alg": ALG, "typ": "JWT", "kid": self.kid}
        return jwt.encode(header, dict(claims), self._jwk, algorithms=[ALG])


def discovery_document(issuer: str) -> dict[str, Any]:
    """OpenID Connect Discovery 1.0 §3 provider metadata."""
    return {
        "issuer": issuer,
        "authorization_endpoint": issuer + AUTHORIZE_PATH,
        "token_endpoint": issuer + TOKEN_PATH,
        "jwks_uri": issuer + JWKS_PATH,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [ALG],
        "scopes_supported": ["openid"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic"],
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": True,
        "claims_supported": [
            "iss", "sub", "aud", "azp", "exp", "iat", "auth_time", "nonce", "amr",
            "group", "platform", "compliance", "cert_thumbprint", "cnf", "owner",
            "preferred_username",
        ],
    }  # fmt: skip
