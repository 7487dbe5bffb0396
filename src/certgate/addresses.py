"""``HOST:PORT`` listen addresses, parsed once, for every listener certgate opens."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from certgate.errors import ConfigError


def authority(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals in brackets (RFC 3986 §3.2.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        host, _, port = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"listen address must be HOST:PORT, got {text!r}")
        return cls(host, int(port))

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return authority(self.host, self.port)
