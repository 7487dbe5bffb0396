"""CertProxy: terminates the device's TLS on 5262 (and 5263) and forwards the certificate
step to its Access service with the verified client certificate in RFC 9440 fields.

* Listeners ask for a client certificate and verify it against the Device Roots in use
  only (OpenSSL partial chains, so a sibling intermediate of the console Root cannot pass;
  two during a Device Root rotation, ``certgate.access.trust``), then check it again with
  ``certgate.pki.verify`` for its issuer and ``clientAuth`` usage. A
  connection without a certificate is forwarded without one, so that Access sends the
  refusal back to the relying party; a certificate that does not verify ends the handshake
  with its TLS alert (``unknown_ca``, ``certificate_expired``...), logged with the reason.
* The destination is forced: requests go to the one Access address given at startup, over
  mTLS with the proxy's own client certificate (which Access pins), and Access's serving
  certificate is pinned in turn: the public leaf, or (offloaded) the install root, which
  issues no other server certificate than Access's, renewals included.
* Certificates and trust change live (:meth:`CertProxy.swap`, by
  ``certgate.certproxy.reload``): contexts are built aside and swapped; a connection keeps
  the context it was accepted with. What passes, and with which fields, is decided by
  :mod:`certgate.certproxy.forwarding`.
* Header sizes, bodies, responses, handshakes, reads and connection counts are bounded.

This is the asyncio shell: TLS runs over memory BIOs (:class:`TLSStream`) so that a refused
handshake is seen here and its alert reaches the client, and h11 parses HTTP/1.1 on both
sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
from cryptography import x509
from prometheus_client import CONTENT_TYPE_LATEST

from certgate.access.config import IPNetwork
from certgate.access.proxied import client_of
from certgate.access.trust import DeviceRootSet
from certgate.certproxy.forwarding import (
    ALLOWED_PATHS,
    Headers,
    Refusal,
    check_request,
    downstream_headers,
    upstream_headers,
)
from certgate.errors import ChainError
from certgate.httperrors import classify
from certgate.metrics import UNMATCHED, HttpMetrics, RouteSeries, loopback
from certgate.pki.keys import PrivateKey
from certgate.pki.thumbprint import thumbprint
from certgate.protocol.proxy_protocol import ProxyProtocolError
from certgate.tlsconf import ClientAuth, client_context, server_context

__all__ = [
    "CertProxy",
    "Limits",
    "Listener",
    "TLSStream",
    "Upstream",
    "listener_context",
    "upstream_context",
]

log = logging.getLogger("certgate.certproxy")
LOCAL_PATHS = ("/livez", "/healthz", "/metrics")  # answered by the proxy, never forwarded
# What a forwarded request is answered, each status's series at 0 from the start: Access's
# certificate step (302 to the client, 400 invalid_request, 403, 429, 503) and the proxy's
# own refusals (403 certificate_rejected, 413, 502 Access unreachable, 500/503 classify).
FORWARDED_STATUSES = (302, 400, 403, 413, 429, 500, 502, 503)
SERIES = (
    *(RouteSeries(path, ("GET",), FORWARDED_STATUSES) for path in ALLOWED_PATHS),
    RouteSeries("/livez", ("GET",), (200,)),
    RouteSeries("/healthz", ("GET",), (200, 503)),
    RouteSeries("/metrics", ("GET",), (200, 403)),  # 403: not from loopback
)
READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 16 * 1024
    max_response_bytes: int = 256 * 1024
    handshake_timeout_s: float = 10.0
    read_timeout_s: float = 15.0
    upstream_timeout_s: float = 15.0
    max_connections: int = 512
    max_requests_per_connection: int = 100


@dataclass(frozen=True, slots=True)
class Upstream:
    """The one Access service this proxy may reach."""

    host: str
    port: int
    ssl_context: ssl.SSLContext
    pinned_thumbprint: str  # of the one certificate ``ssl_context`` trusts (for the logs)

    @property
    def authority(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}".encode("ascii")


@dataclass(slots=True)
class Listener:
    name: str
    host: str
    port: int
    ssl_context: ssl.SSLContext  # replaced by ``CertProxy.swap``; read at each accept


def listener_context(
    chain: Sequence[x509.Certificate], key: PrivateKey, device_roots: Sequence[x509.Certificate]
) -> ssl.SSLContext:
    """Present ``chain``; ask for a client certificate and verify it against the Device
    Roots, each a trust anchor of its own (partial chain), so only their leaves pass."""
    return server_context(
        chain,
        key,
        client_cas=list(device_roots),
        client_auth=ClientAuth.OPTIONAL,
        alpn=["http/1.1"],
        anchor_is_issuer=True,
    )


def upstream_context(
    access_anchor: x509.Certificate, proxy_cert: x509.Certificate, proxy_key: PrivateKey
) -> ssl.SSLContext:
    """mTLS to Access: present the proxy certificate; trust only ``access_anchor``.

    The anchor is the only trust anchor (partial chain): Access's public leaf itself, or
    the install root, whose only server certificate is Access's (renewed ones too); no
    other certificate, however issued, can stand in for Access, so a host name check adds
    nothing and is off (the proxy dials an address, not a name).
    """
    ctx = client_context([access_anchor], chain=[proxy_cert], key=proxy_key, alpn=["http/1.1"])
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.check_hostname = False
    return ctx


class TLSStream:
    """Server-side TLS over a plain stream, through memory BIOs (the ``ssl`` module's
    sans-IO interface): every record OpenSSL produces, alerts included, is sent."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ctx: ssl.SSLContext,
        timeout_s: float,
        initial: bytes = b"",
    ) -> None:
        """``initial``: bytes of the stream already read from ``reader`` (a peek)."""
        self._reader, self._writer, self._timeout = reader, writer, timeout_s
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._incoming.write(initial)
        self.received_any = bool(initial)

    async def handshake(self) -> None:
        """Complete the handshake or raise (``ssl.SSLError``, ``TimeoutError``, ``OSError``)."""
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except ssl.SSLError:
                with contextlib.suppress(OSError, TimeoutError):
                    await self._flush()  # the alert telling the client why
                raise
            await self._flush()
            return

    def peer_der(self) -> bytes | None:
        return self._tls.getpeercert(binary_form=True)

    async def recv(self, max_bytes: int = READ_CHUNK) -> bytes:
        """Application data; b"" once the client closed (cleanly or not)."""
        while True:
            try:
                return self._tls.read(max_bytes)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def send(self, data: bytes) -> None:
        self._tls.write(data)
        await self._flush()

    async def close(self) -> None:
        """Send close_notify (RFC 8446 §6.1) without waiting for the client's, then close."""
        with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: the client's is not in
            self._tls.unwrap()
        with contextlib.suppress(OSError, TimeoutError):
            await self._flush()
        await _close(self._writer)

    async def _fill(self) -> None:
        async with asyncio.timeout(self._timeout):
            data = await self._reader.read(READ_CHUNK)
        if data:
            self.received_any = True
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            self._writer.write(pending)
            async with asyncio.timeout(self._timeout):
                await self._writer.drain()


