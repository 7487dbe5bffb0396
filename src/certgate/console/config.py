"""Console configuration: parsed once, frozen, validated at startup."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from certgate.errors import ConfigError
from certgate.pki.token import TokenConfig

if TYPE_CHECKING:
    from certgate.console.sso_secret import SealedSecret

DEFAULT_PORT = 7443
MASTER_KEY_FILE = "master.key"
DB_FILE = "console.db"
AUDIT_SINK_FILE = "audit-checkpoints.jsonl"
SSO_SECRET_FILE = "sso-client-secret.sealed"  # `certgate console sso set-secret` writes it


CLAIM_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
ENV_RE = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
SECRET_SOURCES = ("client_secret_sealed", "client_secret_env", "client_secret_file")


@dataclass(frozen=True, slots=True)
class SSOConfig:
    """Web console single sign-on against an OpenID Connect provider (``console.ui.sso``).

    ``admins`` maps a value of the ID token's ``admin_claim`` (an e-mail, a ``sub``) to
    an existing admin's username; any other subject is refused. The client secret is never
    in ``console.json``. At most one source names it: ``client_secret_sealed`` (the
    recommended one: ``certgate console sso set-secret`` sealed it under the master key in
    the data directory), the variable ``client_secret_env``, or the file
    ``client_secret_file`` (mode 0600, but in clear on disk); none is a public client (PKCE
    only, token endpoint authentication ``none``)."""

    issuer: str
    client_id: str
    admins: Mapping[str, str]
    admin_claim: str = "email"
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    client_secret_sealed: bool = False
    ca_file: str | None = None  # trust anchors for the provider; unset: the system's
    scope: str = "openid email profile"
    require_totp: bool = False  # also ask the admin's TOTP code after the provider
    label: str = "single sign-on"

    def __post_init__(self) -> None:
        parts = urlsplit(self.issuer)
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(f"SSO issuer must be an https:// URL, got {self.issuer!r}")
        if not self.client_id or len(self.client_id) > 256:
            raise ConfigError("SSO client id must be 1-256 characters")
        if not CLAIM_RE.fullmatch(self.admin_claim):
            raise ConfigError(f"SSO admin claim {self.admin_claim!r} is not a claim name")
        if not self.admins or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in self.admins.items()
        ):
            raise ConfigError("SSO admins must map claim values to admin usernames")
        if "openid" not in self.scope.split():
            raise ConfigError("SSO scope must include openid")
        if not isinstance(self.client_secret_sealed, bool):
            raise ConfigError("SSO client_secret_sealed must be true or false")
        sources = [name for name in SECRET_SOURCES if getattr(self, name)]
        if len(sources) > 1:
            raise ConfigError(f"SSO client secret: one source, not {' and '.join(sources)}")
        if self.client_secret_env is not None and not ENV_RE.fullmatch(self.client_secret_env):
            raise ConfigError(f"SSO client secret variable {self.client_secret_env!r} invalid")

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> SSOConfig:
        if "client_secret" in raw:
            raise ConfigError(
                "SSO client secret must not be in console.json: seal it with `certgate "
                'console sso set-secret` and set "client_secret_sealed": true'
            )
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ConfigError(f"SSO settings: {exc}") from exc

    def client_secret(self, sealed: SealedSecret) -> str | None:
        """The secret from its source, read when needed (``sealed``: the data directory's
        sealed file and the master key); None for a public client. ConfigError (or OSError
        for an unreadable file) when the source does not give one."""
        if self.client_secret_sealed:
            return sealed.read()
        if self.client_secret_env:
            value = os.environ.get(self.client_secret_env)
            if not value:
                raise ConfigError(f"SSO client secret variable ${self.client_secret_env} unset")
            return value
        if self.client_secret_file:
            path = Path(self.client_secret_file)
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                raise ConfigError(f"SSO client secret file {path} must be mode 0600")
            return path.read_text().strip() or None
        return None


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    data_dir: Path
    db_url: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    public_url: str = f"https://127.0.0.1:{DEFAULT_PORT}"
    max_body_bytes: int = 1024 * 1024
    long_poll_max_s: float = 30.0
    enrollment_token_ttl_s: int = 7 * 24 * 3600
    installer_ttl_s: int = 24 * 3600
    crl_validity_s: int = 24 * 3600
    # CA keys in a PKCS#11 token (all three or none): the module, the token's label and
    # the variable holding the user PIN. Unset: the CA keys are sealed in the database.
    pkcs11_module: str | None = None
    pkcs11_token: str | None = None
    pkcs11_pin_env: str | None = None
    # Signed audit checkpoints: how often (when the head moved), and the syslog destination
    # besides the file ("" none, "/dev/log" or another socket path, or "host:port" UDP).
    audit_checkpoint_s: float = 60.0
    audit_syslog: str = ""
    # Web console sessions (``console.ui``): idle and absolute lifetimes.
    ui_idle_timeout_s: int = 30 * 60
    ui_absolute_timeout_s: int = 12 * 3600
    # Web console single sign-on (SSOConfig's fields), unset: password + TOTP only.
    sso: Mapping[str, Any] | None = field(default=None, hash=False)
    # How often devices governed by a compliance policy are judged again without a
    # check-in (a silent device's check-in age grows; overrides expire).
    compliance_sweep_s: float = 60.0
    # Failed API authentications one client address may make before 429 (then one a second).
    api_failures_per_address: int = 100
    # Renewal before expiry inside the console (console/renewer.py): how often; 0: never.
    renew_interval_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} out of range")
        parts = urlsplit(self.public_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(f"public URL must be https://host[:port], got {self.public_url!r}")
        if not self.db_url.startswith(("sqlite:///", "postgresql+psycopg://")):
            raise ConfigError("database URL must be sqlite:///... or postgresql+psycopg://...")
        if not 1024 <= self.max_body_bytes <= 64 * 1024 * 1024:
            raise ConfigError("max body bytes must be between 1 KiB and 64 MiB")
        if not 1 <= self.long_poll_max_s <= 300:
            raise ConfigError("long-poll maximum must be 1-300 s")
        if not 1 <= self.audit_checkpoint_s <= 24 * 3600:
            raise ConfigError("audit checkpoint interval must be 1 s to 24 h")
        if self.renew_interval_s != 0 and not 10 <= self.renew_interval_s <= 7 * 24 * 3600:
            raise ConfigError("renewal interval must be 0 (off) or 10 s to 7 days")
        self.syslog_address()  # validated now, used by the checkpointer
        if not 1 <= self.ui_idle_timeout_s <= self.ui_absolute_timeout_s <= 7 * 24 * 3600:
            raise ConfigError("web session timeouts: 1 s <= idle <= absolute <= 7 days")
        if not 1 <= self.api_failures_per_address <= 1_000_000:
            raise ConfigError("API failures per address must be 1-1000000")
        if not 0.5 <= self.compliance_sweep_s <= 3600:
            raise ConfigError("compliance sweep interval must be 0.5-3600 s")
        self.pkcs11  # noqa: B018 - validates the token settings now, at startup
        self.sso_config  # noqa: B018 - likewise the single sign-on settings

    @property
    def sso_config(self) -> SSOConfig | None:
        return None if self.sso is None else SSOConfig.parse(self.sso)

    def syslog_address(self) -> str | tuple[str, int] | None:
        """``audit_syslog`` as ``SysLogHandler`` takes it: a socket path or (host, port)."""
        if not self.audit_syslog or self.audit_syslog.startswith("/"):
            return self.audit_syslog or None
        host, _, port = self.audit_syslog.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"audit syslog must be /socket/path or host:port: {self.audit_syslog!r}"
            )
        return host.strip("[]"), int(port)

    @property
    def pkcs11(self) -> TokenConfig | None:
        settings = (self.pkcs11_module, self.pkcs11_token, self.pkcs11_pin_env)
        if not any(settings):
            return None
        module, token, pin_env = settings
        if not (module and token and pin_env):
            raise ConfigError("PKCS#11 needs a module, a token label and a PIN variable together")
        return TokenConfig(module, token, pin_env)

    @property
    def master_key_file(self) -> Path:
        return self.data_dir / MASTER_KEY_FILE

    @property
    def sso_secret_file(self) -> Path:
        """The SSO client secret sealed under the master key (``client_secret_sealed``)."""
        return self.data_dir / SSO_SECRET_FILE

    @property
    def audit_sink(self) -> Path:
        """The append-only file of signed audit checkpoints (outside the database)."""
        return self.data_dir / AUDIT_SINK_FILE

    @property
    def public_host(self) -> str:
        return urlsplit(self.public_url).hostname or "localhost"

    def tls_names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(DNS names, IP addresses) the console's TLS certificate must cover."""
        dns, ips = {"localhost"}, {"127.0.0.1"}
        for host in (self.public_host, self.host):
            try:
                ips.add(str(ipaddress.ip_address(host)))
            except ValueError:
                dns.add(host)
        ips.discard("0.0.0.0")
        return tuple(sorted(dns)), tuple(sorted(ips))


def default_db_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / DB_FILE).resolve()}"
