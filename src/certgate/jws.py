"""Signed console messages: JWS compact, ES256, ``x5c`` chain (RFC 7515, RFC 7518 §3.4).

Verification pins the signer: the caller passes the group's console identity certificate
it trusted at setup, and a token is accepted only when signed by exactly that key, with
the expected ``typ`` and group, inside its validity window. Nothing is taken from the
token's own ``x5c`` for trust; it is informational for humans and other tools.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from joserfc import jws as _jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from certgate.errors import SignatureError
from certgate.pki.keys import PrivateKey, private_key_pem
from certgate.pki.thumbprint import thumbprint

ALG = "ES256"
MAX_TOKEN_BYTES = 64 * 1024 * 1024
CLOCK_SKEW_S = 60

TYP_TRUST = "certgate-trust+jws"
TYP_BATCH = "certgate-feed-batch+jws"
TYP_SNAPSHOT = "certgate-snapshot+jws"  # format 1: entries as feed upsert objects
TYP_SNAPSHOT_V2 = "certgate-snapshot-v2+jws"  # format 2: entries as columns
TYP_INSTALLER = "certgate-installer+jws"
TYP_AUDIT_CHECKPOINT = "certgate-audit-checkpoint+jws"  # console.services.checkpoints


class _Registry(_jws.JWSRegistry):
    # joserfc's 512-byte header cap is too small for an x5c chain; bound it explicitly.
    max_header_length = 16 * 1024
    max_payload_length = MAX_TOKEN_BYTES


_REGISTRY = _Registry(algorithms=[ALG])


def _require_p256(key: PrivateKey) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise SignatureError("ES256 needs an ECDSA P-256 signing key")
    return key


def sign(
    payload: dict[str, Any],
    key: PrivateKey,
    chain: Sequence[x509.Certificate],
    typ: str,
    ttl_s: int,
) -> str:
    """Sign ``payload`` (``iat``/``exp`` added) as a compact JWS with an ``x5c`` header."""
    now = int(time.time())
    body = {**payload, "iat": now, "exp": now + ttl_s}
    header = {
        "alg": ALG,
        "typ": typ,
        "x5c": [base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in chain],
        "x5t#S256": _x5t(chain[0]),
    }
    jwk = ECKey.import_key(private_key_pem(_require_p256(key)))
    data = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return _jws.serialize_compact(header, data, jwk, registry=_REGISTRY)


def _x5t(cert: x509.Certificate) -> str:
    digest = bytes.fromhex(thumbprint(cert))
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def verify(
    token: str | bytes,
    signer: x509.Certificate,
    typ: str,
    group_id: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Verify ``token`` against the pinned ``signer`` cert; return the payload or raise."""
    raw = token.encode() if isinstance(token, str) else token
    if len(raw) > MAX_TOKEN_BYTES:
        raise SignatureError(f"signed message of {len(raw)} bytes exceeds the limit")
    public = signer.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise SignatureError("pinned signer certificate does not hold an ECDSA key")
    try:
        jwk = ECKey.import_key(public)
        obj = _jws.deserialize_compact(raw, jwk, registry=_REGISTRY)
    except (JoseError, ValueError) as exc:
        msg = f"signature does not verify with the pinned console identity: {exc}"
        raise SignatureError(msg) from exc
    _check_header(obj.headers(), signer, typ)
    return _check_payload(obj.payload, group_id, now if now is not None else time.time())


def _check_header(header: dict[str, Any], signer: x509.Certificate, typ: str) -> None:
    if header.get("alg") != ALG:
        raise SignatureError(f"unexpected JWS alg {header.get('alg')!r}")
    if header.get("typ") != typ:
        raise SignatureError(f"unexpected message type {header.get('typ')!r}, wanted {typ!r}")
    if header.get("x5t#S256") != _x5t(signer):
        raise SignatureError("message names a different signer certificate")


def _check_payload(data: bytes, group_id: str | None, now: float) -> dict[str, Any]:
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise SignatureError("signed payload is not JSON") from exc
    if not isinstance(payload, dict):
        raise SignatureError("signed payload is not a JSON object")
    exp, iat = payload.get("exp"), payload.get("iat")
    if type(exp) is not int or type(iat) is not int:  # bool is an int subclass: refuse it
        raise SignatureError("signed payload lacks iat/exp")
    if now > exp + CLOCK_SKEW_S:
        raise SignatureError(f"signed message expired at {exp}")
    if iat > now + CLOCK_SKEW_S:
        raise SignatureError(f"signed message issued in the future ({iat})")
    if group_id is not None and payload.get("group_id") != group_id:
        raise SignatureError(f"message is for group {payload.get('group_id')!r}, not {group_id!r}")
    return payload


def unverified_header(token: str) -> dict[str, Any]:
    """The protected header, for diagnostics only: never base trust on it."""
    try:
        head = token.split(".", 1)[0]
        decoded = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except ValueError as exc:
        raise SignatureError("not a compact JWS") from exc
    if not isinstance(decoded, dict):
        raise SignatureError("JWS header is not an object")
    return decoded
