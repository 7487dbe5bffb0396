"""Access's listener: PROXY protocol v2 from configured load balancers, then TLS, then uvicorn.

A load balancer relaying at Layer 4 (5262/5263) or re-encrypting at Layer 7 (443) hides the
device's address; with ``send-proxy-v2`` it writes a PROXY v2 header (HAProxy's
doc/proxy-protocol.txt) before the TLS handshake. The rule, one function for Access and
the cert proxy (:func:`client_of`):

* a peer inside ``load_balancers`` MUST start with a header; without one it is refused;
* any other peer MUST NOT send one (it could claim any address); it is refused;
* either refusal is logged with the peer's address and the reason.

The header is read on the raw socket, exactly its length (:meth:`bytes_needed`), so the
TLS ClientHello stays in the kernel; the socket is then handed to asyncio's TLS and
uvicorn's HTTP protocol, which sees the relayed client address as ``scope["client"]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import uvicorn

from certgate.access.config import IPNetwork
from certgate.httpserver import TLSAwareH11Protocol, make_server
from certgate.protocol.proxy_protocol import (
    NEED_DATA,
    SIGNATURE,
    ProxyHeaderReader,
    ProxyProtocolError,
    client_address,
    starts_like_header,
)

__all__ = ["ProxiedServer", "client_of", "is_load_balancer", "make_access_server"]

log = logging.getLogger("certgate.access.proxied")
Address = tuple[str, int]
Receive = Callable[[int], Awaitable[bytes]]
ACCEPT_RETRY_S = 0.5


def is_load_balancer(host: str, balancers: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d
    return any(ip in network for network in balancers)


async def client_of(
    peer: Address, balancers: Sequence[IPNetwork], receive: Receive, peek: Receive
) -> Address:
    """Whom this connection is for; raise ProxyProtocolError when it must be refused.

    ``receive(n)`` consumes at most ``n`` bytes; ``peek(n)`` looks at them without
    consuming (b"" when the peer closed)."""
    if not is_load_balancer(peer[0], balancers):
        if starts_like_header(await peek(len(SIGNATURE))):
            raise ProxyProtocolError("a PROXY header from a peer that is not a load balancer")
        return peer
    reader = ProxyHeaderReader()
    while True:
        reader.receive_data(await receive(reader.bytes_needed()))
        event = reader.next_event()
        if event is not NEED_DATA:
            return client_address(event, peer)


class ProxiedH11Protocol(TLSAwareH11Protocol):
    """uvicorn's HTTP/1.1 protocol, reporting the relayed client rather than the balancer."""

    proxied_client: Address | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.proxied_client is not None:
            self.client = self.proxied_client


class _Listening:
    """What uvicorn's shutdown expects of a listener: ``close`` and ``wait_closed``."""

    def __init__(self, sock: socket.socket, accepting: asyncio.Task[None]) -> None:
        self.sock, self.accepting = sock, accepting

    def close(self) -> None:
        self.accepting.cancel()
        self.sock.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.accepting


class ProxiedServer(uvicorn.Server):
    """uvicorn with its own accept loop: the PROXY rule, then TLS, per connection."""

    def __init__(
        self, config: uvicorn.Config, balancers: Sequence[IPNetwork], timeout_s: float
    ) -> None:
        super().__init__(config)
        self.balancers, self.timeout_s = tuple(balancers), timeout_s
        self._connecting: set[asyncio.Task[None]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            raise SystemExit(3)  # uvicorn's STARTUP_FAILURE
        config = self.config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.create_server((config.host, config.port), family=family)
        sock.setblocking(False)
        accepting = asyncio.get_running_loop().create_task(self._accept(sock))
        self.servers = [_Listening(sock, accepting)]  # type: ignore[list-item]
        log.info("access accepting on %s:%s", *sock.getsockname()[:2])
        self.started = True

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and the like: keep serving once it passes
                log.error("accept failed: %s; retrying", exc)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            task = loop.create_task(self._connect(conn, (str(addr[0]), int(addr[1]))))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket, peer: Address) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                client = await client_of(
                    peer,
                    self.balancers,
                    lambda n: loop.sock_recv(conn, n),
                    lambda n: _peek(conn, n),
                )
        except (ProxyProtocolError, TimeoutError, OSError) as exc:
            log.warning("denied connection from %s:%s: %s", *peer, exc or type(exc).__name__)
            conn.close()
            return
        protocol = self._protocol()
        protocol.proxied_client = client
        try:
            await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self.config.ssl, ssl_handshake_timeout=self.timeout_s
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            log.debug("%s:%s (for %s:%s) TLS handshake failed: %r", *peer, *client, exc)
            conn.close()

    def _protocol(self) -> ProxiedH11Protocol:
        protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
        assert isinstance(protocol, ProxiedH11Protocol)
        return protocol


async def _peek(sock: socket.socket, size: int) -> bytes:
    """The first bytes waiting on ``sock`` without consuming them (b"" once closed)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return sock.recv(size, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        readable = loop.create_future()

        def wake(future: asyncio.Future[None] = readable) -> None:
            if not future.done():
                future.set_result(None)

        loop.add_reader(sock.fileno(), wake)
        try:
            await readable
        finally:
            loop.remove_reader(sock.fileno())


def make_access_server(
    app: Any,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    balancers: Sequence[IPNetwork],
    timeout_s: float = 10.0,
    **options: Any,
) -> ProxiedServer:
    """Like :func:`certgate.httpserver.make_server`, with the PROXY rule before TLS."""
    config = make_server(app, host, port, ssl_context, **options).config
    config.http_protocol_class = ProxiedH11Protocol
    return ProxiedServer(config, balancers, timeout_s)
