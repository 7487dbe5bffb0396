"""The device agent's local KDC proxy endpoint (``certgate device run --kdc-proxy``).

MIT ``kinit`` speaks MS-KKDCP only to ``https://`` URLs (``kdc = https://HOST:PORT/KdcProxy``)
and cannot present a client certificate, so the agent serves HTTPS on loopback and relays
each ``POST`` body, a ``KDC-PROXY-MESSAGE``, through the device's mutually authenticated
tunnel to the node's KDC proxy (``certgate.tunnel.kdcproxy``), which admits the device by
its certificate. The TLS identity here is local: a key generated in memory at start (loaded
through ``tlsconf.load_identity``, never written in clear) and a self-signed certificate
for the loopback address, written as ``kdc-proxy-anchor.pem`` in the state directory for
krb5.conf's ``http_anchors = FILE:...``. It is no certgate PKI certificate: it only lets
kinit know it talks to this agent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

import h11
from cryptography import x509

from certgate.device.listeners import ListenAddress
from certgate.device.tunnel_client import TunnelClient, TunnelError, TunnelRefused
from certgate.errors import ConfigError
from certgate.pki.authority import Authority, Names
from certgate.pki.keys import PrivateKey, generate_key
from certgate.pki.profiles import LOOPBACK_TLS
from certgate.tlsconf import pem_of, server_context
from certgate.tunnel.kdcproxy import (
    KDC_LIMITS,
    KDC_PROXY_HOST,
    KDC_PROXY_PORT,
    frame,
    frame_need,
)
from certgate.tunnel.persist import atomic_write

log = logging.getLogger("certgate.device")

ANCHOR_FILE = "kdc-proxy-anchor.pem"
KDC_PROXY_PATH = "/KdcProxy"
REQUEST_TIMEOUT_S = 30.0  # one kinit request: read, relay, answer
MAX_HEAD_BYTES = 16 * 1024


class KDCProxyEndpoint:
    """HTTPS on loopback: each ``POST /KdcProxy`` relayed through the tunnel as ``app``."""

    def __init__(self, tunnel: Callable[[], TunnelClient], app: str, anchor: Path) -> None:
        self.tunnel, self.app, self.anchor = tunnel, app, anchor
        self.server: asyncio.Server | None = None

    async def listen(self, address: ListenAddress) -> ListenAddress:
        if not _loopback_ip(address.host):
            raise ConfigError(f"the KDC proxy listens on a loopback IP only, not {address}")
        key = generate_key()
        cert = loopback_certificate(key, address.host)
        atomic_write(self.anchor, pem_of([cert]), mode=0o644)  # public: kinit reads it
        context = server_context([cert], key, alpn=["http/1.1"])
        self.server = await asyncio.start_server(
            self._serve, address.host, address.port, ssl=context, limit=MAX_HEAD_BYTES
        )
        bound = ListenAddress(address.host, self.server.sockets[0].getsockname()[1])
        log.info(
            "kdc proxy listening on https://%s%s (anchor %s)", bound, KDC_PROXY_PATH, self.anchor
        )
        return bound

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status, body = await self._answer(reader)
            writer.write(response(status, body))
            await writer.drain()
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            log.info("kdc proxy: request dropped (%s: %s)", type(exc).__name__, exc)
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        method, target, message = await read_request(reader)
        if method != b"POST" or target != KDC_PROXY_PATH.encode():
            return _error(404, "not_found", "only POST /KdcProxy is served here")
        if message is None:
            return _error(
                413, "too_large", f"a KDC proxy message is at most {KDC_LIMITS.max_message} bytes"
            )
        try:
            return 200, await self.relay(message)
        except TunnelRefused as exc:
            log.warning("kdc proxy: refused by the tunnel (%d %s)", exc.status, exc.reason)
            return _error(exc.status, exc.reason, "the tunnel refused this KDC request")
        except (TunnelError, OSError, asyncio.IncompleteReadError) as exc:
            log.warning("kdc proxy: tunnel failed: %s", exc)
            return _error(502, "tunnel_failed", str(exc))

    async def relay(self, message: bytes) -> bytes:
        """The node's KKDCP answer to ``message``, through the device's tunnel."""
        upstream = await self.tunnel().open(
            self.app, KDC_PROXY_HOST, KDC_PROXY_PORT, early=frame(message)
        )
        try:
            answer = bytearray(upstream.initial)
            while need := frame_need(answer, KDC_LIMITS.max_message):
                answer += await upstream.reader.readexactly(need)
        finally:
            upstream.writer.transport.abort()
        return bytes(answer[4:])


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes, bytes | None]:
    """Method, target and body of one HTTP request (body None: over the size bound)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    body = bytearray()
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > KDC_LIMITS.max_message:
                assert request is not None
                return request.method, request.target, None
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request.method, request.target, bytes(body)
        else:  # ConnectionClosed before a whole request
            raise h11.RemoteProtocolError("client closed before a whole request")


def response(status: int, body: bytes) -> bytes:
    kind = "application/kerberos" if status == 200 else "application/json"
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _error(status: int, code: str, detail: str) -> tuple[int, bytes]:
    return status, json.dumps({"error": code, "detail": detail}).encode()


def _loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_certificate(key: PrivateKey, host: str) -> x509.Certificate:
    """A self-signed serverAuth certificate for ``host`` (a loopback IP) and localhost,
    signed where every certificate is (``pki.authority``)."""
    names = Names("certgate device KDC proxy", dns_names=("localhost",), ip_addresses=(host,))
    return Authority().self_signed_leaf(key, names, LOOPBACK_TLS)
