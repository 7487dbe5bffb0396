"""``certgate access init``: the installation's keys and certificates, and loading them back.

At install Access creates its own self-signed install root (the spec's "self-signed
certificate generated during the application installation"). The root signs exactly two
leaves, the Access TLS certificate served on 443 when the load balancer offloads SSL (and
by the cert proxy on 5263) and the cert proxy's client certificate that Access pins, and
signs them again before they expire (``certgate.access.renewal``), nothing else: its key
is sealed like every other key, for that alone. The publicly trusted certificate is given
by file and served on 443 under SSL passthrough, and by the cert proxy on 5262 in both
modes.

Private keys and the console API key are sealed under the data directory's master key
(Access's node key: ``master.key``, 0600, or ``$CERTGATE_MASTER_KEY``), each in a 0600
file. Nothing secret goes into ``access.json`` and nothing secret is on disk in clear.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from certgate.access.config import (
    AccessConfig,
    AccessFiles,
    ClientRegistration,
    SignInStoreKind,
    TLSMode,
)
from certgate.access.config import save_config as _save_config
from certgate.access.trust import DEVICE_ROOT_CN, DeviceRootSet, load_device_roots
from certgate.errors import ChainError, ConfigError, PKIError
from certgate.pki.authority import Authority, Issuer, Names
from certgate.pki.keys import PrivateKey, generate_key, load_private_key_pem
from certgate.pki.keystore import MasterKey, load_master_key, open_or_create_key
from certgate.pki.profiles import ACCESS_INSTALL_ROOT, ACCESS_TLS, CERTPROXY_CLIENT, Profile
from certgate.pki.thumbprint import thumbprint
from certgate.tlsconf import pem_of

__all__ = [
    "ConsoleTrust",
    "InstallCertificates",
    "InstallRequest",
    "Material",
    "install",
    "issue_install_certificates",
    "load_material",
]

ACCESS_TLS_KEY = "access-tls"
CERTPROXY_KEY = "certproxy-client"
PUBLIC_TLS_KEY = "public-tls"
CONSOLE_ADMIN_KEY = "console-admin"
INSTALL_ROOT_KEY = "install-root"
CONSOLE_API_KEY = "console-api-key"
ID_TOKEN_KEY = "id-token"


@dataclass(frozen=True, slots=True)
class ConsoleTrust:
    """The console's Root and Device Root: what device certificates must chain to."""

    root: x509.Certificate
    device_root: x509.Certificate

    @classmethod
    def from_pem(cls, data: bytes) -> ConsoleTrust:
        """Parse the console's ``/pki/chain.pem`` (Root first, then the intermediates)."""
        certs = _load_certs(data, "console chain")
        root = certs[0]
        if root.issuer != root.subject:
            raise ConfigError("console chain must start with the console's self-signed Root")
        for cert in certs[1:]:
            if _common_name(cert) == DEVICE_ROOT_CN and cert.issuer == root.subject:
                try:
                    cert.verify_directly_issued_by(root)
                except (InvalidSignature, ValueError, TypeError) as exc:
                    raise ConfigError(
                        "the console's Device Root is not signed by its Root"
                    ) from exc
                return cls(root, cert)
        raise ConfigError(f"console chain holds no {DEVICE_ROOT_CN!r} issued by its Root")


@dataclass(frozen=True, slots=True)
class Material:
    """Everything Access and its cert proxy load from the data directory at startup."""

    install_root: x509.Certificate
    access_cert: x509.Certificate
    access_key: PrivateKey
    certproxy_cert: x509.Certificate
    certproxy_key: PrivateKey
    public_chain: tuple[x509.Certificate, ...]
    public_key: PrivateKey
    console: ConsoleTrust
    console_admin_cert: x509.Certificate
    console_admin_key: PrivateKey
    console_api_key: str
    id_token_key: ec.EllipticCurvePrivateKey
    # The Device Roots Access last learned from the console (``access.trust``), else the
    # console chain's; None for the install root key: an installation older than renewal.
    device_roots: DeviceRootSet
    install_root_key: PrivateKey | None = None

    def __repr__(self) -> str:
        return f"Material(access={thumbprint(self.access_cert)}, keys=<redacted>)"

    def serving(self, mode: TLSMode) -> tuple[list[x509.Certificate], PrivateKey]:
        """What Access presents on 443: the self-signed leaf, or the public chain."""
        if mode is TLSMode.PASSTHROUGH:
            return list(self.public_chain), self.public_key
        return [self.access_cert], self.access_key


