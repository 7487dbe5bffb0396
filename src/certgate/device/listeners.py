"""The agent's local listeners: SOCKS5 and HTTP proxy, routing by the device rules.

This is the asyncio shell; the protocols are parsed by the sans-IO codecs in
``certgate.protocol`` (``Socks5Server``, ``HTTPProxyParser``). Per connection::

    accept -> head parsed (bounded time) -> app attributed -> rule evaluated (pure)
      tunnel: Per-App Tunnel CONNECT over mTLS, naming the app
      bypass: direct TCP connection from this device
      block:  refused at once, no connection attempted
    -> reply -> relay with back-pressure until both sides finish, or idle timeout

App attribution: a per-app port belongs to one app; on the shared HTTP listener a client
may name its app in ``Certgate-App`` or as the proxy URL's user name
(``http://com.example.app:app@127.0.0.1:3128``, sent as ``Proxy-Authorization: Basic``;
the password is ignored, but some clients, requests among them, send the header only when
there is one), otherwise the listener's default app applies. SOCKS carries no app: the
default applies. Failure-to-reply mapping (SOCKS REP and HTTP status) lives in one place,
``_refusal``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from certgate.addresses import ListenAddress, authority
from certgate.device.rules import Action, DeviceRules
from certgate.device.tunnel_client import (
    TunnelClient,
    TunnelError,
    TunnelRefused,
    TunnelUnreachable,
    Upstream,
)
from certgate.device.udp import SocksAssociation, UDPForward, UDPForwardSpec
from certgate.errors import CertgateError
from certgate.pki.identity import BUNDLE_ID_RE
from certgate.protocol import socks5
from certgate.protocol.http_proxy import NEED_DATA as HTTP_NEED_DATA
from certgate.protocol.http_proxy import (
    HTTPProxyError,
    HTTPProxyParser,
    ProxyRequest,
    app_of,
    error_response,
    origin_request_head,
    response_head,
)

__all__ = [
    "Blocked",
    "DirectFailed",
    "ListenAddress",
    "Misattributed",
    "ProxyServer",
    "RouteDecision",
    "Router",
    "Timeouts",
    "app_from_proxy_authorization",
    "attribute",
]

log = logging.getLogger("certgate.device")
READ_CHUNK = 64 * 1024
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a TCP RST


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Bounds on everything a local client or a remote peer controls."""

    head_s: float = 10.0
    connect_s: float = 10.0
    idle_s: float = 300.0


# -- routing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteDecision:
    app: str
    host: str
    port: int
    action: Action
    rule_index: int | None

    @property
    def rule(self) -> str:
        if self.rule_index is None:
            return f"the default device rule ({self.action.value})"
        return f"device rule {self.rule_index} ({self.action.value})"


class Blocked(CertgateError):
    """The device rules block this app from this destination."""

    def __init__(self, decision: RouteDecision) -> None:
        super().__init__(
            f"blocked by {decision.rule}: app {decision.app} may not reach "
            f"{authority(decision.host, decision.port)}"
        )
        self.decision = decision