class _Closed(Exception):
    """The client went away between requests."""


@dataclass
class _Conn:
    """One client connection: who it is, what certificate it proved, its HTTP state."""

    listener: Listener
    tls: TLSStream
    peer: tuple[str, int]  # the device: the PROXY header's source behind a load balancer
    h11: h11.Connection
    leaf: x509.Certificate | None = None
    issuer: x509.Certificate | None = None  # the Device Root that issued ``leaf``
    leaf_error: str | None = None
    via: tuple[str, int] | None = None  # the load balancer that relayed the connection
    log_name: str = field(init=False)
    route: str = UNMATCHED  # of the request being served, for the metrics
    started: float = 0.0

    def __post_init__(self) -> None:
        via = f" via {self.via[0]}:{self.via[1]}" if self.via and self.via != self.peer else ""
        self.log_name = f"{self.peer[0]}:{self.peer[1]}{via} on {self.listener.name}"


def _log_handshake_failure(exc: BaseException, peer: str, tls: TLSStream) -> None:
    if isinstance(exc, ssl.SSLCertVerificationError):
        log.warning("denied %s: client certificate rejected: %s", peer, exc.verify_message)
    elif (
        isinstance(exc, ssl.SSLError) and tls.received_any and not isinstance(exc, ssl.SSLEOFError)
    ):
        log.warning("denied %s: TLS handshake failed: %s", peer, exc.reason or exc)
    else:  # load balancer health checks connect and close without a handshake
        log.debug("%s closed before completing TLS: %r", peer, exc)


