"""``certgate tunnel setup`` and ``install``: obtain the group's identity pair and trust.

Setup calls the console's ``POST /api/v1/groups/{g}/tunnel/setup`` over HTTPS, trusting
only the instance Root (given as a file, or fetched from ``/pki/root.pem`` and compared
with a pinned SHA-256 thumbprint), and authenticates with BOTH the admin's API key and
client certificate (the console refuses either alone).

Install does the same from an installer bundle: a tar.gz whose files are listed with
their SHA-256 in ``manifest.jws``, signed by the group's console identity. The bundle is
read in memory with hard limits (no path ever touches the file system), verified end to
end, and only then is its one-time ``install-token`` redeemed at
``POST /api/v1/tunnel/install``.

Either way the console's answer is verified exactly as ``load_state`` will verify it at
every start (``config.state_from_files``) before a single byte is written; then each file
is written atomically, the private key sealed under the node key
(``config.store_identity``), ``state.json`` last.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import ssl
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, pkcs12

from certgate import jws
from certgate.errors import CertgateError, ConfigError
from certgate.pki import identity
from certgate.pki.keys import PrivateKey, load_private_key_pem
from certgate.pki.thumbprint import ROOT_PIN_HINT, thumbprint
from certgate.tlsconf import client_context
from certgate.tunnel import config
from certgate.tunnel.config import TunnelState
from certgate.tunnel.persist import atomic_write

__all__ = [
    "INSTALLER_FORMAT",
    "AdminCredential",
    "BundleError",
    "SetupError",
    "VerifiedBundle",
    "fetch_pinned_root",
    "install",
    "load_admin_credential",
    "normalize_pin",
    "read_bundle",
    "resolve_root",
    "setup",
    "verify_bundle",
    "write_state",
]

INSTALLER_FORMAT = "certgate-tunnel-installer/1"
MANIFEST = "manifest.jws"
INSTALL_TOKEN = "install-token"
MAX_BUNDLE_BYTES = 1024 * 1024  # compressed
MAX_TAR_BYTES = 4 * 1024 * 1024  # decompressed
MAX_MEMBER_BYTES = 256 * 1024
MAX_MEMBERS = 16
MAX_ANSWER_BYTES = 1024 * 1024
TIMEOUT_S = 30.0
_MEMBER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PIN_RE = re.compile(r"[0-9a-f]{64}")


class SetupError(CertgateError):
    """Setup or install could not complete: console unreachable, refused, or bad answer."""


class BundleError(SetupError):
    """An installer bundle is malformed, unsafe, tampered with, or signed by the wrong key."""


@dataclass(frozen=True, slots=True)
class AdminCredential:
    """The two factors the console requires for setup: API key and client certificate."""

    api_key: str = field(repr=False)
    chain: tuple[x509.Certificate, ...]  # the admin certificate first
    key: PrivateKey = field(repr=False)


def load_admin_credential(
    api_key: str, cert_path: Path, *, key_path: Path | None = None, password: str | None = None
) -> AdminCredential:
    """Load the admin certificate from PKCS#12, or from PEM with ``key_path``."""
    data = cert_path.read_bytes()
    secret = password.encode() if password else None
    if b"-----BEGIN" in data:
        if key_path is None:
            raise ConfigError(f"{cert_path} is PEM: pass the admin key file too (--admin-key)")
        chain = config.load_certs(data, str(cert_path))
        return AdminCredential(api_key, tuple(chain), load_private_key_pem(key_path.read_bytes()))
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, secret)
    except ValueError as exc:
        raise ConfigError(f"{cert_path}: cannot open PKCS#12 (wrong password?): {exc}") from exc
    if cert is None or key is None:
        raise ConfigError(f"{cert_path}: PKCS#12 lacks a certificate or key")
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"{cert_path}: unsupported key type {type(key).__name__}")
    return AdminCredential(api_key, (cert, *extra), key)


def normalize_pin(pin: str) -> str:
    """A SHA-256 thumbprint as 64 lower-case hex (colons and case are tolerated)."""
    cleaned = pin.replace(":", "").strip().lower()
    if not _PIN_RE.fullmatch(cleaned):
        raise ConfigError("--pin-sha256 must be the root's SHA-256 thumbprint (64 hex digits)")
    return cleaned


def _console_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"console URL must be https://host[:port], got {url!r}")
    return url.rstrip("/")


