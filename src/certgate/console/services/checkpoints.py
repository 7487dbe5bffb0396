"""Signed audit checkpoints: the chain's (count, head) as the console identity vouches for it.

A checkpoint is one JSON line: the readable fields ``count``, ``head``, ``last_id``,
``keyed_from`` and ``jws``, a compact JWS (``typ`` ``certgate-audit-checkpoint+jws``)
over the same fields plus ``group_id``, ``iat`` and ``exp``, signed with the top group's
console identity key by ``tunnels.sign_for_group`` (the console's one JWS signer; no
certificate is signed here). The signed payload is the truth; readable fields that differ
from it make the line fail.

Verification takes nothing from the database on trust, since a database writer is the
adversary: the Root and Secure Channel Root certificates must match their keys sealed under
the master key, and the signer (the JWS's own ``x5c`` leaf) must carry the top group's
console identity and chain to them at signing time (``iat``). Every Secure Channel Root
the instance ever had counts, retired ones too: a checkpoint signed before a rotation
stays true after it, and its signer (a console identity since renewed) was valid then.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy.orm import Session

from certgate import jws
from certgate.console.services import audit, ca, tunnels
from certgate.errors import CertgateError, SignatureError
from certgate.pki import identity
from certgate.pki.verify import verify_client_chain

# A checkpoint states what the chain was at ``iat``; that stays true, so it must not expire.
CHECKPOINT_TTL_S = 100 * 365 * 24 * 3600
FIELDS = ("count", "head", "last_id", "keyed_from")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def sign_line(session: Session, pki: ca.InstancePKI, group_id: str, head: audit.Checkpoint) -> str:
    """The sink line of ``head``, signed by ``group_id``'s console identity."""
    fields = {"count": head.count, "head": head.head, "last_id": head.last_id}
    fields["keyed_from"] = head.keyed_from
    token = tunnels.sign_for_group(
        session, pki, group_id, fields, jws.TYP_AUDIT_CHECKPOINT, CHECKPOINT_TTL_S
    )
    return json.dumps({**fields, "jws": token}, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Anchors:
    """What a checkpoint's signer must chain to, and the identity it must carry."""

    roots: tuple[x509.Certificate, ...]  # every Root of the instance, whatever its status
    issuers: tuple[x509.Certificate, ...]  # every Secure Channel Root, whatever its status
    group_id: str


def anchors(pki: ca.InstancePKI, group_id: str) -> Anchors:
    """The instance's Roots and Secure Channel Roots (current, next, retiring, retired:
    a checkpoint signed before a rotation still verifies), each checked against its key."""
    roots, scrs = _every_ca(pki, ca.ROOT), _every_ca(pki, ca.SECURE_CHANNEL_ROOT)
    return Anchors(roots, scrs, group_id)


def _every_ca(pki: ca.InstancePKI, role: str) -> tuple[x509.Certificate, ...]:
    labels = [pki.label(role), *(lb for lb in sorted(pki.others) if ca.role_of(lb) == role)]
    issuers = {label: pki.issuer_of(label) for label in labels}
    for label, issuer in issuers.items():
        if _spki(issuer.key.public_key()) != _spki(issuer.cert.public_key()):
            raise SignatureError(f"CA certificate {label!r} does not match its sealed key")
    return tuple(issuer.cert for issuer in issuers.values())


def _spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def verify_line(line: str, trusted: Anchors) -> audit.Checkpoint:
    """The checkpoint a sink line vouches for, or ``SignatureError``/``ChainError``."""
    fields = _json_object(line)
    token = fields.get("jws")
    if not isinstance(token, str):
        raise SignatureError("no jws in the line")
    signer = _signer_of(token)
    if identity.identity_of(signer) != identity.console(trusted.group_id):
        raise SignatureError(f"signer is not the console identity of {trusted.group_id!r}")
    payload = jws.verify(token, signer, jws.TYP_AUDIT_CHECKPOINT, trusted.group_id)
    signed_at = datetime.fromtimestamp(payload["iat"], UTC)
    chain = verify_client_chain(signer, trusted.issuers, list(trusted.roots), at=signed_at)
    if len(chain) < 2 or chain[1] not in trusted.issuers:
        raise SignatureError("signer is not issued by a Secure Channel Root of the instance")
    if any(fields.get(name) != payload.get(name) for name in FIELDS):
        raise SignatureError("readable fields differ from the signed ones")
    return _checkpoint_of(payload)


def _json_object(line: str) -> dict[str, Any]:
    try:
        fields = json.loads(line)
    except ValueError as exc:
        raise SignatureError("not a JSON line") from exc
    if not isinstance(fields, dict):
        raise SignatureError("not a JSON object")
    return fields


def _signer_of(token: str) -> x509.Certificate:
    """The ``x5c`` leaf, trusted only once it chains to the anchors (``verify_line``)."""
    chain = jws.unverified_header(token).get("x5c")
    if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
        raise SignatureError("no signer certificate (x5c)")
    try:
        return x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
    except ValueError as exc:
        raise SignatureError("no readable signer certificate (x5c)") from exc


def _checkpoint_of(payload: dict[str, Any]) -> audit.Checkpoint:
    count, head, last_id = payload.get("count"), payload.get("head"), payload.get("last_id")
    keyed_from = payload.get("keyed_from")
    if not (_natural(count) and _natural(keyed_from) and isinstance(head, str)):
        raise SignatureError("signed checkpoint lacks count, head or keyed_from")
    if not (_HEX64.fullmatch(head) and (last_id is None or _natural(last_id))):
        raise SignatureError("signed checkpoint has a malformed head or last_id")
    return audit.Checkpoint(count, head, last_id, keyed_from, payload["iat"])


def _natural(value: object) -> TypeGuard[int]:
    return type(value) is int and value >= 0  # bool is an int subclass: refuse it


@dataclass(frozen=True, slots=True)
class SinkReport:
    checkpoints: Sequence[audit.Checkpoint]
    problems: Sequence[str]  # one per line that does not verify, naming the line


def read_sink(path: Path, trusted: Anchors) -> SinkReport:
    """Every checkpoint of the file at ``path`` (none if it does not exist)."""
    if not path.exists():
        return SinkReport((), ())
    good: list[audit.Checkpoint] = []
    bad: list[str] = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            good.append(verify_line(raw.decode(), trusted))
        except (CertgateError, UnicodeDecodeError) as exc:
            bad.append(f"{path.name} line {number}: {exc}")
    return SinkReport(tuple(good), tuple(bad))


@dataclass(frozen=True, slots=True)
class Verdict:
    """The audit chain recomputed and held to the signed checkpoints of the sink file."""

    chain: audit.ChainReport
    checkpoints: int
    checkpoint_problems: Sequence[str]

    @property
    def ok(self) -> bool:
        return self.chain.ok and not self.checkpoint_problems


def verify(session: Session, pki: ca.InstancePKI, sink: Path, top_group: str) -> Verdict:
    """What ``console audit verify`` reports, locally or through the API."""
    read = read_sink(sink, anchors(pki, top_group))
    chain = audit.verify_chain(session, read.checkpoints)
    return Verdict(chain, len(read.checkpoints), tuple(read.problems))
