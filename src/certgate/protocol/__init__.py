"""Sans-IO protocol codecs: bytes in, events out; no asyncio, ssl or sockets here.

- :mod:`certgate.protocol.http_proxy`: HTTP/1.1 forward-proxy request heads (CONNECT and
  absolute-form), response heads, and the origin-form head to forward.
- :mod:`certgate.protocol.socks5`: SOCKS5 (RFC 1928) CONNECT without authentication.
- :mod:`certgate.protocol.client_cert_header`: RFC 9440 Client-Cert header fields.
- :mod:`certgate.protocol.datagram`: UDP datagrams framed by flow inside a tunnel stream.

Each codec raises its own error family, rooted in :class:`certgate.errors.BadRequest` and
carrying the HTTP status or SOCKS reply code the asyncio shell should answer with.
"""

from __future__ import annotations

__all__ = ["client_cert_header", "datagram", "http_proxy", "socks5"]