def _pin_fetch_context() -> ssl.SSLContext:
    # Only for downloading the root to compare with the pin: nothing from this connection
    # is believed until the thumbprint matches, and every later call verifies the chain.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def fetch_pinned_root(console_url: str, pin_sha256: str) -> x509.Certificate:
    """Download ``/pki/root.pem`` and accept it only if its thumbprint equals the pin."""
    pin = normalize_pin(pin_sha256)
    with httpx.Client(verify=_pin_fetch_context(), timeout=TIMEOUT_S) as client:
        body = _request(client, "GET", f"{_console_url(console_url)}/pki/root.pem")
    root = config.load_root(body, "console /pki/root.pem")
    found = thumbprint(root)
    if not hmac.compare_digest(found, pin):
        raise SetupError(
            f"console root thumbprint {found} does not match the pin {pin}; refusing"
            f" ({ROOT_PIN_HINT})"
        )
    return root


def resolve_root(
    console_url: str, *, ca_file: Path | None = None, pin_sha256: str | None = None
) -> x509.Certificate:
    """The instance root to trust: from ``ca_file``, or fetched and pinned (or both agree)."""
    if ca_file is None and pin_sha256 is None:
        raise ConfigError("give the instance root (--ca-file) or its thumbprint (--pin-sha256)")
    if ca_file is None:
        assert pin_sha256 is not None
        return fetch_pinned_root(console_url, pin_sha256)
    root = config.load_root(ca_file.read_bytes(), str(ca_file))
    if pin_sha256 is not None and thumbprint(root) != normalize_pin(pin_sha256):
        raise SetupError(f"{ca_file} does not match --pin-sha256; refusing")
    return root


def _request(client: httpx.Client, method: str, url: str, **kwargs: Any) -> bytes:
    """One call with a bounded answer; transport errors and refusals become SetupError."""
    try:
        with client.stream(method, url, **kwargs) as response:
            body = _bounded(response.iter_bytes(), MAX_ANSWER_BYTES)
    except httpx.HTTPError as exc:
        raise SetupError(f"cannot talk to the console at {url}: {exc}") from exc
    if response.status_code != 200:
        raise SetupError(f"console refused {method} {url}: {_reason(response.status_code, body)}")
    return body


def _bounded(chunks: Iterator[bytes], limit: int) -> bytes:
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        if len(buffer) > limit:
            raise SetupError(f"console answer exceeds {limit} bytes")
    return bytes(buffer)


def _reason(status: int, body: bytes) -> str:
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = detail if isinstance(detail, str) else body[:200].decode(errors="replace")
    return f"{status} {text}"


def setup(
    console_url: str,
    group_id: str,
    admin: AdminCredential,
    root: x509.Certificate,
    state_dir: Path,
    node_name: str,
    *,
    address: str = "",
) -> TunnelState:
    """Run tunnel setup against the console and store the verified state in ``state_dir``."""
    url = _console_url(console_url)
    config.check_node_name(node_name)
    _check_state_dir(state_dir, group_id)
    ctx = client_context([root], chain=admin.chain, key=admin.key)
    headers = {"authorization": f"Bearer {admin.api_key}"}
    with httpx.Client(verify=ctx, headers=headers, timeout=TIMEOUT_S) as client:
        body = _request(
            client,
            "POST",
            f"{url}/api/v1/groups/{group_id}/tunnel/setup",
            json={"node_name": node_name, "address": address},
        )
    return _store_answer(body, root, group_id, url, node_name, state_dir)


def _answer_files(
    answer: object, root: x509.Certificate, group_id: str
) -> tuple[dict[str, bytes], PrivateKey]:
    """The state files and the key carried by a setup/install answer (verified by the
    caller). The key stays in memory until ``config.store_identity`` seals it."""
    if not isinstance(answer, dict) or answer.get("group_id") != group_id:
        raise SetupError(f"console answer is not a setup bundle for group {group_id!r}")
    chain = answer.get("chain")
    texts = [answer.get(k) for k in ("console_identity", "tunnel_identity", "tunnel_key", "trust")]
    if not isinstance(chain, list) or not all(isinstance(t, str) for t in [*texts, *chain]):
        raise SetupError("console answer is missing fields of the setup bundle")
    console_pem, tunnel_pem, key_pem, trust = (str(t) for t in texts)
    try:
        key = load_private_key_pem(key_pem.encode())
    except CertgateError as exc:
        raise SetupError(f"console answer's tunnel key: {exc}") from exc
    files = {
        config.ROOT_PEM: root.public_bytes(Encoding.PEM),
        config.CHAIN_PEM: "".join(chain).encode(),
        config.CONSOLE_IDENTITY_PEM: console_pem.encode(),
        config.TUNNEL_PEM: tunnel_pem.encode(),
        config.TRUST_JWS: trust.encode(),
    }
    return files, key


