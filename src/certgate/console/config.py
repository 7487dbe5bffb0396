"""Console configuration: parsed once, frozen, validated at startup."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from certgate.errors import ConfigError

DEFAULT_PORT = 7443
MASTER_KEY_FILE = "master.key"
DB_FILE = "console.db"


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
    # How often devices governed by a compliance policy are judged again without a
    # check-in (a silent device's check-in age grows; overrides expire).
    compliance_sweep_s: float = 60.0

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
        if not 0.5 <= self.compliance_sweep_s <= 3600:
            raise ConfigError("compliance sweep interval must be 0.5-3600 s")

    @property
    def master_key_file(self) -> Path:
        return self.data_dir / MASTER_KEY_FILE

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