@dataclass(frozen=True, slots=True)
class InstallRequest:
    """The operator's inputs to ``certgate access init`` (PEM bytes, not paths)."""

    issuer: str
    console_url: str
    certproxy_url: str
    clients: tuple[ClientRegistration, ...]
    console_chain_pem: bytes
    console_admin_cert_pem: bytes
    console_admin_key_pem: bytes
    console_api_key: str
    public_chain_pem: bytes
    public_key_pem: bytes
    tls_mode: TLSMode = TLSMode.OFFLOAD
    host: str = "127.0.0.1"
    port: int = 443
    dns_names: tuple[str, ...] = ("localhost",)
    ip_addresses: tuple[str, ...] = ("127.0.0.1",)
    load_balancers: tuple[str, ...] = ()
    signins: SignInStoreKind = SignInStoreKind.CONSOLE

    def __repr__(self) -> str:
        return f"InstallRequest(issuer={self.issuer!r}, secrets=<redacted>)"


def _load_certs(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{what} is not PEM certificates: {exc}") from exc
    if not certs:
        raise ConfigError(f"{what} holds no certificate")
    return certs


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode()


def _key_pair(
    cert_pem: bytes, key_pem: bytes, what: str
) -> tuple[list[x509.Certificate], PrivateKey]:
    chain = _load_certs(cert_pem, what)
    try:
        key = load_private_key_pem(key_pem)
    except PKIError as exc:
        raise ConfigError(f"{what} key: {exc}") from exc
    if chain[0].public_key() != key.public_key():
        raise ConfigError(f"{what}: the private key does not match the certificate")
    return chain, key


def _write_private(path: Path, data: bytes) -> None:
    """Written whole, then renamed over ``path``: a reader sees the old file or the new."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    """A certificate file, replaced atomically like the private ones."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_private(path: Path) -> bytes:
    """A secret file, refused when group or others may read it (like ssh's identity files)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} is missing; run `certgate access init`") from exc
    if mode & 0o077:
        raise ConfigError(f"{path} has mode {mode:04o}; refusing to start: chmod 600 it")
    return path.read_bytes()


@dataclass(frozen=True, slots=True)
class InstallCertificates:
    """What ``access init`` issues; the install root's key is not among them."""

    install_root: x509.Certificate
    install_root_key: PrivateKey
    access_cert: x509.Certificate
    access_key: PrivateKey
    certproxy_cert: x509.Certificate
    certproxy_key: PrivateKey


def leaf_profiles(lifetime: timedelta) -> tuple[Profile, Profile]:
    """The Access TLS and cert proxy client profiles with the configured lifetime."""
    return (
        dataclasses.replace(ACCESS_TLS, validity=lifetime),
        dataclasses.replace(CERTPROXY_CLIENT, validity=lifetime),
    )


def issue_install_certificates(
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    authority: Authority | None = None,
    lifetime: timedelta = ACCESS_TLS.validity,
) -> InstallCertificates:
    """The install root and its two leaves."""
    authority = authority or Authority()
    root_key = generate_key()
    root = authority.create_root(
        root_key, Names("certgate Access install root"), ACCESS_INSTALL_ROOT
    )
    issuer = Issuer(root, root_key)
    access_key, proxy_key = generate_key(), generate_key()
    access_profile, proxy_profile = leaf_profiles(lifetime)
    names = Names("certgate Access", dns_names=tuple(dns_names), ip_addresses=tuple(ip_addresses))
    access_cert = authority.issue(issuer, access_profile, names, access_key.public_key())
    # The proxy runs on this node: its certificate names the node (RFC 5280 §4.2.1.6 SAN).
    proxy_names = Names("certgate CertProxy", dns_names=tuple(dns_names))
    proxy_cert = authority.issue(issuer, proxy_profile, proxy_names, proxy_key.public_key())
    return InstallCertificates(root, root_key, access_cert, access_key, proxy_cert, proxy_key)


@dataclass(frozen=True, slots=True)
class _Given:
    """The operator's certificates and keys, parsed and checked to belong together."""

    admin_chain: list[x509.Certificate]
    admin_key: PrivateKey
    public_chain: list[x509.Certificate]
    public_key: PrivateKey


def _checked_inputs(request: InstallRequest) -> _Given:
    ConsoleTrust.from_pem(request.console_chain_pem)
    admin_chain, admin_key = _key_pair(
        request.console_admin_cert_pem, request.console_admin_key_pem, "console admin certificate"
    )
    public_chain, public_key = _key_pair(
        request.public_chain_pem, request.public_key_pem, "public certificate"
    )
    if not request.dns_names:
        raise ConfigError("the self-signed certificate needs at least one DNS name (the node)")
    if not request.console_api_key.strip():
        raise ConfigError("the console API key is empty")
    return _Given(admin_chain, admin_key, public_chain, public_key)


def install(data_dir: Path, request: InstallRequest) -> AccessConfig:
    """Create the data directory of a fresh Access installation; refuse to overwrite one."""
    files = AccessFiles(data_dir)
    if files.settings.exists() or files.master_key.exists():
        raise ConfigError(f"{data_dir} already holds an Access installation")
    given = _checked_inputs(request)
    issued = issue_install_certificates(
        request.dns_names, request.ip_addresses, lifetime=ACCESS_TLS.validity
    )
    config = AccessConfig(
        data_dir=data_dir,
        issuer=request.issuer,
        console_url=request.console_url,
        certproxy_url=request.certproxy_url,
        certproxy_thumbprint=thumbprint(issued.certproxy_cert),
        clients=request.clients,
        tls_mode=request.tls_mode,
        host=request.host,
        port=request.port,
        load_balancers=request.load_balancers,
        signins=request.signins,
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    _write_installation(files, request, given, issued)
    _save_config(config)  # last: its presence marks a complete installation
    return config


def _write_installation(
    files: AccessFiles, request: InstallRequest, given: _Given, issued: InstallCertificates
) -> None:
    seal = _Seal(files, open_or_create_key(files.master_key))
    files.install_root.write_bytes(pem_of([issued.install_root]))
    files.access_tls.write_bytes(pem_of([issued.access_cert]))
    files.certproxy_client.write_bytes(pem_of([issued.certproxy_cert]))
    files.public_chain.write_bytes(pem_of(given.public_chain))
    files.console_chain.write_bytes(request.console_chain_pem)
    files.console_admin.write_bytes(pem_of(given.admin_chain))
    seal.secret(CONSOLE_API_KEY, request.console_api_key.strip().encode())
    seal(INSTALL_ROOT_KEY, issued.install_root_key)
    seal(ACCESS_TLS_KEY, issued.access_key)
    seal(CERTPROXY_KEY, issued.certproxy_key)
    seal(PUBLIC_TLS_KEY, given.public_key)
    seal(CONSOLE_ADMIN_KEY, given.admin_key)
    seal(ID_TOKEN_KEY, ec.generate_private_key(ec.SECP256R1()))  # ES256 (RFC 7518 §3.4)


@dataclass(frozen=True, slots=True)
class _Seal:
    files: AccessFiles
    master: MasterKey

    def __call__(self, label: str, key: PrivateKey) -> None:
        _write_private(self.files.sealed(label), self.master.seal(key, label))

    def secret(self, label: str, plain: bytes) -> None:
        _write_private(self.files.sealed(label), self.master.seal_bytes(plain, label))

    def open(self, label: str) -> PrivateKey:
        return self.master.unseal(_read_private(self.files.sealed(label)), label)

    def open_secret(self, label: str) -> bytes:
        return self.master.unseal_bytes(_read_private(self.files.sealed(label)), label)

    def open_optional(self, label: str) -> PrivateKey | None:
        return self.open(label) if self.files.sealed(label).exists() else None


def replace_public_certificate(
    config: AccessConfig, chain_pem: bytes, key_pem: bytes
) -> x509.Certificate:
    """Install the operator's new publicly trusted certificate (its renewal is theirs):
    checked to match its key, the key sealed, then the chain replaced. The cert proxy and
    Access put it to use without a restart (``certgate.access.renewal``)."""
    chain, key = _key_pair(chain_pem, key_pem, "public certificate")
    seal_key(config, PUBLIC_TLS_KEY, key)
    write_public(config.files.public_chain, pem_of(chain))
    return chain[0]


def seal_key(config: AccessConfig, label: str, key: PrivateKey) -> None:
    """Seal ``key`` under the data directory's master key (a renewed leaf's key)."""
    files = config.files
    _Seal(files, load_master_key(files.master_key))(label, key)


def load_material(config: AccessConfig) -> Material:
    """Load and cross-check the installation; a wrong master key fails here, at startup."""
    files = config.files
    opened = _Seal(files, load_master_key(files.master_key))
    id_key = opened.open(ID_TOKEN_KEY)
    if not isinstance(id_key, ec.EllipticCurvePrivateKey) or id_key.curve.name != "secp256r1":
        raise ConfigError("the ID token signing key must be ECDSA P-256 (ES256)")
    console = ConsoleTrust.from_pem(files.console_chain.read_bytes())
    saved = load_device_roots(files.device_roots, console.root)
    material = Material(
        install_root=_load_certs(files.install_root.read_bytes(), "install root")[0],
        access_cert=_load_certs(files.access_tls.read_bytes(), "Access TLS")[0],
        access_key=opened.open(ACCESS_TLS_KEY),
        certproxy_cert=_load_certs(files.certproxy_client.read_bytes(), "cert proxy")[0],
        certproxy_key=opened.open(CERTPROXY_KEY),
        public_chain=tuple(_load_certs(files.public_chain.read_bytes(), "public chain")),
        public_key=opened.open(PUBLIC_TLS_KEY),
        console=console,
        console_admin_cert=_load_certs(files.console_admin.read_bytes(), "console admin")[0],
        console_admin_key=opened.open(CONSOLE_ADMIN_KEY),
        console_api_key=opened.open_secret(CONSOLE_API_KEY).decode(),
        id_token_key=id_key,
        device_roots=saved or DeviceRootSet.initial(console.root, console.device_root),
        install_root_key=opened.open_optional(INSTALL_ROOT_KEY),
    )
    _cross_check(config, material)
    return material


def _cross_check(config: AccessConfig, material: Material) -> None:
    if thumbprint(material.certproxy_cert) != config.certproxy_thumbprint:
        raise ConfigError("cert proxy certificate does not match the pinned thumbprint")
    for cert, what in ((material.access_cert, "Access TLS"), (material.certproxy_cert, "proxy")):
        try:
            cert.verify_directly_issued_by(material.install_root)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise ChainError(f"{what} certificate is not issued by the install root") from exc
    pairs = [
        (material.access_cert, material.access_key, "Access TLS"),
        (material.certproxy_cert, material.certproxy_key, "cert proxy"),
        (material.public_chain[0], material.public_key, "public"),
        (material.console_admin_cert, material.console_admin_key, "console admin"),
    ]
    if material.install_root_key is not None:
        pairs.append((material.install_root, material.install_root_key, "install root"))
    for cert, key, what in pairs:
        if cert.public_key() != key.public_key():
            raise ConfigError(f"the {what} key does not match its certificate")
