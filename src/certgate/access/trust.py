"""The Device Roots Access and its cert proxy trust, following the console's rotations.

A Device Root rotation (``console/services/rotation.py``) makes a second Device Root
trusted at prepare, issuing at switch, and drops the first at finish. Access learns the
set from ``GET /api/v1/access/device-roots`` (``console/api/access_trust.py``) over its
mTLS channel to the console (pinned to the console's Root, admin API key and
certificate), every ``trust_refresh_s``:

* the core here is pure: :func:`parse_device_roots` accepts a set only when every Device
  Root in it is a CA certificate named as the console names it and signed by the console
  Root pinned at install, with exactly one current (first); :meth:`DeviceRootSet.issuer_of`
  says which trusted Device Root issued a device certificate (RFC 5280 path validation,
  ``pki.verify``), or refuses it;
* the shell, :class:`TrustFollower`, builds a new set aside and swaps the reference
  (readers see the old set or the new, never a mix), and writes it to ``device-roots.json``
  in the data directory (atomically) so that the cert proxy, which reads the same data
  directory, and the next start follow it. A failed fetch keeps the set in use, is logged,
  and shows in ``/healthz`` (``health``).

Revocation is checked per issuer: each Device Root's CRL is ``/pki/crl/<label>.crl``.

A Root rotation: the answer also lists the console's Roots (``roots``, the current one
first) and its cross certificates (``root_cross``). A Root Access does not pin is taken
only when a cross certificate signed by a Root it trusts certifies it
(``pki.verify.vouched_roots``, the nodes' rule); the cross certificates that vouched are
kept with the set (``proofs``, saved with it), so a restart after the rotation's finish
still reaches the new Root from the Root pinned at install. The Device Roots are then
checked against the Roots taken; the console channel is told of the Roots taken
(``on_roots``) and verifies the console's chain with them alone from then on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from certgate.errors import CertgateError, ChainError
from certgate.pki.thumbprint import thumbprint
from certgate.pki.verify import verify_client_chain, vouched_roots
from certgate.tlsconf import pem_of

__all__ = [
    "DEVICE_ROOTS_PATH",
    "DeviceRoot",
    "DeviceRootSet",
    "TrustFollower",
    "TrustUnavailable",
    "load_device_roots",
    "parse_device_roots",
]

log = logging.getLogger("certgate.access.trust")
DEVICE_ROOTS_PATH = "/api/v1/access/device-roots"
DEVICE_ROOT_CN = "certgate Device Root"  # the console names its CAs (console/services/ca.py)
LABEL_RE = re.compile(r"device-root(@[0-9]{1,18})?")
STATUSES = ("current", "next", "retiring")  # a retired Device Root is never trusted
MAX_ROOTS = 3
MAX_ANSWER_BYTES = 64 * 1024
MAX_PROOFS = 8  # cross certificates kept: two per Root rotation Access followed


class TrustUnavailable(CertgateError):
    """The console's Device Roots could not be read or were not acceptable."""


@dataclass(frozen=True, slots=True)
class DeviceRoot:
    """One trusted Device Root; ``label`` is the console's row label (``device-root@7``),
    empty for the install-time one until the console has named it."""

    label: str
    status: str
    cert: x509.Certificate

    @property
    def crl_path(self) -> str:
        """Its CRL at the console (the unnamed install-time root: the current one's)."""
        return f"/pki/crl/{self.label}.crl" if self.label else "/pki/device-root.crl"

    def to_dict(self) -> dict[str, str]:
        return {"label": self.label, "status": self.status, "thumbprint": thumbprint(self.cert)}