class CertProxy:
    """The asyncio shell: accept, handshake, read one request at a time, forward, answer."""

    def __init__(
        self,
        listeners: Sequence[Listener],
        upstream: Upstream,
        trust: DeviceRootSet,
        limits: Limits | None = None,
        load_balancers: Sequence[IPNetwork] = (),
    ) -> None:
        self.listeners, self.upstream = list(listeners), upstream
        self.load_balancers = tuple(load_balancers)
        self.trust = trust
        # What ``/healthz`` answers: set by the shell that reloads (``certproxy.reload``).
        self.health: Callable[[], dict[str, object]] = lambda: {"status": "ok"}
        self.limits = limits or Limits()
        self._slots = asyncio.Semaphore(self.limits.max_connections)
        self._servers: list[asyncio.Server] = []
        self._connections: dict[asyncio.Task[object], asyncio.StreamWriter] = {}
        self._closing = False
        self.metrics = HttpMetrics("certproxy", SERIES, signin_methods=("certificate",))

    def swap(
        self, contexts: Mapping[str, ssl.SSLContext], upstream: Upstream, trust: DeviceRootSet
    ) -> None:
        """Put contexts built aside to use: listeners by name, the upstream, the Device
        Roots. New connections get them; open ones keep theirs, none is closed."""
        for listener in self.listeners:
            if listener.name in contexts:
                listener.ssl_context = contexts[listener.name]
        self.upstream, self.trust = upstream, trust

    async def start(self) -> list[tuple[str, int]]:
        """Bind every listener; returns the bound (host, port) pairs in listener order."""
        bound = []
        for listener in self.listeners:
            server = await asyncio.start_server(
                functools.partial(self._accept, listener),
                listener.host,
                listener.port,
                limit=READ_CHUNK,
            )
            self._servers.append(server)
            host, port = server.sockets[0].getsockname()[:2]
            bound.append((str(host), int(port)))
            log.info("cert proxy %s listening on %s:%s", listener.name, host, port)
        return bound

    async def serve_forever(self) -> None:
        await asyncio.gather(*(server.serve_forever() for server in self._servers))

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Stop listening, then close the connections still open.

        Connections are ended by aborting their transports, not by cancelling their tasks:
        Python 3.11's ``start_server`` logs an error for a task cancelled before it ran.
        """
        self._closing = True
        for server in self._servers:
            server.close()
        await asyncio.sleep(0)  # connections accepted just now see _closing and return
        for writer in self._connections.values():
            writer.transport.abort()
        tasks = list(self._connections)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for task in late:  # only a request waiting on Access gets here
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    async def _accept(
        self, listener: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        peer_info = writer.get_extra_info("peername") or ("unknown", 0)
        peer = (str(peer_info[0]), int(peer_info[1]))
        if self._closing or task is None:
            await _close(writer)
            return
        if self._slots.locked():
            log.warning("denied %s:%s on %s: connection limit reached", *peer, listener.name)
            await _close(writer)
            return
        self._connections[task] = writer  # also keeps the task referenced until it ends
        async with self._slots:
            try:
                client, peeked = await self._client_of(listener, reader, peer)
            except (ProxyProtocolError, OSError, TimeoutError) as exc:
                log.warning(
                    "denied %s:%s on %s: %s", *peer, listener.name, exc or type(exc).__name__
                )
                await _close(writer)
                del self._connections[task]
                return
            timeout = self.limits.handshake_timeout_s
            tls = TLSStream(reader, writer, listener.ssl_context, timeout, peeked)
            try:
                await self._serve_connection(listener, tls, client, peer)
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                log.debug("%s:%s on %s: connection ended: %r", *peer, listener.name, exc)
            except asyncio.CancelledError:
                log.debug("closing %s:%s on %s: shutting down", *peer, listener.name)
            finally:
                await tls.close()
                del self._connections[task]

    async def _client_of(
        self, listener: Listener, reader: asyncio.StreamReader, peer: tuple[str, int]
    ) -> tuple[tuple[str, int], bytes]:
        """The device's address (PROXY v2 rule, :func:`certgate.access.proxied.client_of`)
        and any bytes read ahead of the TLS handshake."""
        peeked = b""

        async def peek(size: int) -> bytes:
            nonlocal peeked
            peeked = await reader.read(size)
            return peeked

        async with asyncio.timeout(self.limits.handshake_timeout_s):
            client = await client_of(peer, self.load_balancers, reader.read, peek)
        return client, peeked

    async def _serve_connection(
        self,
        listener: Listener,
        tls: TLSStream,
        peer: tuple[str, int],
        via: tuple[str, int] | None = None,
    ) -> None:
        name = f"{peer[0]}:{peer[1]} on {listener.name}"
        try:
            async with asyncio.timeout(self.limits.handshake_timeout_s):
                await tls.handshake()
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            _log_handshake_failure(exc, name, tls)
            return
        conn = _Conn(
            listener,
            tls,
            peer,
            h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes),
            via=via,
        )
        self._check_peer_certificate(conn)
        for _ in range(self.limits.max_requests_per_connection):
            if not await self._serve_one(conn):
                return
            conn.h11.start_next_cycle()

    def _check_peer_certificate(self, conn: _Conn) -> None:
        der = conn.tls.peer_der()
        if not der:
            return
        try:
            leaf = x509.load_der_x509_certificate(der)
            issuer = self.trust.issuer_of(leaf)
        except (ValueError, ChainError) as exc:
            conn.leaf_error = f"device certificate rejected: {exc}"
            return
        conn.leaf, conn.issuer = leaf, issuer.cert

    async def _serve_one(self, conn: _Conn) -> bool:
        """Serve one request; False when the connection must end."""
        try:
            request, body = await self._read_request(conn)
        except _Closed:
            return False
        except h11.RemoteProtocolError as exc:
            refusal = Refusal(exc.error_status_hint, "invalid_request", f"bad HTTP: {exc!s:.200}")
            return await self._refuse(conn, None, refusal)
        except TimeoutError:
            if conn.h11.their_state is h11.IDLE and not conn.h11.trailing_data[0]:
                return False  # an idle keep-alive connection: just close it
            return await self._refuse(conn, None, Refusal(408, "timeout", "request too slow"))
        except Refusal as refusal:
            return await self._refuse(conn, None, refusal)
        conn.started, path = time.perf_counter(), _path(request)
        conn.route = path if path in (*ALLOWED_PATHS, *LOCAL_PATHS) else UNMATCHED
        if path in LOCAL_PATHS and request.method == b"GET":
            status, headers, payload = self._local(conn, path)
            await self._send(conn, status, headers, payload)
            return conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE
        try:
            status, headers, payload = await self._forward(conn, request, body)
        except Refusal as refusal:
            if refusal.error == "certificate_rejected":
                self.metrics.signin_failures.labels("certificate").inc()
            return await self._refuse(conn, request, refusal)
        except Exception as exc:  # the last resort: a JSON answer, the trace in the log
            failure = classify(exc, f"{request.method.decode()} {_path(request)}")
            unexpected = Refusal(failure.status, failure.error, failure.detail)
            return await self._refuse(conn, request, unexpected)
        await self._send(conn, status, headers, payload)
        return conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE

    async def _receive(self, conn: _Conn) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = conn.h11.next_event()
            if event is h11.PAUSED or isinstance(event, h11.Event):
                return event
            async with asyncio.timeout(self.limits.read_timeout_s):
                data = await conn.tls.recv()
            conn.h11.receive_data(data)

    async def _read_request(self, conn: _Conn) -> tuple[h11.Request, bytes]:
        request: h11.Request | None = None
        body = b""
        while True:
            event = await self._receive(conn)
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise _Closed
            if isinstance(event, h11.Request):
                _check_head_size(event, self.limits.max_header_bytes)
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_body_bytes:
                    raise Refusal(413, "too_large", "request body too large")
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                return request, body

    async def _forward(
        self, conn: _Conn, request: h11.Request, body: bytes
    ) -> tuple[int, Headers, bytes]:
        check_request(request.method, request.target)
        if conn.leaf_error is not None:
            raise Refusal(403, "certificate_rejected", conn.leaf_error)
        headers = upstream_headers(
            list(request.headers.raw_items()),
            authority=self.upstream.authority,
            client=conn.peer,
            leaf=conn.leaf,
            chain=[conn.issuer] if conn.issuer is not None else [],
        )
        try:
            async with asyncio.timeout(self.limits.upstream_timeout_s):
                status, response_headers, payload = await self._exchange(
                    request.method, request.target, headers, body
                )
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            log.error("Access at %s unreachable: %r", self.upstream.authority.decode(), exc)
            raise Refusal(502, "bad_gateway", "the Access service is unreachable") from exc
        device = thumbprint(conn.leaf)[:16] if conn.leaf is not None else "none"
        log.info(
            "forwarded %s %s from %s (device cert %s) -> %s",
            request.method.decode(),
            _path(request),
            conn.log_name,
            device,
            status,
        )
        return status, downstream_headers(response_headers), payload

    async def _exchange(
        self, method: bytes, target: bytes, headers: Headers, body: bytes
    ) -> tuple[int, Headers, bytes]:
        """One request on a fresh mTLS connection to the forced destination."""
        reader, writer = await asyncio.open_connection(
            self.upstream.host,
            self.upstream.port,
            ssl=self.upstream.ssl_context,
            ssl_handshake_timeout=self.limits.handshake_timeout_s,
            limit=READ_CHUNK,
        )
        try:
            client = h11.Connection(
                h11.CLIENT, max_incomplete_event_size=self.limits.max_header_bytes
            )
            if body:
                headers = [*headers, (b"content-length", str(len(body)).encode())]
            out = client.send(h11.Request(method=method, target=target, headers=headers)) or b""
            if body:
                out += client.send(h11.Data(data=body)) or b""
            writer.write(out + (client.send(h11.EndOfMessage()) or b""))
            await writer.drain()
            return await self._read_response(client, reader)
        finally:
            await _close(writer)

    async def _read_response(
        self, client: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[int, Headers, bytes]:
        response: h11.Response | None = None
        payload = b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await reader.read(READ_CHUNK))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                payload += event.data
                if len(payload) > self.limits.max_response_bytes:
                    raise h11.RemoteProtocolError("response from Access too large")
            elif isinstance(event, h11.EndOfMessage) and response is not None:
                return response.status_code, list(response.headers.raw_items()), payload
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("Access closed the connection mid-response")

    async def _refuse(self, conn: _Conn, request: h11.Request | None, refusal: Refusal) -> bool:
        what = f"{request.method.decode()} {_path(request)}" if request else "request"
        log.warning("denied %s from %s: %s %s", what, conn.log_name, refusal.status, refusal.reason)
        body = json.dumps({"error": refusal.error, "error_description": refusal.reason}).encode()
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        if conn.h11.their_state is not h11.DONE:
            headers.append((b"connection", b"close"))
        try:
            await self._send(conn, refusal.status, headers, body)
        except (h11.LocalProtocolError, OSError, TimeoutError):
            return False  # the client is gone, or the response cannot be framed: just close
        return conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE

    def _local(self, conn: _Conn, path: str) -> tuple[int, Headers, bytes]:
        """``/livez`` and ``/healthz`` for anyone; ``/metrics`` for a loopback peer only
        (certgate.metrics)."""
        json_type = [(b"content-type", b"application/json")]
        if path == "/livez":
            return 200, json_type, b'{"status": "alive"}'
        if path == "/healthz":
            return 200, json_type, json.dumps(self.health()).encode()
        if not loopback(conn.peer[0]):
            body = {"error": "forbidden", "detail": "/metrics answers on loopback only"}
            return 403, json_type, json.dumps(body).encode()
        return 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], self.metrics.exposition()

    async def _send(self, conn: _Conn, status: int, headers: Headers, body: bytes) -> None:
        if conn.started:  # a request was read: count its answer
            method = "GET" if conn.route != UNMATCHED else "other"
            self.metrics.requests.labels(conn.route, method, str(status)).inc()
            elapsed = time.perf_counter() - conn.started
            self.metrics.latency.labels(conn.route, method).observe(elapsed)
        framed = [*headers, (b"content-length", str(len(body)).encode())]
        response = h11.Response(status_code=status, headers=framed, reason=_reason(status))
        data = conn.h11.send(response) or b""
        if body:
            data += conn.h11.send(h11.Data(data=body)) or b""
        data += conn.h11.send(h11.EndOfMessage()) or b""
        await conn.tls.send(data)


def _check_head_size(request: h11.Request, limit: int) -> None:
    """h11 bounds only a head still incomplete; one that arrived whole is measured here."""
    size = len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers.raw_items())
    if size > limit:
        raise Refusal(431, "headers_too_large", f"request head over {limit} bytes")


def _path(request: h11.Request) -> str:
    """The request path without its query (which carries the sign-in handle)."""
    return request.target.split(b"?", 1)[0].decode("latin-1")[:200]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
        async with asyncio.timeout(5):
            await writer.wait_closed()
