"""Web console single sign-on: the OpenID Connect authorization code flow as a relying party.

OpenID Connect Core 1.0 §3.1 with PKCE (RFC 7636, S256), ``state`` (RFC 6749 §10.12) and
``nonce`` (OIDC Core §3.1.2.1). The flow's three secrets (state, nonce, PKCE verifier)
travel in a cookie sealed with a key derived from the instance master key (AES-GCM, the
cookie's purpose as associated data), so that any console of a cluster finishes a flow
another one started and nothing of it is stored in clear. The provider is found by
discovery (OpenID Connect Discovery 1.0 §4); the authorization URL and the token request
are authlib's (``OAuth2Session``); the ID token is verified with joserfc against the
provider's JWK Set.

Which admin a verified ID token signs in is one decision, :func:`admin_for`: the value of
the configured claim, mapped to an existing, enabled admin; anything else is refused.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests
from authlib.common.errors import AuthlibBaseError
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from cryptography.exceptions import InvalidTag
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry
from requests.adapters import HTTPAdapter
from sqlalchemy import select
from sqlalchemy.orm import Session

from certgate.console.config import SSOConfig
from certgate.console.services.signin import purpose_aead
from certgate.console.sso_secret import SealedSecret
from certgate.console.store.models import Admin
from certgate.errors import AuthError, ConfigError, Unavailable
from certgate.pki.keystore import MasterKey

__all__ = [
    "FLOW_TTL_S",
    "Flow",
    "Provider",
    "admin_for",
    "new_flow",
    "open_sealed",
    "seal",
    "verify_id_token",
]

FLOW_TTL_S = 600  # a sign-in at the provider must finish within ten minutes
CALLBACK_PATH = "/ui/sso/callback"
# Asymmetric algorithms only: a symmetric one would let the client secret sign tokens.
ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
HTTP_TIMEOUT_S = 10
_NONCE = 12


@dataclass(frozen=True, slots=True)
class Flow:
    """One sign-in in progress: what the callback must see again, and when it expires."""

    state: str
    nonce: str
    verifier: str
    expires: float

    def __repr__(self) -> str:
        return f"Flow(expires={self.expires})"


def new_flow(now: float) -> Flow:
    """RFC 7636 §4.1: a 43-128 character verifier; state and nonce unguessable."""
    return Flow(generate_token(32), generate_token(32), generate_token(64), now + FLOW_TTL_S)


def seal(master: MasterKey, purpose: str, payload: dict[str, Any]) -> str:
    """``payload`` as an opaque cookie value only this instance's consoles can open."""
    nonce = os.urandom(_NONCE)
    blob = purpose_aead(master, b"certgate sso v1").encrypt(
        nonce, json.dumps(payload).encode(), purpose.encode()
    )
    return (nonce + blob).hex()


def open_sealed(master: MasterKey, purpose: str, value: str | None, now: float) -> dict[str, Any]:
    """The payload ``seal`` made for ``purpose``, unexpired; AuthError otherwise."""
    if not value:
        raise AuthError("no single sign-on in progress in this browser")
    try:
        raw = bytes.fromhex(value)
        plain = purpose_aead(master, b"certgate sso v1").decrypt(
            raw[:_NONCE], raw[_NONCE:], purpose.encode()
        )
        payload: dict[str, Any] = json.loads(plain)
    except (ValueError, InvalidTag) as exc:
        raise AuthError("single sign-on cookie does not open") from exc
    if not isinstance(payload.get("expires"), (int, float)) or payload["expires"] < now:
        raise AuthError("single sign-on expired: start again")
    return payload


def flow_of(payload: dict[str, Any]) -> Flow:
    return Flow(payload["state"], payload["nonce"], payload["verifier"], payload["expires"])


def verify_id_token(
    config: SSOConfig, issuer: str, id_token: str, jwks: dict[str, Any], nonce: str
) -> dict[str, Any]:
    """OIDC Core §3.1.3.7: signature by the provider's key, ``iss``, ``aud`` (and ``azp``
    when several audiences), ``exp``, ``iat``, and this flow's ``nonce``."""
    try:
        keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
        token = jwt.decode(id_token, keys, algorithms=list(ALGORITHMS))
        JWTClaimsRegistry(
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": config.client_id},
            nonce={"essential": True, "value": nonce},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
        ).validate(token.claims)
    except (JoseError, ValueError) as exc:
        raise AuthError(f"ID token refused: {exc}") from exc
    claims = dict(token.claims)
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    if len(audiences) > 1 and claims.get("azp") != config.client_id:
        raise AuthError("ID token refused: several audiences and azp is not this console")
    return claims