class DirectFailed(CertgateError):
    """A bypass connection failed; ``kind`` is unresolvable, refused, timeout or unreachable."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Misattributed(CertgateError):
    """A request on a per-app port names a different app."""


class Router:
    """Rules plus the tunnel client; both are swapped together when a profile renews."""

    def __init__(self, rules: DeviceRules, tunnel: TunnelClient, timeouts: Timeouts) -> None:
        self.rules, self.tunnel, self.timeouts = rules, tunnel, timeouts

    def swap(self, rules: DeviceRules, tunnel: TunnelClient) -> None:
        # Reload by swapping: connections already open keep the objects they started with.
        self.rules, self.tunnel = rules, tunnel

    def decide(self, app: str, host: str, port: int) -> RouteDecision:
        match = self.rules.evaluate(app, host)
        return RouteDecision(app, host, port, match.action, match.rule_index)

    async def open(self, app: str, host: str, port: int) -> tuple[RouteDecision, Upstream]:
        decision = self.decide(app, host, port)
        dest = authority(host, port)
        if decision.action is Action.BLOCK:
            log.warning("block app=%s dest=%s rule=%s", app, dest, decision.rule)
            raise Blocked(decision)
        if decision.action is Action.TUNNEL:
            tunnel = self.tunnel
            upstream = await tunnel.open(app, host, port)
        else:
            upstream = await direct_connection(host, port, self.timeouts.connect_s)
        log.info(
            "route app=%s dest=%s action=%s rule=%s via=%s",
            app,
            dest,
            decision.action.value,
            decision.rule,
            upstream.via,
        )
        return decision, upstream


async def direct_connection(host: str, port: int, timeout_s: float) -> Upstream:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except socket.gaierror as exc:
        raise DirectFailed("unresolvable", f"cannot resolve {host}: {exc.strerror}") from exc
    except ConnectionRefusedError as exc:
        raise DirectFailed("refused", f"{authority(host, port)} refused the connection") from exc
    except TimeoutError as exc:
        raise DirectFailed("timeout", f"connecting to {authority(host, port)} timed out") from exc
    except OSError as exc:
        raise DirectFailed("unreachable", f"cannot reach {authority(host, port)}: {exc}") from exc
    return Upstream(reader, writer, b"", "direct")


# -- attribution (pure) ---------------------------------------------------------------------


def app_from_proxy_authorization(value: str | None) -> str | None:
    """The user name of ``Proxy-Authorization: Basic`` (RFC 7617 §2), if it is a bundle id.

    This is attribution, not authentication: any local process can name any app, exactly
    as it could connect to that app's port.
    """
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user = decoded.partition(":")[0]
    return user if BUNDLE_ID_RE.fullmatch(user) else None


def attribute(request: ProxyRequest, port_app: str | None, default_app: str) -> str:
    """Which app a request belongs to (see the module docstring); raises Misattributed."""
    claimed = app_of(request) or app_from_proxy_authorization(
        request.headers.get("proxy-authorization")
    )
    if port_app is not None:
        if claimed is not None and claimed != port_app:
            raise Misattributed(f"this port belongs to {port_app}, not {claimed}")
        return port_app
    return claimed or default_app


# -- replies ----------------------------------------------------------------------------------


def _refusal(exc: CertgateError) -> tuple[int, socks5.ReplyCode]:
    """HTTP status (RFC 9110 §15) and SOCKS REP (RFC 1928 §6) for a destination not opened."""
    reply = socks5.ReplyCode
    if isinstance(exc, Blocked | Misattributed):
        return 403, reply.NOT_ALLOWED_BY_RULESET
    if isinstance(exc, TunnelRefused):
        status = exc.status if exc.status in (403, 502, 503, 504) else 502
        code = {403: reply.NOT_ALLOWED_BY_RULESET, 503: reply.GENERAL_FAILURE}
        return status, code.get(status, reply.HOST_UNREACHABLE)
    if isinstance(exc, TunnelUnreachable):
        return 502, reply.NETWORK_UNREACHABLE
    if isinstance(exc, DirectFailed):
        if exc.kind == "refused":
            return 502, reply.CONNECTION_REFUSED
        return (504 if exc.kind == "timeout" else 502), reply.HOST_UNREACHABLE
    return 502, reply.GENERAL_FAILURE


def _log_failure(
    listener: str,
    app: str,
    request: socks5.ConnectRequest | ProxyRequest,
    exc: CertgateError,
) -> None:
    if not isinstance(exc, Blocked):  # the router logged the block with its rule
        dest = authority(request.host, request.port)
        log.warning("%s: app=%s dest=%s failed: %s", listener, app, dest, exc)


def reset(writer: asyncio.StreamWriter) -> None:
    """End a client's connection with a TCP reset. A relay that did not end cleanly (the
    tunnel reset it, as it does when policy closes a tunnel; an idle timeout; an error)
    must not look complete to the client: a FIN would, to any protocol without framing
    of its own. The client then sees what a client of the tunnel itself sees."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    writer.transport.abort()


def text_response(status: int, text: str) -> bytes:
    body = f"certgate: {text}\n".encode()
    fields = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    return response_head(status, headers=fields) + body


# -- relay --------------------------------------------------------------------------------------