@dataclass(frozen=True, slots=True)
class DeviceRootSet:
    """The Device Roots device certificates may be issued by, under the console's Roots
    ``anchors`` (two during a Root rotation, the current one first); ``proofs`` are the
    cross certificates that vouched for a Root not pinned at install."""

    anchors: tuple[x509.Certificate, ...]
    roots: tuple[DeviceRoot, ...]
    proofs: tuple[x509.Certificate, ...] = ()

    @classmethod
    def initial(cls, root: x509.Certificate, device_root: x509.Certificate) -> DeviceRootSet:
        """The install-time set: the console chain's Device Root alone."""
        return cls((root,), (DeviceRoot("", "current", device_root),))

    @property
    def root(self) -> x509.Certificate:
        """The console's current Root."""
        return self.anchors[0]

    @property
    def certs(self) -> list[x509.Certificate]:
        return [r.cert for r in self.roots]

    def issuer_of(self, leaf: x509.Certificate) -> DeviceRoot:
        """The trusted Device Root that issued ``leaf``, which must be a valid client
        certificate (validity, clientAuth) up to the console Root; ChainError if none.
        Every Device Root has the same name, so the issuer is found by signature."""
        for candidate in self.roots:
            try:
                leaf.verify_directly_issued_by(candidate.cert)
            except (InvalidSignature, ValueError, TypeError):
                continue
            verify_client_chain(leaf, [candidate.cert], list(self.anchors), candidate.cert)
            return candidate
        raise ChainError("client certificate is not issued by a trusted Device Root")

    def to_json(self) -> dict[str, Any]:
        """The console's answer shape (what :func:`parse_device_roots` reads back)."""
        return {
            "device_roots": [
                {"label": r.label, "status": r.status, "certificate": pem_of([r.cert]).decode()}
                for r in self.roots
            ],
            "roots": [pem_of([c]).decode() for c in self.anchors],
            "root_cross": [pem_of([c]).decode() for c in self.proofs],
        }


def parse_device_roots(
    data: object,
    pinned: x509.Certificate | tuple[x509.Certificate, ...],
    proofs: tuple[x509.Certificate, ...] = (),
) -> DeviceRootSet:
    """The console's answer, checked against the Roots Access trusts (``pinned``, and
    the cross certificates it kept, ``proofs``): TrustUnavailable with the reason
    otherwise."""
    pinned = (pinned,) if isinstance(pinned, x509.Certificate) else pinned
    items = data.get("device_roots") if isinstance(data, dict) else None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ROOTS:
        raise TrustUnavailable(f"device_roots must be a list of 1 to {MAX_ROOTS} entries")
    assert isinstance(data, dict)  # items came from it
    anchors, crosses = _anchors(data, pinned, proofs)
    roots = tuple(_device_root(item, anchors) for item in items)
    if [r.status for r in roots].count("current") != 1 or roots[0].status != "current":
        raise TrustUnavailable("the current Device Root must be listed once, first")
    if len({thumbprint(r.cert) for r in roots}) != len(roots):
        raise TrustUnavailable("a Device Root is listed twice")
    return DeviceRootSet(anchors, roots, crosses)


def _anchors(
    data: dict[str, Any], pinned: tuple[x509.Certificate, ...], proofs: tuple[x509.Certificate, ...]
) -> tuple[tuple[x509.Certificate, ...], tuple[x509.Certificate, ...]]:
    """The Roots the answer lists (a console before Root rotations lists none: the pinned
    ones) when each is vouched for, and the cross certificates to keep."""
    listed, given = data.get("roots"), data.get("root_cross", [])
    if listed is None:
        return pinned, proofs
    if not isinstance(listed, list) or not 1 <= len(listed) <= 2 or not isinstance(given, list):
        raise TrustUnavailable("roots must be a list of 1 or 2 PEMs, root_cross a list")
    if len(given) > MAX_PROOFS:
        raise TrustUnavailable(f"root_cross lists more than {MAX_PROOFS} certificates")
    try:
        roots = tuple(x509.load_pem_x509_certificate(str(p).encode()) for p in listed)
        crosses = [x509.load_pem_x509_certificate(str(p).encode()) for p in given]
    except ValueError as exc:
        raise TrustUnavailable("roots and root_cross must be PEM certificates") from exc
    kept = tuple(dict.fromkeys([*crosses, *proofs]))[:MAX_PROOFS]
    try:
        return vouched_roots(roots, kept, pinned), kept
    except ChainError as exc:
        raise TrustUnavailable(str(exc)) from exc


def _device_root(item: object, anchors: tuple[x509.Certificate, ...]) -> DeviceRoot:
    if not isinstance(item, dict):
        raise TrustUnavailable("a Device Root entry is not a JSON object")
    label, status, pem = item.get("label"), item.get("status"), item.get("certificate")
    if not isinstance(label, str) or not LABEL_RE.fullmatch(label):
        raise TrustUnavailable(f"Device Root label {str(label)[:40]!r} is not a console label")
    if status not in STATUSES:
        raise TrustUnavailable(f"Device Root {label} has status {str(status)[:20]!r}")
    try:
        cert = x509.load_pem_x509_certificate(str(pem).encode())
    except ValueError as exc:
        raise TrustUnavailable(f"Device Root {label} is not a PEM certificate") from exc
    _check_device_root(cert, anchors, label)
    return DeviceRoot(label, str(status), cert)