def _store_answer(
    body: bytes,
    root: x509.Certificate,
    group_id: str,
    console_url: str,
    node_name: str,
    state_dir: Path,
    pinned_console: x509.Certificate | None = None,
) -> TunnelState:
    try:
        answer = json.loads(body)
    except ValueError as exc:
        raise SetupError("console answer is not JSON") from exc
    files, key = _answer_files(answer, root, group_id)
    files[config.STATE_JSON] = config.state_json(group_id, console_url, node_name)
    try:
        state = config.state_from_files(files, state_dir, key)
    except ConfigError as exc:
        raise SetupError(f"console answer does not verify: {exc}") from exc
    if pinned_console is not None and state.console_identity != pinned_console:
        raise SetupError("console answered with a console identity other than the bundle's")
    files[config.ROOT_PEM] = config.roots_pem(state)  # two during a Root rotation
    write_state(state_dir, files, key)
    return state


def _check_state_dir(state_dir: Path, group_id: str) -> None:
    """Refuse to mix groups in one directory (its persisted device table is per group)."""
    try:
        meta = json.loads((state_dir / config.STATE_JSON).read_bytes())
    except FileNotFoundError:
        return
    except ValueError as exc:
        raise SetupError(f"{state_dir} holds a damaged {config.STATE_JSON}") from exc
    existing = meta.get("group_id") if isinstance(meta, dict) else None
    if existing != group_id:
        raise SetupError(f"{state_dir} is set up for group {existing!r}; use another directory")


