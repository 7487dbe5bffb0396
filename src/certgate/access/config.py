"""Access configuration: parsed once, frozen, validated at startup.

``access.json`` in the data directory holds the non-secret settings; keys are sealed under
the data directory's master key (``certgate.pki.keystore``) and certificates sit beside
them as PEM files (see :class:`AccessFiles`). Secure defaults: listen on loopback, short
code and token lifetimes, a short device-status cache, fail closed soon after the console
becomes unreachable.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from certgate.errors import ConfigError
from certgate.pki.profiles import ACCESS_TLS, MAX_SERVER_TLS_LIFETIME, RENEWAL_WINDOW
from certgate.pki.thumbprint import is_thumbprint

__all__ = [
    "AccessConfig",
    "AccessFiles",
    "ClientRegistration",
    "SignInStoreKind",
    "TLSMode",
    "load_config",
    "parse_networks",
    "pin_certproxy",
    "save_config",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SETTINGS_FILE = "access.json"
DEFAULT_PORT = 443
CERTPROXY_PORT = 5262
CERTPROXY_OFFLOAD_PORT = 5263
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,127}")
# RFC 8252 §7.1: private-use URI schemes are reverse domain names, so they contain a dot.
PRIVATE_SCHEME_RE = re.compile(r"[a-z][a-z0-9+-]*(\.[a-z0-9+-]+)+")
MAX_REDIRECT_URI = 2048


class TLSMode(Enum):
    """What the load balancer does with 443 (spec: "Deciding Between SSL Re-Encryption and
    SSL Offloading"), and so which certificate Access presents there."""

    OFFLOAD = "offload"  # Layer 7 on the LB: Access serves its self-signed install certificate
    PASSTHROUGH = "passthrough"  # Layer 4: Access serves the publicly trusted certificate


class SignInStoreKind(Enum):
    """Where sign-in transactions live (``oidc.SignInStore``)."""

    CONSOLE = "console"  # the console's database: any node finishes any sign-in
    MEMORY = "memory"  # this node only: a single node, or a balancer pinning clients


@dataclass(frozen=True, slots=True)
class ClientRegistration:
    """A relying party identified by its redirect URIs: a public client (RFC 8252 native
    app), or a confidential one (``certgate access client-secret``) that authenticates at
    the token endpoint with ``client_secret_basic`` (RFC 6749 §2.3.1). Only the SHA-256 of
    its secret is kept: Access made the secret, 256 random bits, so no dictionary applies."""

    client_id: str
    redirect_uris: tuple[str, ...]
    secret_sha256: str | None = None

    def __post_init__(self) -> None:
        if not CLIENT_ID_RE.fullmatch(self.client_id):
            raise ConfigError(f"client id {self.client_id!r} must match {CLIENT_ID_RE.pattern}")
        if self.secret_sha256 is not None and not is_thumbprint(self.secret_sha256):
            raise ConfigError(f"client {self.client_id!r}: secret_sha256 must be 64 hex digits")
        if not self.redirect_uris:
            raise ConfigError(f"client {self.client_id!r} needs at least one redirect URI")
        for uri in self.redirect_uris:
            check_redirect_uri(uri)


def check_redirect_uri(uri: str) -> None:
    """RFC 6749 §3.1.2: absolute, no fragment. RFC 8252 §7: https, a private-use scheme,
    or http on a loopback IP literal (§7.3); nothing else can receive a code safely."""
    if len(uri) > MAX_REDIRECT_URI or any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in uri):
        raise ConfigError(f"redirect URI {uri[:80]!r} is too long or has spaces/controls")
    parts = urlsplit(uri)
    if parts.fragment or "#" in uri:
        raise ConfigError(f"redirect URI {uri!r} must not have a fragment (RFC 6749 §3.1.2)")
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and _is_loopback(parts.hostname):
        return
    if PRIVATE_SCHEME_RE.fullmatch(parts.scheme) and parts.path:
        return
    raise ConfigError(
        f"redirect URI {uri!r} must be https://, http:// on a loopback IP, or a reverse-DNS "
        "private-use scheme (RFC 8252 §7)"
    )


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_https_url(url: str, what: str, *, path_allowed: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"{what} must be an https:// URL, got {url!r}")
    if parts.query or parts.fragment or "#" in url or "?" in url:
        # OpenID Connect Discovery 1.0 §3: the issuer has no query or fragment component.
        raise ConfigError(f"{what} must not have a query or fragment: {url!r}")
    if not path_allowed and parts.path not in ("", "/"):
        raise ConfigError(f"{what} must be scheme://host[:port] only, got {url!r}")


