"""The instance PKI as the console stores it: CAs, sealed keys, issued-certificate records.

``authority.Authority`` signs; this module decides which CA signs what, records every
issued certificate in the same transaction as the request that asked for it, and keeps
the revocation list. Nothing is returned to a caller before its row is committed.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from certgate.console.store.models import CACert, Certificate, Instance, SealedKey
from certgate.errors import ConfigError, Conflict, NotFound, PKIError
from certgate.pki.authority import Authority, Issuer, Names, Signer
from certgate.pki.keys import KeyAlgorithm, PrivateKey, generate_key
from certgate.pki.keystore import MasterKey
from certgate.pki.profiles import CROSS_CA, INTERMEDIATE_CA, Profile
from certgate.pki.thumbprint import thumbprint
from certgate.pki.token import Token, TokenConfig, TokenKey, open_token

ROOT = "root"
SECURE_CHANNEL_ROOT = "secure-channel-root"
DEVICE_ROOT = "device-root"
ADMIN_CA = "admin-ca"
INTERMEDIATES = (SECURE_CHANNEL_ROOT, DEVICE_ROOT, ADMIN_CA)
# A Root rotation's cross certificates (docs/CONVENTIONS.md "Root"): ``root-cross@N`` is
# the new Root's subject and key signed by the old Root, ``root-back@N`` the old Root's
# signed by the new one. Each row's key is the Root's whose subject it carries.
ROOT_CROSS, ROOT_BACK = "root-cross", "root-back"
CROSS_ROLES = (ROOT_CROSS, ROOT_BACK)
CA_NAMES = {
    ROOT: "certgate Root CA",
    SECURE_CHANNEL_ROOT: "certgate Secure Channel Root",
    DEVICE_ROOT: "certgate Device Root",
    ADMIN_CA: "certgate Admin CA",
}
# RFC 5280 §5.3.1: "unspecified" SHOULD NOT be used; removeFromCRL only in delta CRLs.
_NOT_FOR_BASE_CRL = (x509.ReasonFlags.unspecified, x509.ReasonFlags.remove_from_crl)
REVOCATION_REASONS = {r.value: r for r in x509.ReasonFlags if r not in _NOT_FOR_BASE_CRL}
# A sealed_keys row of a CA whose key is in a PKCS#11 token holds this reference instead of
# a sealed key: the database says where each CA key lives, and holds no copy of it.
TOKEN_REFERENCE = b"CGP11:"
# ca_certs.status: the CA issuing for its role, a rotation's prepared one, the superseded one
# still trusted until finish, and one finish retired (kept to sign its CRL).
CURRENT, NEXT, RETIRING, RETIRED = "current", "next", "retiring", "retired"
# The ``root-cross`` of the last finished Root rotation (the current Root's subject and key,
# signed by the Root it replaced): still served, so a party that pins the old Root alone
# (a node down for the whole rotation) verifies and climbs to the current Root
# (``pki.verify.vouched_roots``); retired when the next Root rotation finishes.
OFFERED = "offered"
_ISSUER_CACHE = 1024  # leaves whose issuing CA ``InstancePKI.issuing_ca`` remembers
REFRESH_S = 5.0  # how stale a process's view of the CA rows may be (``InstancePKI.refresh``)


def role_of(label: str) -> str:
    """The role of a CA row: ``device-root@7`` (rotation 7's Device Root) is a Device Root."""
    return label.split("@", 1)[0]


def version_label(role: str, rotation_id: int) -> str:
    return f"{role}@{rotation_id}"


def now() -> datetime:
    return datetime.now(UTC)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode()


@dataclass(frozen=True, slots=True)
class Record:
    """What a certificate row says about who the certificate belongs to."""

    kind: str
    group_id: str | None = None
    device_uid: str | None = None
    bundle_id: str | None = None
    admin_id: str | None = None


@dataclass
class InstancePKI:
    """The loaded CAs of this instance. Their keys are unsealed at load and kept in memory,
    or, with a PKCS#11 token, stay in the token, which signs (``pki/token.py``).

    ``certs`` and ``_keys`` hold the current CA of each role (what issues); ``labels`` the
    row label of each (``device-root@7`` after a Device Root rotation); ``others`` the
    rows of other statuses (next, retiring, retired) by label, with their status."""

    master: MasterKey
    certs: dict[str, x509.Certificate]
    authority: Authority = field(default_factory=Authority)
    _keys: dict[str, Signer] = field(default_factory=dict)
    _chain_pems: dict[str, tuple[str, ...]] = field(default_factory=dict)
    token: Token | None = None
    labels: dict[str, str] = field(default_factory=dict)
    others: dict[str, tuple[str, x509.Certificate, Signer]] = field(default_factory=dict)
    _statuses: tuple[tuple[str, str], ...] = ()  # (label, status) of the rows loaded
    _key_labels: dict[str, str] = field(default_factory=dict)  # row label -> its key's label
    _aboves: dict[x509.Certificate, x509.Certificate] = field(default_factory=dict)
    _checked: float = 0.0  # monotonic time of the last ``refresh`` query
    _issuers: dict[x509.Certificate, x509.Certificate] = field(default_factory=dict)
    signed: Counter[str] = field(default_factory=Counter)  # by Record kind, for /metrics
    _signed_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(
        cls, session: Session, master: MasterKey, token: TokenConfig | None = None
    ) -> InstancePKI:
        pki = cls(master, {}, token=open_token(token) if token else None)
        pki.reload(session)
        return pki

    def reload(self, session: Session) -> None:
        """Read the CA rows again (a Device Root rotation step, maybe by another process).
        Every key is unsealed now: a wrong master key must fail at startup, not later."""
        rows = session.execute(select(CACert).order_by(CACert.label)).scalars().all()
        current = [r for r in rows if r.status == CURRENT]
        if sorted(role_of(r.label) for r in current) != sorted({ROOT, *INTERMEDIATES}):
            raise PKIError("instance PKI is not initialised; run `certgate console init`")
        loaded = {r.label: x509.load_pem_x509_certificate(r.cert_pem.encode()) for r in rows}
        keys = {r.label: self._ca_key(session, r, loaded[r.label]) for r in rows}
        # Each attribute is replaced whole: a thread issuing meanwhile sees old or new.
        self.others = {
            r.label: (r.status, loaded[r.label], keys[r.label]) for r in rows if r.status != CURRENT
        }
        self._keys = {role_of(r.label): keys[r.label] for r in current}
        self.certs = {role_of(r.label): loaded[r.label] for r in current}
        self.labels = {role_of(r.label): r.label for r in current}
        self._chain_pems = {}
        self._issuers = {}  # a Root rotation step changes which CA certificate serves a leaf
        self._aboves = {}
        self._key_labels = {r.label: r.key_label for r in rows}
        self._statuses = tuple((r.label, r.status) for r in rows)
        self._checked = time.monotonic()

    @property
    def rows(self) -> tuple[tuple[str, str], ...]:
        """The (label, status) of the CA rows loaded: another value after every rotation
        step (``console.presenter`` compares it with what the listener presents)."""
        return self._statuses

    def refresh(self, session: Session, max_age_s: float = REFRESH_S) -> None:
        """Reload if a rotation step (maybe by another process, the CLI) changed the CA
        rows. Checked at most every ``max_age_s``: one small query, the keys are unsealed
        again only on a change. Until then the old current CA issues, which every node
        still trusts: a step never retires what it makes current."""
        if time.monotonic() - self._checked < max_age_s:
            return
        query = select(CACert.label, CACert.status).order_by(CACert.label)
        statuses = tuple((label, status) for label, status in session.execute(query))
        self._checked = time.monotonic()
        if statuses != self._statuses:
            self.reload(session)

    def label(self, role: str) -> str:
        """The row label of the current CA of ``role``."""
        return self.labels.get(role, role)

    def trusted_with_labels(self, role: str) -> list[tuple[str, str, x509.Certificate]]:
        """The CAs of ``role`` to trust now, each with its row label and status: the current
        one first, then a rotation's next or retiring one (both are trusted during the
        overlap). Access fetches a CRL per label (``/pki/crl/<label>.crl``)."""
        extra = [
            (label, status, cert)
            for label, (status, cert, _) in sorted(self.others.items())
            if role_of(label) == role and status in (NEXT, RETIRING)
        ]
        return [(self.label(role), CURRENT, self.certs[role]), *extra]

    def trusted(self, role: str) -> list[x509.Certificate]:
        """``trusted_with_labels`` without the labels."""
        return [cert for _, _, cert in self.trusted_with_labels(role)]

    def trusted_device_roots(self) -> list[tuple[str, str, x509.Certificate]]:
        """The Device Roots to trust now, with their labels and statuses."""
        return self.trusted_with_labels(DEVICE_ROOT)

    def device_roots(self) -> list[x509.Certificate]:
        """The Device Roots devices may present certificates of (``trusted``)."""
        return self.trusted(DEVICE_ROOT)

    def secure_channel_roots(self) -> list[x509.Certificate]:
        """The Secure Channel Roots the console and nodes accept identities of (``trusted``)."""
        return self.trusted(SECURE_CHANNEL_ROOT)

    def every_ca(self) -> list[x509.Certificate]:
        """Every CA row's certificate, whatever its status (retired ones too)."""
        return [*self.certs.values(), *(cert for _, cert, _ in self.others.values())]

    def roots(self) -> list[x509.Certificate]:
        """The Roots to trust now: the current one first, then a Root rotation's other one
        (``trusted``): what nodes, devices, Access and admins anchor on."""
        return self.trusted(ROOT)

    def root_crosses(self) -> list[x509.Certificate]:
        """A running Root rotation's cross certificates, each vouching, with a Root's key,
        for the other Root; when none runs, the ``OFFERED`` one of the last finished
        rotation (the old Root vouching for the current one: never one vouching for a
        retired Root). One hop only: during the next rotation the chains carry that
        rotation's crosses."""
        crosses = [
            (status, cert)
            for label, (status, cert, _) in sorted(self.others.items())
            if role_of(label) in CROSS_ROLES
        ]
        running = [cert for status, cert in crosses if status == NEXT]
        return running or [cert for status, cert in crosses if status == OFFERED]

    def family(self, label: str) -> list[str]:
        """The CA rows holding the same key as row ``label``: one CA re-issued under a new
        Root keeps its key and subject, so what any of them issued is that CA's (CRLs,
        rotation counts)."""
        key = self._key_labels.get(label)
        return sorted(other for other, k in self._key_labels.items() if k == key) or [label]

    def _above(self, ca_cert: x509.Certificate) -> x509.Certificate:
        """The certificate served after ``ca_cert``: during a Root rotation the cross
        certificate of its Root (so a party trusting either Root verifies), after one the
        offered ``root-cross`` (a party pinning the Root it replaced still verifies), else
        its Root.
        Found once per CA until the rows change (every signed feed batch asks)."""
        found = self._aboves.get(ca_cert)
        if found is None:
            candidates = (*self.root_crosses(), *self.roots())
            found = next((c for c in candidates if _issued(ca_cert, c)), self.certs[ROOT])
            self._aboves = {**self._aboves, ca_cert: found}  # replaced whole: threads read it
        return found

    def issuing_ca(self, cert: x509.Certificate) -> x509.Certificate:
        """The CA (of any status) that signed ``cert``: a leaf issued before a rotation's
        switch is served with the CA that signed it, not the one that issues now. Found
        once per leaf (every signed feed batch asks for its signer's)."""
        found = self._issuers.get(cert)
        if found is None:
            found = self._find_issuer(cert)
            if len(self._issuers) >= _ISSUER_CACHE:
                self._issuers = {}
            self._issuers[cert] = found
        return found

    def _find_issuer(self, cert: x509.Certificate) -> x509.Certificate:
        for candidate in self.every_ca():
            if _issued(cert, candidate):
                return candidate
        raise PKIError(f"no CA of this instance issued {cert.subject.rfc4514_string()}")

    def chain_of(self, cert: x509.Certificate) -> list[x509.Certificate]:
        """The CA chain served after leaf ``cert``: [the CA that signed it, its Root or,
        during a Root rotation, that Root's cross certificate (``_above``)]."""
        issuer = self.issuing_ca(cert)
        return [issuer, self._above(issuer)]

    def issuer_of(self, label: str) -> Issuer:
        """The CA of row ``label``, current or not (a retired one signs only its CRL). A
        label read before a concurrent reload still finds its own CA (then in ``others``);
        ``Authority`` refuses a certificate and key that do not match."""
        if label in self.others:
            _, cert, key = self.others[label]
            return Issuer(cert, key)
        return self.issuer(role_of(label))

    def _ca_key(self, session: Session, row: CACert, cert: x509.Certificate) -> Signer:
        stored = session.get(SealedKey, row.key_label)
        in_token = stored is not None and stored.sealed.startswith(TOKEN_REFERENCE)
        if self.token is not None:
            # The token is the only place looked in: there is no other copy to fall back to.
            if not in_token:
                raise ConfigError(f"CA key {row.key_label!r} was not created in a PKCS#11 token")
            return self.token.key(row.key_label, cert.public_key())
        if in_token:
            raise ConfigError(
                f"CA key {row.key_label!r} is in a PKCS#11 token: console.json needs the "
                "pkcs11 settings it was initialised with"
            )
        return self.unseal(session, row.key_label)

    def unseal(self, session: Session, label: str) -> PrivateKey:
        row = session.get(SealedKey, label)
        if row is None:
            raise NotFound(f"sealed key {label!r} missing")
        return self.master.unseal(row.sealed, label)

    def issuer(self, label: str) -> Issuer:
        return Issuer(self.certs[label], self._keys[label])

    def chain(self, label: str) -> list[x509.Certificate]:
        """The CA chain above a leaf issued by ``label``: [intermediate, root] (its cross
        certificate during a Root rotation, as ``chain_of``)."""
        return [self.certs[label], self._above(self.certs[label])]

    def chain_pem(self, label: str) -> list[str]:
        """``chain(label)`` as PEM, encoded once: every profile delivery returns two chains."""
        if label not in self._chain_pems:
            self._chain_pems[label] = tuple(pem(c) for c in self.chain(label))
        return list(self._chain_pems[label])

    def _count_signed(self, kind: str) -> None:
        with self._signed_lock:  # the writer thread and request threads sign concurrently
            self.signed[kind] += 1

    def issue(
        self,
        session: Session,
        ca: str,
        profile: Profile,
        names: Names,
        public_key: object,
        record: Record,
    ) -> tuple[x509.Certificate, Certificate]:
        """Sign with CA ``ca`` and add the certificate row to ``session``."""
        self.refresh(session)
        label = self.label(ca)  # the row recorded is the one that signs, whatever reloads
        cert = self.authority.issue(self.issuer_of(label), profile, names, public_key)
        self._count_signed(record.kind)
        row = record_certificate(session, cert, label, record)
        return cert, row

    def issue_from_csr(
        self,
        session: Session,
        ca: str,
        profile: Profile,
        names: Names,
        csr_pem: bytes,
        record: Record,
    ) -> tuple[x509.Certificate, Certificate]:
        """Sign the CSR's key and write its row at once (``insert_certificate``)."""
        self.refresh(session)
        label = self.label(ca)  # as in ``issue``
        cert = self.authority.issue_from_csr(self.issuer_of(label), profile, names, csr_pem)
        self._count_signed(record.kind)
        return cert, insert_certificate(session, cert, label, record)


def _issued(cert: x509.Certificate, candidate: x509.Certificate) -> bool:
    """``candidate``'s subject and key signed ``cert`` (two Roots share a subject)."""
    if candidate.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(candidate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def certificate_values(cert: x509.Certificate, ca: str, record: Record) -> dict[str, Any]:
    """The ``certificates`` row of ``cert``, signed by CA ``ca``, as column values."""
    return {
        "serial": format(cert.serial_number, "x"),
        "thumbprint": thumbprint(cert),
        "kind": record.kind,
        "issuer_label": ca,
        "group_id": record.group_id,
        "device_uid": record.device_uid,
        "bundle_id": record.bundle_id,
        "admin_id": record.admin_id,
        "subject": cert.subject.rfc4514_string(),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "issued_at": now(),
        "cert_pem": pem(cert),
        "revoked_at": None,
        "revocation_reason": None,
    }


def record_certificate(
    session: Session, cert: x509.Certificate, ca: str, record: Record
) -> Certificate:
    row = Certificate(**certificate_values(cert, ca, record))
    session.add(row)
    return row


_INSERT_CERTIFICATE = insert(Certificate)


def insert_certificate(
    session: Session, cert: x509.Certificate, ca: str, record: Record
) -> Certificate:
    """Write ``cert``'s row now with one Core INSERT, without the unit of work (the hot
    path of issuance). The row returned is a detached value: the session does not hold it,
    later statements of the transaction see it, and it commits with the transaction."""
    values = certificate_values(cert, ca, record)
    session.connection().execute(_INSERT_CERTIFICATE, values)
    return Certificate(**values)


def seal_key(session: Session, master: MasterKey, label: str, key: PrivateKey) -> None:
    """Store ``key`` sealed under ``label``, replacing any previous key of that label."""
    row = session.get(SealedKey, label)
    if row is None:
        session.add(SealedKey(label=label, sealed=master.seal(key, label), created_at=now()))
        session.flush()  # rows referencing this key may follow; no ORM relationship orders them
    else:
        row.sealed, row.created_at = master.seal(key, label), now()


def _reference_key(session: Session, label: str) -> None:
    session.add(SealedKey(label=label, sealed=TOKEN_REFERENCE + label.encode(), created_at=now()))
    session.flush()  # the CA row referencing it follows


def init_instance(
    session: Session,
    master: MasterKey,
    algorithm: KeyAlgorithm,
    public_url: str,
    token: TokenConfig | None = None,
) -> InstancePKI:
    """Create the instance PKI once: a root and the three intermediates below it, their
    keys sealed under the master key or generated inside the PKCS#11 ``token``."""
    authority = Authority()
    vault = open_token(token) if token else None

    def new_key(label: str) -> Signer:
        if vault is None:
            return generate_key(algorithm)
        return vault.generate(f"ca:{label}", algorithm)

    root_key = new_key(ROOT)
    root = authority.create_root(root_key, Names(CA_NAMES[ROOT]))
    pki = InstancePKI(master, {ROOT: root}, authority, {ROOT: root_key}, token=vault)
    for label in INTERMEDIATES:
        key = new_key(label)
        pki.certs[label] = authority.issue(
            pki.issuer(ROOT), INTERMEDIATE_CA, Names(CA_NAMES[label]), key.public_key()
        )
        pki._keys[label] = key
    adopt_instance(session, pki, algorithm.value, public_url)
    return pki


def adopt_instance(session: Session, pki: InstancePKI, algorithm: str, public_url: str) -> None:
    """Store ``pki``'s CAs (new or restored from backup) as this instance's PKI: the
    current one of each role under its row label (``pki.labels``), and a restored
    instance's other rows (next, retiring, retired) with their labels and statuses."""
    if session.get(Instance, 1) is not None:
        raise Conflict("instance already initialised")
    rows = [(pki.label(role), CURRENT, cert, pki._keys[role]) for role, cert in pki.certs.items()]
    others = sorted(pki.others.items())
    rows += [(label, status, cert, key) for label, (status, cert, key) in others]
    key_labels: dict[bytes, str] = {}  # rows of one key (a Root rotation) share its key row
    for label, status, cert, key in rows:
        spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        key_label = key_labels.get(spki)
        if key_label is None:
            key_label = key_labels[spki] = f"ca:{label}"
            if isinstance(key, TokenKey):  # a token's key never leaves the token
                _reference_key(session, key_label)
            else:
                seal_key(session, pki.master, key_label, key)
        session.add(CACert(label=label, cert_pem=pem(cert), key_label=key_label, status=status))
        row = record_certificate(session, cert, ROOT, Record(kind=f"ca:{role_of(label)}"))
        if status == RETIRED:  # a rotation's finish revoked it
            row.revoked_at, row.revocation_reason = now(), "superseded"
    session.add(
        Instance(
            id=1,
            created_at=now(),
            key_algorithm=algorithm,
            public_url=public_url,
            crl_number=0,
            audit_head="0" * 64,
            audit_count=0,
        )
    )


def ca_keys(pki: InstancePKI) -> dict[str, PrivateKey]:
    """The CA keys, for an encrypted backup only. Keys in a token cannot be exported."""
    keys = {label: key for label, key in pki._keys.items() if not isinstance(key, TokenKey)}
    if pki.token is not None or len(keys) != len(pki._keys):
        where = pki.token.config.describe() if pki.token else "a PKCS#11 token"
        raise PKIError(f"the CA keys live in {where} and cannot be exported; back up the token")
    return keys


def other_ca_keys(pki: InstancePKI) -> dict[str, PrivateKey]:
    """The keys of the CA rows that do not issue now (a rotation's next, retiring and
    retired ones), by row label, for an encrypted backup only (as ``ca_keys``)."""
    keys = {label: key for label, (_, _, key) in pki.others.items()}
    exportable = {label: key for label, key in keys.items() if not isinstance(key, TokenKey)}
    if pki.token is not None or len(exportable) != len(keys):
        where = pki.token.config.describe() if pki.token else "a PKCS#11 token"
        raise PKIError(f"the CA keys live in {where} and cannot be exported; back up the token")
    return exportable


def revoke(session: Session, serial: str, reason: str) -> Certificate:
    """Record a revocation (serial, reason, time). Idempotent for an already revoked cert."""
    if reason not in REVOCATION_REASONS:
        raise PKIError(f"unknown revocation reason {reason!r}; one of {sorted(REVOCATION_REASONS)}")
    row = session.get(Certificate, serial)
    if row is None:
        raise NotFound(f"certificate {serial} not found")
    if row.revoked_at is None:
        row.revoked_at, row.revocation_reason = now(), reason
    return row


def device_root_crl(
    session: Session, pki: InstancePKI, validity: timedelta, label: str | None = None
) -> bytes:
    """A fresh DER CRL of the Device Root of row ``label`` (the current one by default),
    numbered monotonically across the instance (RFC 5280 §5.2.3)."""
    label = label or pki.label(DEVICE_ROOT)
    instance = session.execute(select(Instance).with_for_update()).scalar_one()
    instance.crl_number += 1
    rows = session.execute(
        select(Certificate).where(
            Certificate.issuer_label.in_(pki.family(label)), Certificate.revoked_at.is_not(None)
        )
    ).scalars()
    revoked = [
        (int(r.serial, 16), r.revoked_at or now(), REVOCATION_REASONS[r.revocation_reason or ""])
        for r in rows
    ]
    crl = pki.authority.sign_crl(
        pki.issuer_of(label), revoked, instance.crl_number, now() + validity
    )
    return crl.public_bytes(Encoding.DER)


def revocation_marker(
    session: Session, label: str, family: list[str] | None = None
) -> tuple[int, datetime | None]:
    """(count, latest time) of the revocations of the Device Root of row ``label`` (and
    of the rows holding its key, ``family``): it changes whenever its CRL must."""
    count, latest = session.execute(
        select(func.count(), func.max(Certificate.revoked_at)).where(
            Certificate.issuer_label.in_(family or [label]), Certificate.revoked_at.is_not(None)
        )
    ).one()
    return int(count), latest


@dataclass(frozen=True, slots=True)
class CachedCRL:
    der: bytes
    marker: tuple[int, datetime | None]
    built: float = field(default_factory=time.monotonic)

    def age(self) -> timedelta:
        return timedelta(seconds=time.monotonic() - self.built)


def describe(pki: InstancePKI) -> str:
    return json.dumps({label: thumbprint(c) for label, c in sorted(pki.certs.items())}, indent=2)


def new_ca_version(session: Session, pki: InstancePKI, role: str, rotation_id: int) -> CACert:
    """A new CA of ``role`` under the Root (a rotation's next one, status ``next``): its key
    generated in the PKCS#11 token when the instance uses one, else sealed. ``pki`` is
    reloaded from the rows, so the next one is trusted at once."""
    label = version_label(role, rotation_id)
    instance = session.get(Instance, 1)
    assert instance is not None  # an initialised console
    algorithm = KeyAlgorithm(instance.key_algorithm)
    key: Signer
    if pki.token is not None:
        key = pki.token.generate(f"ca:{label}", algorithm)
        _reference_key(session, f"ca:{label}")
    else:
        key = generate_key(algorithm)
        seal_key(session, pki.master, f"ca:{label}", key)
    cert = pki.authority.issue(
        pki.issuer(ROOT), INTERMEDIATE_CA, Names(CA_NAMES[role]), key.public_key()
    )
    record_certificate(session, cert, pki.label(ROOT), Record(kind=f"ca:{role}"))
    row = CACert(label=label, cert_pem=pem(cert), key_label=f"ca:{label}", status=NEXT)
    session.add(row)
    session.flush()
    pki.reload(session)
    return row


def set_ca_status(session: Session, pki: InstancePKI, changes: dict[str, str]) -> None:
    """Give CA rows (by label) new statuses, then reload ``pki`` from the rows."""
    for label, status in changes.items():
        row = session.get(CACert, label)
        assert row is not None  # labels come from the loaded PKI
        row.status = status
    session.flush()
    pki.reload(session)


def new_root_version(session: Session, pki: InstancePKI, rotation_id: int) -> x509.Certificate:
    """A Root rotation's prepare (status ``next``): a new Root (``root@N``, its key in the
    PKCS#11 token when the instance uses one), cross certificates both ways
    (``root-cross@N``, ``root-back@N``), and each intermediate issued again under the new
    Root with the same subject and key (``<role>@N``, the same key row), so every leaf
    verifies under either Root. ``pki`` is reloaded; returns the new Root."""
    instance = session.get(Instance, 1)
    assert instance is not None  # an initialised console
    label = version_label(ROOT, rotation_id)
    key: Signer
    if pki.token is not None:
        key = pki.token.generate(f"ca:{label}", KeyAlgorithm(instance.key_algorithm))
        _reference_key(session, f"ca:{label}")
    else:
        key = generate_key(KeyAlgorithm(instance.key_algorithm))
        seal_key(session, pki.master, f"ca:{label}", key)
    old, old_label = pki.issuer(ROOT), pki.label(ROOT)
    # The old Root's subject: the cross certificates are then self-issued (RFC 5280 §6.1,
    # as RFC 4210's OldWithNew and NewWithOld), so they do not count against the Roots'
    # pathLen 1 (root, cross, intermediate, leaf); verifiers tell the Roots apart by key
    # (authority key identifier).
    new_cert = pki.authority.create_root(key, _names_of(old.cert))
    new = Issuer(new_cert, key)
    rows = [
        (label, new_cert, f"ca:{label}", label),
        (version_label(ROOT_CROSS, rotation_id), None, f"ca:{label}", old_label),
        (version_label(ROOT_BACK, rotation_id), None, pki._key_labels[old_label], label),
    ]
    certs = {
        rows[1][0]: pki.authority.issue(old, CROSS_CA, _names_of(new_cert), key.public_key()),
        rows[2][0]: pki.authority.issue(new, CROSS_CA, _names_of(old.cert), old.cert.public_key()),
    }
    for role in INTERMEDIATES:
        current = pki.certs[role]
        reissued = pki.authority.issue(
            new, INTERMEDIATE_CA, _names_of(current), current.public_key()
        )
        row_label = version_label(role, rotation_id)
        certs[row_label] = reissued
        rows.append((row_label, None, pki._key_labels[pki.label(role)], label))
    for row_label, cert, key_label, issuer_label in rows:
        cert = cert or certs[row_label]
        record_certificate(session, cert, issuer_label, Record(kind=f"ca:{role_of(row_label)}"))
        session.add(CACert(label=row_label, cert_pem=pem(cert), key_label=key_label, status=NEXT))
    session.flush()
    pki.reload(session)
    return new_cert


def _names_of(cert: x509.Certificate) -> Names:
    """The names of a CA certificate certgate made (organisation and common name)."""
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    names = Names(str(common_name))
    if names.subject() != cert.subject:
        raise PKIError(f"{cert.subject.rfc4514_string()} is not a certgate CA subject")
    return names