def admin_for(session: Session, config: SSOConfig, claims: dict[str, Any]) -> Admin:
    """The admin the configured claim names; AuthError (with the subject) for any other."""
    value = claims.get(config.admin_claim)
    if not isinstance(value, str) or value not in config.admins:
        raise AuthError(f"subject {value!r} ({config.admin_claim}) is not a console admin")
    username = config.admins[value]
    admin = session.execute(select(Admin).where(Admin.username == username)).scalar_one_or_none()
    if admin is None or admin.disabled:
        raise AuthError(f"admin {username!r} mapped from {value!r} is missing or disabled")
    return admin


class _Trust(HTTPAdapter):
    """requests with our SSLContext (the provider's CA file, or the system store)."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._ctx
        super().init_poolmanager(*args, **kwargs)


class Provider:
    """The identity provider as the console sees it: metadata from discovery (fetched once,
    then kept), the authorization URL, and the code redeemed for verified claims."""

    def __init__(self, config: SSOConfig, redirect_uri: str, sealed: SealedSecret) -> None:
        self.config, self.redirect_uri, self._sealed = config, redirect_uri, sealed
        self._ctx = ssl.create_default_context(cafile=config.ca_file)
        self._metadata: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _session(self) -> OAuth2Session:
        try:
            secret = self.config.client_secret(self._sealed)
        except (ConfigError, OSError) as exc:  # unset, unreadable, missing, does not open
            raise Unavailable(f"single sign-on client secret: {exc}") from exc
        session = OAuth2Session(
            self.config.client_id,
            secret,
            scope=self.config.scope,
            redirect_uri=self.redirect_uri,
            code_challenge_method="S256",
            token_endpoint_auth_method="client_secret_basic" if secret else "none",
        )
        session.mount("https://", _Trust(self._ctx))
        return session

    def _get_json(self, session: OAuth2Session, url: str) -> dict[str, Any]:
        try:
            answer = session.get(url, withhold_token=True, timeout=HTTP_TIMEOUT_S)
            answer.raise_for_status()
            data: dict[str, Any] = answer.json()
        except (requests.RequestException, ValueError) as exc:
            raise Unavailable(f"identity provider unreachable or invalid: {exc}") from exc
        return data

    def metadata(self) -> dict[str, Any]:
        with self._lock:
            if self._metadata is None:
                url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
                with self._session() as session:
                    found = self._get_json(session, url)
                if found.get("issuer") != self.config.issuer:  # Discovery 1.0 §4.3
                    raise Unavailable("provider metadata names another issuer")
                self._metadata = found
            return self._metadata

    def authorization_url(self, flow: Flow) -> str:
        endpoint = self.metadata()["authorization_endpoint"]
        with self._session() as session:
            url, _ = session.create_authorization_url(
                endpoint, state=flow.state, code_verifier=flow.verifier, nonce=flow.nonce
            )
        return str(url)

    def redeem(self, code: str, flow: Flow) -> dict[str, Any]:
        """The verified ID token claims for ``code``; AuthError when the provider refuses
        it (spent, expired, another flow's) or the token does not verify."""
        meta = self.metadata()
        with self._session() as session:
            try:
                token = session.fetch_token(
                    meta["token_endpoint"],
                    code=code,
                    code_verifier=flow.verifier,
                    timeout=HTTP_TIMEOUT_S,
                )
            except requests.RequestException as exc:
                raise Unavailable(f"identity provider token endpoint: {exc}") from exc
            except AuthlibBaseError as exc:  # an OAuth error response: the code refused
                raise AuthError(f"provider refused the code: {exc}") from exc
            jwks = self._get_json(session, meta["jwks_uri"])
        if "id_token" not in token:
            raise AuthError("provider answered no ID token")
        return verify_id_token(self.config, meta["issuer"], token["id_token"], jwks, flow.nonce)


def now() -> float:
    return time.time()