def _check_range(value: float, low: float, high: float, what: str) -> None:
    if isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{what} must be between {low} and {high}, got {value!r}")


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """Every Access and cert proxy setting. ``certproxy_thumbprint`` pins the one client
    certificate whose connections may carry RFC 9440 ``Client-Cert`` fields."""

    data_dir: Path
    issuer: str
    console_url: str
    certproxy_url: str
    certproxy_thumbprint: str
    clients: tuple[ClientRegistration, ...]
    tls_mode: TLSMode = TLSMode.OFFLOAD
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    code_ttl_s: int = 60
    request_ttl_s: int = 300
    id_token_ttl_s: int = 600
    status_ttl_s: float = 10.0
    console_budget_s: float = 30.0
    console_timeout_s: float = 5.0
    max_pending: int = 10_000
    # Addresses (or networks) of the load balancers that send a PROXY v2 header; a
    # connection from one must start with it, one from anywhere else must not carry it.
    load_balancers: tuple[str, ...] = ()
    signins: SignInStoreKind = SignInStoreKind.CONSOLE
    # How often Access asks the console for its Device Roots (a rotation's new one is
    # trusted, a finished one dropped, within this; ``certgate.access.trust``).
    trust_refresh_s: float = 30.0
    # Access's own certificates (the self-signed TLS leaf, the cert proxy's client
    # certificate): their lifetime when renewed, and how often their end is checked
    # (renewed within ``pki.profiles.RENEWAL_WINDOW``; ``certgate.access.renewal``).
    tls_lifetime_days: int = ACCESS_TLS.validity.days
    renew_check_s: float = 3600.0

    def __post_init__(self) -> None:
        _check_https_url(self.issuer, "issuer", path_allowed=True)
        if self.issuer.endswith("/"):
            raise ConfigError(f"issuer must not end with '/': {self.issuer!r}")
        _check_https_url(self.console_url, "console URL", path_allowed=False)
        _check_https_url(self.certproxy_url, "cert proxy URL", path_allowed=False)
        if not is_thumbprint(self.certproxy_thumbprint):
            raise ConfigError("cert proxy thumbprint must be 64 lower-case hex characters")
        if not self.clients:
            raise ConfigError("register at least one client (client_id and redirect URIs)")
        ids = [c.client_id for c in self.clients]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"client ids must be unique: {ids}")
        _check_range(self.port, 1, 65535, "port")
        _check_range(self.code_ttl_s, 10, 600, "code lifetime (s)")  # RFC 6749 §4.1.2: <= 10 min
        _check_range(self.request_ttl_s, 30, 1800, "authorization request lifetime (s)")
        _check_range(self.id_token_ttl_s, 60, 24 * 3600, "ID token lifetime (s)")
        _check_range(self.status_ttl_s, 0, 300, "device status cache TTL (s)")
        _check_range(self.console_budget_s, 0, 3600, "console unreachable budget (s)")
        _check_range(self.console_timeout_s, 0.1, 60, "console request timeout (s)")
        _check_range(self.max_pending, 1, 1_000_000, "maximum pending authorizations")
        _check_range(self.trust_refresh_s, 1, 3600, "Device Root refresh interval (s)")
        # Longer than the renewal window; at most Mozilla's and the CA/B Forum's 398 days.
        _check_range(
            self.tls_lifetime_days,
            RENEWAL_WINDOW.days + 1,
            MAX_SERVER_TLS_LIFETIME.days,
            "TLS certificate lifetime (days)",
        )
        _check_range(self.renew_check_s, 1, 86400, "renewal check interval (s)")
        parse_networks(self.load_balancers)

    @property
    def files(self) -> AccessFiles:
        return AccessFiles(self.data_dir)

    def client(self, client_id: str) -> ClientRegistration | None:
        return next((c for c in self.clients if c.client_id == client_id), None)