def write_state(state_dir: Path, files: Mapping[str, bytes], key: PrivateKey) -> None:
    """Write a verified state directory and seal its key (also a rotated identity,
    ``tunnel.rotation``)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    for name in config.STATE_FILES:
        atomic_write(state_dir / name, files[name], 0o644)
    config.store_identity(state_dir, key)
    # state.json last: it marks the directory complete.
    atomic_write(state_dir / config.STATE_JSON, files[config.STATE_JSON], 0o644)


# Installer bundles


def read_bundle(data: bytes) -> dict[str, bytes]:
    """The regular files of a tar.gz bundle, read in memory with every limit enforced.

    No links, devices or directories; names are flat (no ``/``, no ``..``, not absolute);
    at most ``MAX_MEMBERS`` files of ``MAX_MEMBER_BYTES``; the gzip stream itself is
    inflated with a cap, so a compression bomb stops at ``MAX_TAR_BYTES``.
    """
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle is larger than {MAX_BUNDLE_BYTES} bytes")
    tar_bytes = _gunzip_bounded(data)
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            for info in tar:
                _check_member(info, files)
                extracted = tar.extractfile(info)
                assert extracted is not None  # a regular file always has content
                files[info.name] = extracted.read()
    except tarfile.TarError as exc:
        raise BundleError(f"bundle is not a valid tar archive: {exc}") from exc
    return files


def _gunzip_bounded(data: bytes) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing (RFC 1952)
    try:
        out = inflater.decompress(data, MAX_TAR_BYTES)
    except zlib.error as exc:
        raise BundleError(f"bundle is not gzip: {exc}") from exc
    if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
        raise BundleError(
            f"bundle inflates beyond {MAX_TAR_BYTES} bytes, is truncated, or has trailing data"
        )
    return out


def _check_member(info: tarfile.TarInfo, seen: Mapping[str, bytes]) -> None:
    name = info.name
    if name.startswith("/") or ".." in name.split("/") or not _MEMBER_NAME_RE.fullmatch(name):
        raise BundleError(f"unsafe member name {name!r} in bundle")
    if not info.isreg():
        raise BundleError(f"bundle member {name!r} is not a regular file (links are refused)")
    if info.size > MAX_MEMBER_BYTES:
        raise BundleError(f"bundle member {name!r} is larger than {MAX_MEMBER_BYTES} bytes")
    if name in seen:
        raise BundleError(f"bundle holds {name!r} twice")
    if len(seen) >= MAX_MEMBERS:
        raise BundleError(f"bundle holds more than {MAX_MEMBERS} files")


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    group_id: str
    console_url: str
    root: x509.Certificate
    console_identity: x509.Certificate
    install_token: str = field(repr=False)


def verify_bundle(files: Mapping[str, bytes], *, pin_sha256: str | None = None) -> VerifiedBundle:
    """Check a bundle end to end; raise ``BundleError`` with the first failure.

    root.pem (matches the pin when given) -> Secure Channel Root from chain.pem ->
    console-identity.pem, whose URI SAN names the group; that identity's signature on
    manifest.jws (typ installer, same group, unexpired); every other file's SHA-256
    exactly as listed, no file more or less; trust.jws signed by the same identity.
    """
    try:
        return _verify_bundle(files, pin_sha256)
    except BundleError:
        raise
    except CertgateError as exc:
        raise BundleError(f"bundle does not verify: {exc}") from exc


def _verify_bundle(files: Mapping[str, bytes], pin_sha256: str | None) -> VerifiedBundle:
    needed = {MANIFEST, INSTALL_TOKEN, *config.STATE_FILES} - {config.TUNNEL_PEM, config.TUNNEL_KEY}
    if missing := sorted(needed - set(files)):
        raise BundleError(f"bundle lacks {', '.join(missing)}")
    root = config.load_root(files[config.ROOT_PEM], config.ROOT_PEM)
    if pin_sha256 is not None and thumbprint(root) != normalize_pin(pin_sha256):
        raise BundleError(
            f"bundle root {thumbprint(root)} does not match the pin; refusing ({ROOT_PIN_HINT})"
        )
    scr = config.load_secure_channel_root(files[config.CHAIN_PEM], root)
    console = config.load_single_cert(files[config.CONSOLE_IDENTITY_PEM], "console identity")
    named = identity.identity_of(console)
    if named.kind is not identity.IdentityKind.CONSOLE or named.group_id is None:
        raise BundleError(f"console-identity.pem names {named.uri()}, not a console identity")
    config.verify_identity(console, [scr], [root], named)
    manifest = jws.verify(files[MANIFEST], console, jws.TYP_INSTALLER, named.group_id)
    _check_manifest(manifest, files)
    jws.verify(files[config.TRUST_JWS], console, jws.TYP_TRUST, named.group_id)
    token = files[INSTALL_TOKEN].decode("ascii", errors="replace").strip()
    url = manifest.get("console_url")
    if not isinstance(url, str):
        raise BundleError("manifest lacks the console URL")
    return VerifiedBundle(named.group_id, _console_url(url), root, console, token)


def _check_manifest(manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> None:
    if manifest.get("format") != INSTALLER_FORMAT:
        raise BundleError(f"unknown installer format {manifest.get('format')!r}")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise BundleError("manifest lacks its file list")
    present = set(files) - {MANIFEST}
    if set(listed) != present:
        extra, absent = sorted(present - set(listed)), sorted(set(listed) - present)
        raise BundleError(f"bundle files differ from the manifest: extra {extra}, missing {absent}")
    for name in sorted(present):
        digest = hashlib.sha256(files[name]).hexdigest()
        if not isinstance(listed[name], str) or not hmac.compare_digest(digest, listed[name]):
            raise BundleError(f"{name} does not match its SHA-256 in the signed manifest")


def install(
    bundle_path: Path,
    state_dir: Path,
    node_name: str,
    *,
    pin_sha256: str | None = None,
    address: str = "",
) -> TunnelState:
    """Verify an installer bundle, redeem its one-time token, store the verified state."""
    config.check_node_name(node_name)
    if bundle_path.stat().st_size > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle is larger than {MAX_BUNDLE_BYTES} bytes")
    bundle = verify_bundle(read_bundle(bundle_path.read_bytes()), pin_sha256=pin_sha256)
    _check_state_dir(state_dir, bundle.group_id)
    with httpx.Client(verify=client_context([bundle.root]), timeout=TIMEOUT_S) as client:
        body = _request(
            client,
            "POST",
            f"{bundle.console_url}/api/v1/tunnel/install",
            json={"token": bundle.install_token, "node_name": node_name, "address": address},
        )
    return _store_answer(
        body,
        bundle.root,
        bundle.group_id,
        bundle.console_url,
        node_name,
        state_dir,
        pinned_console=bundle.console_identity,
    )
