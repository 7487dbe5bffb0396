"""The cert proxy's forwarding policy, without I/O: which requests pass, and with which fields.

* Only origin-form ``GET`` of the certificate step passes (RFC 9112 §3.2.1): the client
  chooses neither the destination, which is forced, nor the resource.
* Fields a client could use to impersonate the proxy are dropped: ``Client-Cert*`` in any
  spelling (RFC 9440 §3), forwarding fields, hop-by-hop fields (RFC 9110 §7.6.1) and the
  fields ``Connection`` names. The proxy then adds its own: ``Host`` of the forced
  destination, the source address as ``Forwarded`` (RFC 7239) and ``X-Forwarded-For``, and
  the verified device certificate as ``Client-Cert`` / ``Client-Cert-Chain``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from cryptography import x509

from certgate.errors import CertgateError
from certgate.protocol.client_cert_header import (
    CLIENT_CERT,
    CLIENT_CERT_CHAIN,
    encode_client_cert,
    encode_client_cert_chain,
    strip_client_cert_headers,
)

__all__ = [
    "ALLOWED_PATHS",
    "Headers",
    "Refusal",
    "check_request",
    "downstream_headers",
    "forwarded_element",
    "upstream_headers",
]

ALLOWED_PATHS = ("/authorize/cert",)
ALLOWED_METHODS = (b"GET",)
# RFC 9110 §7.6.1 hop-by-hop fields, plus the framing h11 sets itself and Host (forced).
_HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-connection te trailer transfer-encoding upgrade "
    b"proxy-authorization proxy-authenticate content-length host".split()
)
# Fields only a trusted hop may set; a client sending them is trying to spoof one.
_FORWARDING = frozenset(
    b"forwarded x-forwarded-for x-forwarded-host x-forwarded-proto x-forwarded-port "
    b"x-real-ip x-client-ip true-client-ip via remoteport x-ssl-client-cert ssl-client-cert "
    b"x-client-cert x-client-verify".split()
)
_HOST_RE = re.compile(rb"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")

Headers = list[tuple[bytes, bytes]]


class Refusal(CertgateError):
    """The proxy answers this request itself, with ``status`` and a reason."""

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason


def _fold(name: bytes) -> bytes:
    """Compare names as ASCII with "_" folded to "-" (CGI maps both to one variable)."""
    return name.strip(b" \t").lower().replace(b"_", b"-")


def check_request(method: bytes, target: bytes) -> None:
    """Only origin-form ``GET`` of an allowed path (RFC 9112 §3.2.1): the client chooses
    neither the destination nor the resource."""
    if not target.startswith(b"/"):
        raise Refusal(400, "invalid_request", "only origin-form targets; the destination is fixed")
    if method not in ALLOWED_METHODS:
        raise Refusal(405, "method_not_allowed", f"method {method.decode('latin-1')} not allowed")
    path = target.split(b"?", 1)[0].decode("latin-1")
    if path not in ALLOWED_PATHS:
        raise Refusal(404, "not_found", f"the cert proxy serves only {', '.join(ALLOWED_PATHS)}")


def _quote(value: str) -> str:
    """RFC 7230 §3.2.6 quoted-string (RFC 7239 §4 values with ':' or '[' must be quoted)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def forwarded_element(client: tuple[str, int], host: bytes | None, proto: str = "https") -> str:
    """One RFC 7239 §4 forwarded-element for the connection's source address."""
    ip = ipaddress.ip_address(client[0])
    node = f"[{ip}]:{client[1]}" if ip.version == 6 else f"{ip}:{client[1]}"
    parts = [f"for={_quote(node)}", f"proto={proto}"]
    if host is not None and _HOST_RE.fullmatch(host):
        parts.append(f"host={_quote(host.decode('ascii'))}")
    return ";".join(parts)


def _connection_options(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Field names listed in ``Connection`` are hop-by-hop too (RFC 9110 §7.6.1)."""
    names: set[bytes] = set()
    for name, value in headers:
        if _fold(name) == b"connection":
            names |= {_fold(option) for option in value.split(b",") if option.strip()}
    return names


def _without_hop_by_hop(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    options = _connection_options(headers)
    return [
        (name, value)
        for name, value in headers
        if _fold(name) not in _HOP_BY_HOP and _fold(name) not in options
    ]


def upstream_headers(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    authority: bytes,
    client: tuple[str, int],
    leaf: x509.Certificate | None,
    chain: Sequence[x509.Certificate],
) -> Headers:
    """The request fields Access receives: the client's, cleaned, plus ours."""
    host = next((v for n, v in headers if _fold(n) == b"host"), None)
    kept = [
        (name, value)
        for name, value in strip_client_cert_headers(_without_hop_by_hop(headers))
        if _fold(name) not in _FORWARDING
    ]
    ours: Headers = [
        (b"host", authority),
        (b"forwarded", forwarded_element(client, host).encode("ascii")),
        (b"x-forwarded-for", str(ipaddress.ip_address(client[0])).encode("ascii")),
        (b"x-forwarded-proto", b"https"),
        (b"connection", b"close"),
    ]
    if leaf is not None:
        ours.append((CLIENT_CERT.lower().encode(), encode_client_cert(leaf).encode("ascii")))
        if chain:  # RFC 9440 §2.2: the chain excludes the leaf; omitted when empty
            value = encode_client_cert_chain(list(chain)).encode("ascii")
            ours.append((CLIENT_CERT_CHAIN.lower().encode(), value))
    return ours + kept


def downstream_headers(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Response fields passed back to the client (framing is set again by h11)."""
    return _without_hop_by_hop(headers)