def parse_networks(values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """Load balancer addresses: IP addresses or CIDR networks, host bits clear."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value))
        except ValueError as exc:
            raise ConfigError(
                f"load balancer {value!r} is not an IP address or network: {exc}"
            ) from exc
    return tuple(networks)


@dataclass(frozen=True, slots=True)
class AccessFiles:
    """Where each piece of the installation lives in the data directory."""

    root: Path

    @property
    def settings(self) -> Path:
        return self.root / SETTINGS_FILE

    @property
    def master_key(self) -> Path:
        return self.root / "master.key"

    @property
    def install_root(self) -> Path:
        """The self-signed install root: what a re-encrypting load balancer trusts."""
        return self.root / "install-root.pem"

    @property
    def access_tls(self) -> Path:
        return self.root / "access-tls.pem"

    @property
    def certproxy_client(self) -> Path:
        return self.root / "certproxy-client.pem"

    @property
    def public_chain(self) -> Path:
        return self.root / "public-chain.pem"

    @property
    def device_roots(self) -> Path:
        """The console's Device Roots as Access last fetched them (``access.trust``)."""
        return self.root / "device-roots.json"

    @property
    def console_chain(self) -> Path:
        return self.root / "console-chain.pem"

    @property
    def console_admin(self) -> Path:
        return self.root / "console-admin.pem"

    @property
    def console_api_key(self) -> Path:
        """The console API key, sealed like the private keys (it is a bearer secret)."""
        return self.sealed("console-api-key")

    def sealed(self, label: str) -> Path:
        return self.root / "keys" / f"{label}.sealed"


def save_config(config: AccessConfig) -> None:
    data: dict[str, Any] = asdict(config)
    data["data_dir"] = str(config.data_dir)
    data["tls_mode"] = config.tls_mode.value
    data["load_balancers"] = list(config.load_balancers)
    data["signins"] = config.signins.value
    data["clients"] = [_stored_client(c) for c in config.clients]
    _write_settings(config.files, data)


def _write_settings(files: AccessFiles, data: dict[str, Any]) -> None:
    """``access.json`` replaced whole: a reader sees the old settings or the new."""
    tmp = files.settings.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, files.settings)


def _stored_client(client: ClientRegistration) -> dict[str, Any]:
    stored: dict[str, Any] = {"client_id": client.client_id}
    stored["redirect_uris"] = list(client.redirect_uris)
    if client.secret_sha256 is not None:
        stored["secret_sha256"] = client.secret_sha256
    return stored


def register_client_secret(files: AccessFiles, client_id: str, secret_sha256: str) -> None:
    """Make ``client_id`` confidential (or give it a new secret) in ``access.json``, changing
    nothing else; a running Access takes it at its next start."""
    data = json.loads(files.settings.read_text())
    clients = data.get("clients", [])
    found = [c for c in clients if c.get("client_id") == client_id]
    if not found:
        raise ConfigError(f"no client {client_id!r} in {files.settings}")
    ClientRegistration(client_id, tuple(found[0]["redirect_uris"]), secret_sha256)
    found[0]["secret_sha256"] = secret_sha256
    _write_settings(files, data)


def pin_certproxy(files: AccessFiles, thumbprint: str) -> None:
    """Pin a renewed cert proxy certificate in ``access.json``, changing nothing else (the
    running config may carry command-line overrides that are not to be stored)."""
    if not is_thumbprint(thumbprint):
        raise ConfigError("cert proxy thumbprint must be 64 lower-case hex characters")
    data = json.loads(files.settings.read_text())
    data["certproxy_thumbprint"] = thumbprint
    _write_settings(files, data)


def load_config(data_dir: Path, **overrides: Any) -> AccessConfig:
    """Read ``access.json``; ``overrides`` whose value is not None replace stored settings."""
    path = AccessFiles(data_dir).settings
    if not path.exists():
        raise ConfigError(
            f"{data_dir} is not an Access data directory (run `certgate access init`)"
        )
    try:
        data = json.loads(path.read_text())
        data.update({k: v for k, v in overrides.items() if v is not None})
        data["data_dir"] = data_dir
        data["tls_mode"] = TLSMode(data.get("tls_mode", TLSMode.OFFLOAD.value))
        balancers = data.get("load_balancers", ())
        if not isinstance(balancers, list | tuple):
            raise TypeError("load_balancers must be a list of addresses")
        data["load_balancers"] = tuple(balancers)
        data["signins"] = SignInStoreKind(data.get("signins", SignInStoreKind.CONSOLE.value))
        data["clients"] = tuple(
            ClientRegistration(c["client_id"], tuple(c["redirect_uris"]), c.get("secret_sha256"))
            for c in data.get("clients", [])
        )
        return AccessConfig(**data)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a valid Access configuration: {exc}") from exc