class _Relay:
    """Both directions of one connection; ends on error, when both finish, or when idle."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.last_activity = time.monotonic()
        self.bytes = [0, 0]

    async def _pump(self, index: int, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(READ_CHUNK):
            self.last_activity = time.monotonic()
            self.bytes[index] += len(data)
            dst.write(data)
            await dst.drain()  # back-pressure: read no more until the sink has drained
        if dst.can_write_eof():
            dst.write_eof()  # half-close; TLS cannot, so the other direction ends it

    async def run(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: Upstream,
        close_after_response: bool,
    ) -> bool:
        """Relay until done; True if both directions ended cleanly (nothing to abort)."""
        up = asyncio.ensure_future(self._pump(0, client[0], upstream.writer))
        down = asyncio.ensure_future(self._pump(1, upstream.reader, client[1]))
        pending = {up, down}
        try:
            while pending:
                timeout = self.idle_s - (time.monotonic() - self.last_activity)
                done, pending = await asyncio.wait(
                    pending, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED
                )
                if not done and time.monotonic() - self.last_activity >= self.idle_s:
                    return False
                if [t for t in done if t.exception() is not None]:
                    return False
                if close_after_response and down in done:
                    return True
            return True
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


# -- the server ---------------------------------------------------------------------------------


async def _read_before(reader: asyncio.StreamReader, deadline: float) -> bytes:
    return await asyncio.wait_for(reader.read(READ_CHUNK), max(deadline - time.monotonic(), 0))


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ProxyServer:
    """The agent's listeners: SOCKS5, HTTP, and one HTTP port per app."""

    def __init__(
        self,
        router: Router,
        *,
        default_app: str,
        max_connections: int = 1024,
    ) -> None:
        self.router = router
        self.default_app = default_app
        self.max_connections = max_connections
        self.servers: list[asyncio.Server] = []
        self.bound: dict[str, ListenAddress] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.forwards: list[UDPForward] = []

    async def listen_udp(self, spec: UDPForwardSpec) -> None:
        """A local UDP port for ``spec.app``, forwarding to ``spec.host:spec.port``."""
        idle_s = self.router.timeouts.idle_s
        transport, forward = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: UDPForward(self.router, spec.app, spec.host, spec.port, idle_s),
            local_addr=(spec.listen.host, spec.listen.port),
        )
        self.forwards.append(forward)
        name = f"udp:{spec.app}"
        self.bound[name] = ListenAddress(spec.listen.host, transport.get_extra_info("sockname")[1])
        log.info("%s listening on %s for %s", name, self.bound[name], spec.host)

    async def listen_socks(self, address: ListenAddress) -> None:
        await self._listen("socks", address, self._serve_socks)

    async def listen_http(self, address: ListenAddress, app: str | None = None) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve_http(reader, writer, app)

        await self._listen(f"app:{app}" if app else "http", address, serve)

    async def _listen(self, name: str, address: ListenAddress, handler: Handler) -> None:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            if len(self.tasks) >= self.max_connections:
                log.warning("refuse %s client: %d connections open", name, len(self.tasks))
                writer.transport.abort()
                return
            self.tasks.add(task)  # kept so that close() can end every connection
            try:
                await handler(reader, writer)
                writer.close()
            except (ConnectionError, TimeoutError, OSError) as exc:
                log.debug("%s client ended: %r", name, exc)
            finally:
                self.tasks.discard(task)
                if not writer.is_closing():
                    writer.transport.abort()

        server = await asyncio.start_server(tracked, address.host, address.port)
        self.servers.append(server)
        sockname = server.sockets[0].getsockname()
        self.bound[name] = ListenAddress(address.host, sockname[1])
        log.info("%s listening on %s", name, self.bound[name])

    async def close(self) -> None:
        for forward in self.forwards:
            forward.close()
        for server in self.servers:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for server in self.servers:
            await server.wait_closed()

    # -- SOCKS5 (RFC 1928) ------------------------------------------------------------------

    async def _serve_socks(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        server = socks5.Socks5Server()
        deadline = time.monotonic() + self.router.timeouts.head_s
        try:
            request = await self._socks_request(server, reader, writer, deadline)
        except socks5.Socks5Error as exc:
            log.info("socks: refusing malformed request: %s", exc)
            writer.write(socks5.error_reply(exc))
            return
        if request is None:
            return
        if isinstance(request, socks5.UDPAssociateRequest):
            await self._associate(server, reader, writer)
            return
        try:
            _, upstream = await self.router.open(self.default_app, request.host, request.port)
        except (Blocked, TunnelError, DirectFailed) as exc:
            writer.write(server.send(socks5.CommandReply(_refusal(exc)[1])))
            _log_failure("socks", self.default_app, request, exc)
            await writer.drain()
            return
        writer.write(server.send(socks5.CommandReply(socks5.ReplyCode.SUCCEEDED)))
        await self._relay(reader, writer, upstream, server.trailing_data, False)

    async def _socks_request(
        self,
        server: socks5.Socks5Server,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        deadline: float,
    ) -> socks5.ConnectRequest | socks5.UDPAssociateRequest | None:
        while True:
            event = server.next_event()
            if event is socks5.NEED_DATA:
                server.receive_data(await _read_before(reader, deadline))
            elif isinstance(event, socks5.Greeting):
                selection = socks5.choose_method(event)
                writer.write(server.send(selection))
                if selection.method == socks5.Method.NO_ACCEPTABLE_METHODS:
                    return None  # RFC 1928 §3: the client must now close
            elif isinstance(event, socks5.ConnectRequest | socks5.UDPAssociateRequest):
                return event
            else:
                return None  # closed between messages

    async def _associate(
        self,
        server: socks5.Socks5Server,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """UDP ASSOCIATE (RFC 1928 §7): a relay socket on the listener's own address, kept
        while the TCP connection stays open."""
        local_host = writer.get_extra_info("sockname")[0]
        client_host = writer.get_extra_info("peername")[0]
        transport, association = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: SocksAssociation(self.router, self.default_app, client_host),
            local_addr=(local_host, 0),
        )
        try:
            bound = transport.get_extra_info("sockname")
            reply = socks5.CommandReply(socks5.ReplyCode.SUCCEEDED, bound[0], bound[1])
            writer.write(server.send(reply))
            await writer.drain()
            while await reader.read(READ_CHUNK):
                pass  # nothing is expected on the control connection but its end
        finally:
            association.close()

    # -- HTTP proxy (RFC 9110 §9.3.6 CONNECT, RFC 9112 §3.2.2 absolute-form) ----------------

    async def _serve_http(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port_app: str | None
    ) -> None:
        parser = HTTPProxyParser()
        try:
            request = await self._http_request(parser, reader)
        except HTTPProxyError as exc:
            log.info("http: refusing malformed request: %s", exc)
            writer.write(error_response(exc))
            return
        except TimeoutError:
            writer.write(text_response(408, "request head not received in time"))
            return
        if request is None:
            return
        reply = await self._http_open(request, port_app)
        if isinstance(reply, bytes):
            writer.write(reply)
            await writer.drain()
            return
        if request.method == "CONNECT":
            writer.write(response_head(200, "Connection established"))
        else:
            reply.writer.write(origin_request_head(request, via="certgate-device"))
        await self._relay(reader, writer, reply, parser.trailing_data, request.method != "CONNECT")

    async def _http_request(
        self, parser: HTTPProxyParser, reader: asyncio.StreamReader
    ) -> ProxyRequest | None:
        deadline = time.monotonic() + self.router.timeouts.head_s
        while True:
            event = parser.next_event()
            if isinstance(event, ProxyRequest):
                return event
            if event is not HTTP_NEED_DATA:
                return None  # closed before a request
            parser.receive_data(await _read_before(reader, deadline))

    async def _http_open(self, request: ProxyRequest, port_app: str | None) -> Upstream | bytes:
        """The upstream for ``request``, or the complete refusal to send instead."""
        try:
            app = attribute(request, port_app, self.default_app)
        except HTTPProxyError as exc:
            return error_response(exc)
        except Misattributed as exc:
            return text_response(403, str(exc))
        if request.scheme == "https":
            return text_response(400, "use CONNECT for https:// destinations")
        try:
            return (await self.router.open(app, request.host, request.port))[1]
        except (Blocked, TunnelError, DirectFailed) as exc:
            _log_failure("http", app, request, exc)
            return text_response(_refusal(exc)[0], str(exc))

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: Upstream,
        client_trailing: bytes,
        close_after_response: bool,
    ) -> None:
        clean = False
        try:
            if upstream.initial:
                writer.write(upstream.initial)
            if client_trailing:
                upstream.writer.write(client_trailing)
            relay = _Relay(self.router.timeouts.idle_s)
            clean = await relay.run((reader, writer), upstream, close_after_response)
            log.debug("relay via %s ended: %d bytes up, %d down", upstream.via, *relay.bytes)
        finally:
            # A clean end may still have bytes queued: close flushes them. Otherwise the
            # peer may never read them, and abort is the only bounded ending.
            upstream.writer.close() if clean else upstream.writer.transport.abort()
            if not clean:
                reset(writer)