def _check_device_root(
    cert: x509.Certificate, anchors: tuple[x509.Certificate, ...], label: str
) -> None:
    """A CA named as the console names its Device Roots, signed by the pinned Root."""
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not names or names[0].value != DEVICE_ROOT_CN:
        raise TrustUnavailable(f"Device Root {label} is not named {DEVICE_ROOT_CN!r}")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise TrustUnavailable(f"Device Root {label} is not a CA certificate")
    for root in anchors:
        try:
            cert.verify_directly_issued_by(root)
        except (InvalidSignature, ValueError, TypeError):
            continue
        return
    raise TrustUnavailable(f"Device Root {label} is not signed by the console Root")


def load_device_roots(path: Path, root: x509.Certificate) -> DeviceRootSet | None:
    """The set saved by a :class:`TrustFollower` (its Roots reached from the install-time
    ``root`` by the cross certificates saved with it); None when none was saved yet."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise TrustUnavailable(f"{path} is not JSON: {exc}") from exc
    return parse_device_roots(data, root)  # the saved root_cross are its proofs


def save_device_roots(path: Path, roots: DeviceRootSet) -> None:
    """Written whole then renamed: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(roots.to_json(), indent=2) + "\n")
    os.replace(tmp, path)


class TrustFollower:
    """Follows the console's Device Roots: ``current`` is swapped whole on a change."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        initial: DeviceRootSet,
        save_to: Path | None,
        interval_s: float,
        clock: Callable[[], float] = time.time,
        on_roots: Callable[[tuple[x509.Certificate, ...]], None] | None = None,
    ) -> None:
        self.current = initial
        self._on_roots = on_roots  # told the console's Roots when they change
        self._client, self._save_to, self._interval_s, self._clock = (
            client,
            save_to,
            interval_s,
            clock,
        )
        self.fetched_at: float | None = None
        self.error: str | None = None

    async def refresh(self) -> bool:
        """Fetch once; True when the set changed. A failure keeps the set in use."""
        try:
            current = self.current
            fetched = parse_device_roots(await self._fetch(), current.anchors, current.proofs)
        except TrustUnavailable as exc:
            self.error = str(exc)
            log.warning("Device Roots not refreshed (keeping %s): %s", self._labels(), exc)
            return False
        self.fetched_at, self.error = self._clock(), None
        if (fetched.roots, fetched.anchors) == (self.current.roots, self.current.anchors):
            return False
        before = self._labels()
        if self._save_to is not None:
            try:  # before the swap: the cert proxy follows this file
                save_device_roots(self._save_to, fetched)
            except OSError as exc:  # not used unsaved: Access and the proxy stay alike
                self.error = f"cannot save {self._save_to.name}: {exc}"
                log.error("Device Roots not changed (keeping %s): %s", before, self.error)
                return False
        anchors_changed = fetched.anchors != self.current.anchors
        self.current = fetched
        log.info("Device Roots changed: %s -> %s", before, self._labels())
        if anchors_changed and self._on_roots is not None:
            self._on_roots(fetched.anchors)
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # the loop must outlive a bug: the set in use stays
                self.error = "unexpected error, logged"
                log.exception("Device Roots not refreshed (keeping %s)", self._labels())
            await asyncio.sleep(self._interval_s)

    def health(self) -> dict[str, Any]:
        """For ``/healthz``: the set in use, when it was last confirmed, the last failure."""
        age = None if self.fetched_at is None else max(0, int(self._clock() - self.fetched_at))
        return {
            "device_roots": [r.to_dict() for r in self.current.roots],
            "refreshed_s_ago": age,
            "error": self.error,
        }

    def _labels(self) -> str:
        return ", ".join(r.label or "install-time" for r in self.current.roots)

    async def _fetch(self) -> object:
        try:
            response = await self._client.get(DEVICE_ROOTS_PATH)
        except httpx.HTTPError as exc:
            raise TrustUnavailable(f"console unreachable: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise TrustUnavailable(f"console answered HTTP {response.status_code}")
        if len(response.content) > MAX_ANSWER_BYTES:
            raise TrustUnavailable("console answer is too large")
        try:
            return response.json()
        except ValueError as exc:
            raise TrustUnavailable("console answer is not JSON") from exc
