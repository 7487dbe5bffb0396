"""Run an ASGI app on uvicorn with our SSLContext, exposing the peer certificate.

uvicorn does not implement the ASGI TLS extension, so ``TLSAwareH11Protocol`` adds
``scope["extensions"]["tls"]`` per connection (ASGI spec, "TLS Extension"): the verified
client leaf, as PEM, in ``client_cert_chain``. The handshake, and so verification, is
complete when ``connection_made`` runs (asyncio's SSL protocol calls it afterwards).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

TLS_EXTENSION = "tls"

ASGIApp = Any


def tls_scope(ssl_object: ssl.SSLObject | None) -> dict[str, Any]:
    if ssl_object is None:
        return {}
    der = ssl_object.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    version = ssl_object.version()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": version,
        "cipher_suite": (ssl_object.cipher() or ("",))[0],
    }


class _WithTLS:
    """Per-connection wrapper putting the connection's TLS facts into every scope."""

    def __init__(self, app: ASGIApp, tls: dict[str, Any]) -> None:
        self._app = app
        self._tls = tls

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope)
            scope["extensions"] = {**scope.get("extensions", {}), TLS_EXTENSION: self._tls}
        await self._app(scope, receive, send)


class TLSAwareH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _WithTLS(self.app, tls_scope(transport.get_extra_info("ssl_object")))


def peer_cert_der(scope: Mapping[str, Any]) -> bytes | None:
    """The verified client leaf of this request's connection, or None."""
    chain = scope.get("extensions", {}).get(TLS_EXTENSION, {}).get("client_cert_chain") or []
    return ssl.PEM_cert_to_DER_cert(chain[0]) if chain else None


def make_server(
    app: ASGIApp, host: str, port: int, ssl_context: ssl.SSLContext, **options: Any
) -> uvicorn.Server:
    """A uvicorn server for ``app`` using exactly ``ssl_context`` (not uvicorn's files)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=TLSAwareH11Protocol,
        ws="none",
        lifespan="on",
        server_header=False,
        log_config=None,
        **options,
    )
    config.load()
    config.ssl = ssl_context
    return uvicorn.Server(config)
