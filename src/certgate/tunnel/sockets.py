"""Readiness-driven sockets: the thin layer between the tunnel and its event loop.

Why not asyncio transports: asyncio's SSL transport (``asyncio.sslproto``) runs TLS through
memory BIOs in pure Python and allocates and zero-fills a 256 KiB read buffer for every
connection; that shell cost more CPU per new connection than OpenSSL's handshake itself
(bench/FINDINGS.md). Here OpenSSL reads and writes the socket itself (a non-blocking
``ssl.SSLSocket``, or a pyOpenSSL ``Connection`` on the socket), and Python only reacts to
readiness (``loop.add_reader``/``add_writer``), which the stdlib loop and uvloop both
provide, so the data plane runs on either, with either TLS backend.

* ``Watched``: one socket's readiness callbacks, registered only while someone waits.
* ``End``/``TLSEnd``: non-blocking reads and writes that raise ``WouldBlock`` naming the
  readiness to wait for; ``TLSEnd`` has one implementation per TLS backend.
* ``ServerTLS``: a backend's server context, starting TLS on an accepted socket.
* ``Acceptor``: a listening socket accepting in batches.
* ``Dialer``: a non-blocking connect to each of a destination's addresses in turn.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable
from enum import Enum
from typing import Any

from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

log = logging.getLogger("certgate.tunnel")
TLS_MAX_PLAINTEXT = 16 * 1024  # RFC 8446 section 5.1: a record carries at most 2^14 bytes
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Want(Enum):
    """The readiness a blocked socket operation waits for."""

    READ = "read"
    WRITE = "write"


class Watched:
    """One socket's readiness callbacks, registered with the loop only while needed.

    A wake-up runs the waiters registered so far; one still blocked waits again, and the
    registration stays, so a busy socket costs no ``epoll_ctl``. A read registration with
    no waiter left is dropped lazily, at its next wake-up: a connection that stops
    reading for a moment (while it dials upstream) and then reads again costs none
    either. Write readiness is nearly always true, so it is dropped at once.
    """

    __slots__ = ("_reader_on", "_readers", "_writer_on", "_writers", "closed", "fd", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop, self.fd, self.closed = loop, fd, False
        self._readers: list[Callable[[], None]] = []
        self._writers: list[Callable[[], None]] = []
        self._reader_on = self._writer_on = False

    def wait(self, want: Want, callback: Callable[[], None]) -> None:
        if self.closed:
            return
        if want is Want.READ:
            if callback not in self._readers:
                self._readers.append(callback)
            if not self._reader_on:
                self._reader_on = True
                self.loop.add_reader(self.fd, self._readable)
        else:
            if callback not in self._writers:
                self._writers.append(callback)
            if not self._writer_on:
                self._writer_on = True
                self.loop.add_writer(self.fd, self._writable)

    def _readable(self) -> None:
        waiters, self._readers = self._readers, []
        if not waiters:  # nobody reads now: stop the level-triggered wake-ups
            self._reader_on = False
            self.loop.remove_reader(self.fd)
        for callback in waiters:
            callback()

    def _writable(self) -> None:
        waiters, self._writers = self._writers, []
        for callback in waiters:
            callback()
        if not self._writers and self._writer_on and not self.closed:
            self._writer_on = False
            self.loop.remove_writer(self.fd)

    def close(self) -> None:
        """Forget every waiter; call before the socket is closed (its fd may be reused)."""
        self._readers.clear()
        self._writers.clear()
        if not self.closed:
            if self._reader_on:
                self.loop.remove_reader(self.fd)
            if self._writer_on:
                self.loop.remove_writer(self.fd)
        self._reader_on = self._writer_on = False
        self.closed = True


class WouldBlock(Exception):
    """A non-blocking socket operation must wait for ``want`` on ``end``."""

    def __init__(self, end: End, want: Want) -> None:
        self.end, self.want = end, want


class End:
    """One side of a relay: a non-blocking socket and its readiness callbacks."""

    __slots__ = ("at_eof", "sock", "watched")

    def __init__(self, sock: socket.socket, watched: Watched) -> None:
        self.sock, self.watched, self.at_eof = sock, watched, False

    def read_into(self, view: memoryview) -> tuple[int, Want | None]:
        """Bytes read, and what to wait for before reading again (None: read on)."""
        try:
            n = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            raise WouldBlock(self, Want.READ) from None
        self.at_eof = n == 0
        # A short read drained the kernel buffer; epoll (level-triggered) says when more
        # arrives, so no second recv only to learn EAGAIN.
        return n, (Want.READ if 0 < n < len(view) else None)

    def write(self, view: memoryview) -> int:
        try:
            return self.sock.send(view)
        except (BlockingIOError, InterruptedError):
            raise WouldBlock(self, Want.WRITE) from None


class TLSBlocked(Exception):
    """A TLS operation must wait for ``want`` on the client socket."""

    def __init__(self, want: Want) -> None:
        self.want = want


class HandshakeClosed(OSError):
    """The client reset or closed the connection during the handshake (no decision)."""


class HandshakeRefused(OSError):
    """The handshake failed; ``reason`` is what the refusal is logged with."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TLSEnd(End):
    """The client side of a tunnel: TLS on a non-blocking socket, one backend's way.

    Both backends let OpenSSL read and write the socket itself; only the library differs
    (``StdlibTLSEnd``: Python's ``ssl``; ``PyOpenSSLTLSEnd``: the OpenSSL inside the
    cryptography wheel). The relay uses ``read_into``/``write``; the connection's other
    steps use the methods below, which raise the same exceptions on both backends:
    ``TLSBlocked`` to wait, ``HandshakeClosed``/``HandshakeRefused`` from ``handshake``,
    ``OSError`` for a failed connection. ``ragged``: the TCP connection closed without
    close_notify, so the shell does not answer a client already gone with one of its own.
    """

    __slots__ = ("ragged",)

    def __init__(self, sock: socket.socket, watched: Watched) -> None:
        super().__init__(sock, watched)
        self.ragged = False

    def handshake(self) -> None:
        raise NotImplementedError

    def peer_der(self) -> bytes | None:
        """The verified client certificate (DER), or None."""
        raise NotImplementedError

    def recv_once(self, view: memoryview) -> int:
        """One read of at most one record; 0 at the client's end (ragged or not)."""
        raise NotImplementedError

    def send_once(self, view: memoryview) -> int:
        raise NotImplementedError

    def close_notify(self) -> None:
        """Send close_notify, best effort: never wait for the client's."""
        raise NotImplementedError

    def shutdown_write(self) -> None:
        """Shut the TCP write side (after close_notify)."""
        self.sock.shutdown(socket.SHUT_WR)

    def drain(self, size: int) -> bytes:
        """Read what the client still sends after the final answer (``BlockingIOError``
        when nothing is there yet)."""
        return self.sock.recv(size)

    def reset_on_close(self) -> None:
        """Make the close a TCP reset (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)


RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a TCP RST


class StdlibTLSEnd(TLSEnd):
    """Python's ``ssl``. The socket must be wrapped with ``suppress_ragged_eofs=False``, so
    a TCP close without close_notify is told apart (``ssl.SSLEOFError``)."""

    __slots__ = ()

    sock: ssl.SSLSocket

    def read_into(self, view: memoryview) -> tuple[int, Want | None]:
        got, room = 0, len(view) - TLS_MAX_PLAINTEXT
        # Several records per wake-up, then one write upstream for all of them. Reading
        # only while a whole record fits leaves no plaintext buffered inside OpenSSL
        # (which, without read-ahead, reads the socket one record at a time), so epoll
        # always sees what is left.
        while got <= room:
            try:
                n = self.sock.recv_into(view[got:])
            except ssl.SSLWantReadError:
                want = Want.READ
            except ssl.SSLWantWriteError:  # a TLS 1.3 KeyUpdate answer must go out first
                want = Want.WRITE
            except ssl.SSLEOFError:  # TCP closed without close_notify
                self.at_eof = self.ragged = True
                return got, None
            else:
                if n == TLS_MAX_PLAINTEXT:
                    got += n
                    continue
                if n:  # a short record ends a burst: wait for epoll, not for an exception
                    return got + n, Want.READ
                self.at_eof = True  # close_notify
                return got, None
            if not got:
                raise WouldBlock(self, want)
            return got, want
        return got, None

    def write(self, view: memoryview) -> int:
        # CPython does not set SSL_MODE_ENABLE_PARTIAL_WRITE: SSL_write takes all of
        # ``view`` or raises, and the retry must pass the same bytes (the pump does).
        try:
            return self.sock.send(view)
        except ssl.SSLWantWriteError:
            raise WouldBlock(self, Want.WRITE) from None
        except ssl.SSLWantReadError:
            raise WouldBlock(self, Want.READ) from None

    def handshake(self) -> None:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            raise TLSBlocked(Want.READ) from None
        except ssl.SSLWantWriteError:
            raise TLSBlocked(Want.WRITE) from None
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError) as exc:
            raise HandshakeClosed(type(exc).__name__) from exc
        except OSError as exc:
            raise HandshakeRefused(_stdlib_reason(exc)) from exc

    def peer_der(self) -> bytes | None:
        return self.sock.getpeercert(binary_form=True)

    def recv_once(self, view: memoryview) -> int:
        try:
            return self.sock.recv_into(view, len(view))
        except ssl.SSLEOFError:  # closed without close_notify: the same end for the parser
            return 0
        except ssl.SSLWantReadError:
            raise TLSBlocked(Want.READ) from None
        except ssl.SSLWantWriteError:
            raise TLSBlocked(Want.WRITE) from None

    def send_once(self, view: memoryview) -> int:
        try:
            return self.sock.send(view)
        except ssl.SSLWantReadError:
            raise TLSBlocked(Want.READ) from None
        except ssl.SSLWantWriteError:
            raise TLSBlocked(Want.WRITE) from None

    def close_notify(self) -> None:
        try:
            self.sock.unwrap()
        except OSError:  # ssl.SSLWantReadError included: the client's is never awaited
            pass


def _stdlib_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    return f"{type(exc).__name__}: {exc}"


class PyOpenSSLTLSEnd(TLSEnd):
    """pyOpenSSL: the OpenSSL of the cryptography wheel, on the raw socket (``sock``).

    Writes are as with ``ssl``: ``tlsconf.pyopenssl_server_context`` clears pyOpenSSL's
    SSL_MODE_ENABLE_PARTIAL_WRITE (one record a call), so a write takes all of ``view`` or
    raises want-write, and the retry passes the same bytes, maybe from another buffer
    (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER stays). Its errors are not ``OSError``s; they are
    turned into ones here, which is what the relay and the connection expect.
    """

    __slots__ = ("conn",)

    def __init__(self, conn: SSL.Connection, sock: socket.socket, watched: Watched) -> None:
        super().__init__(sock, watched)
        self.conn = conn

    def read_into(self, view: memoryview) -> tuple[int, Want | None]:
        got, room = 0, len(view) - TLS_MAX_PLAINTEXT
        while got <= room:  # as StdlibTLSEnd.read_into, for the same reasons
            try:
                n = self._read(view[got:])
            except TLSBlocked as blocked:
                if not got:
                    raise WouldBlock(self, blocked.want) from None
                return got, blocked.want
            if n == TLS_MAX_PLAINTEXT:
                got += n
                continue
            if n:
                return got + n, Want.READ
            return got, None  # at_eof (and ragged) set by _read
        return got, None

    def _read(self, view: memoryview) -> int:
        # SSL_read straight into ``view``: Connection.recv_into reads into a temporary
        # buffer and copies it (one allocation and one copy per record).
        conn = self.conn
        with _ffi.from_buffer(view, require_writable=True) as data:
            n: int = _lib.SSL_read(conn._ssl, data, len(view))
        if n > 0:
            return n
        try:
            conn._raise_ssl_error(conn._ssl, n)
        except SSL.WantReadError:
            raise TLSBlocked(Want.READ) from None
        except SSL.WantWriteError:  # a TLS 1.3 KeyUpdate answer must go out first
            raise TLSBlocked(Want.WRITE) from None
        except SSL.ZeroReturnError:  # close_notify
            self.at_eof = True
            return 0
        except SSL.SysCallError as exc:
            if exc.args[0] == -1:  # TCP closed without close_notify
                self.at_eof = self.ragged = True
                return 0
            raise OSError(exc.args[0], str(exc.args[1])) from None
        except SSL.Error as exc:
            raise OSError(f"TLS error: {_pyopenssl_reason(exc)}") from None
        self.at_eof = True
        return 0

    def write(self, view: memoryview) -> int:
        try:
            return self.send_once(view)
        except TLSBlocked as blocked:
            raise WouldBlock(self, blocked.want) from None

    def handshake(self) -> None:
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            raise TLSBlocked(Want.READ) from None
        except SSL.WantWriteError:
            raise TLSBlocked(Want.WRITE) from None
        except SSL.SysCallError as exc:  # reset, or closed without an alert
            raise HandshakeClosed(str(exc.args[1])) from None
        except SSL.Error as exc:
            raise HandshakeRefused(self._refusal(exc)) from None

    def _refusal(self, exc: SSL.Error) -> str:
        """The same words as ``_stdlib_reason``: the verify message, else OpenSSL's reason
        in its macro form (what Python's ``ssl`` reports)."""
        reason = _pyopenssl_reason(exc)
        if reason == "CERTIFICATE_VERIFY_FAILED":
            code = _lib.SSL_get_verify_result(self.conn._ssl)
            message = _ffi.string(_lib.X509_verify_cert_error_string(code)).decode()
            return f"client certificate rejected: {message}"
        return reason

    def peer_der(self) -> bytes | None:
        # i2d straight from OpenSSL's X509: a cryptography Certificate would be built only
        # to be encoded again (about 20 us a connection).
        cert = self.conn.get_peer_certificate()
        return None if cert is None else crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)

    def recv_once(self, view: memoryview) -> int:
        return self._read(view)

    def send_once(self, view: memoryview) -> int:
        try:
            return self.conn.send(view)
        except SSL.WantReadError:
            raise TLSBlocked(Want.READ) from None
        except SSL.WantWriteError:
            raise TLSBlocked(Want.WRITE) from None
        except SSL.SysCallError as exc:
            raise OSError(exc.args[0], str(exc.args[1])) from None
        except SSL.Error as exc:
            raise OSError(f"TLS error: {_pyopenssl_reason(exc)}") from None

    def close_notify(self) -> None:
        try:
            self.conn.shutdown()
        except SSL.Error:  # want-read included: the client's is never awaited
            pass


def _pyopenssl_reason(exc: SSL.Error) -> str:
    """OpenSSL's first reason as Python's ``ssl`` names it (``SSLError.reason``): the
    reason string in macro form, e.g. PEER_DID_NOT_RETURN_A_CERTIFICATE."""
    errors = exc.args[0] if exc.args else None
    if isinstance(errors, list) and errors and isinstance(errors[0], tuple):
        return str(errors[0][-1]).upper().replace(" ", "_")
    return str(exc)


class ServerTLS:
    """A data-plane TLS context of one backend; ``accept`` starts TLS on a new socket."""

    backend = ""

    def accept(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> TLSEnd:
        raise NotImplementedError


class StdlibServerTLS(ServerTLS):
    backend = "ssl"

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx

    def accept(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> TLSEnd:
        tls = self.ctx.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False, suppress_ragged_eofs=False
        )
        return StdlibTLSEnd(tls, Watched(loop, tls.fileno()))


class PyOpenSSLServerTLS(ServerTLS):
    backend = "pyopenssl"

    def __init__(self, ctx: SSL.Context) -> None:
        self.ctx = ctx

    def accept(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> TLSEnd:
        conn = SSL.Connection(self.ctx, sock)
        conn.set_accept_state()
        return PyOpenSSLTLSEnd(conn, sock, Watched(loop, sock.fileno()))


ACCEPT_BATCH = 64
ACCEPT_PAUSE_S = 1.0  # after EMFILE and the like, as asyncio's own accept loop does


class Acceptor:
    """A listening socket; accepts on readiness and hands each socket to ``on_accept``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_accept: Callable[[socket.socket, Any], None],
    ) -> None:
        self.loop, self.sock, self.on_accept = loop, sock, on_accept
        self._serving = False

    @classmethod
    def listen(
        cls,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        on_accept: Callable[[socket.socket, Any], None],
        backlog: int = 1024,
        *,
        reuse_port: bool = False,
    ) -> Acceptor:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # worker processes sharing the port (tunnel.workers)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        acceptor = cls(loop, sock, on_accept)
        acceptor.resume()
        return acceptor

    @property
    def sockets(self) -> list[socket.socket]:
        return [self.sock]

    def is_serving(self) -> bool:
        return self._serving

    def resume(self) -> None:
        if self.sock.fileno() >= 0 and not self._serving:
            self.loop.add_reader(self.sock.fileno(), self._accept)
            self._serving = True

    def close(self) -> None:
        if self._serving:
            self.loop.remove_reader(self.sock.fileno())
            self._serving = False
        self.sock.close()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: wait, then accept again
                log.warning("accept failed (%s); pausing for %gs", exc, ACCEPT_PAUSE_S)
                self.loop.remove_reader(self.sock.fileno())
                self._serving = False
                self.loop.call_later(ACCEPT_PAUSE_S, self.resume)
                return
            self.on_accept(sock, address)


@functools.lru_cache(maxsize=4096)  # pure; destinations repeat
def ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _established(sock: socket.socket) -> bool:
    """Whether a non-blocking connect already completed: on loopback and on fast local
    networks it usually has by the time ``connect`` returns, and asking costs one syscall
    where waiting for writability costs a loop iteration and two ``epoll_ctl``."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


class Dialer:
    """Connects to a destination's addresses in turn, each within ``timeout_s``.

    Calls ``on_connected(end)`` with the connected socket, or ``on_failed(error)`` with
    the last address's error ("timeout" for a timeout) once every address failed.
    ``cancel`` closes the attempt in progress and calls nothing.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        addresses: list[IPAddress],
        port: int,
        timeout_s: float,
        on_connected: Callable[[End], None],
        on_failed: Callable[[str], None],
    ) -> None:
        self.loop, self.port, self.timeout_s = loop, port, timeout_s
        self.on_connected, self.on_failed = on_connected, on_failed
        self.addresses = list(addresses)
        self.last_error = "no address"
        self.attempt: End | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Try the addresses left in turn; report failure once none is."""
        while self.addresses:
            if self._try(self.addresses.pop(0)):
                return
        self.on_failed(self.last_error)

    def _try(self, address: IPAddress) -> bool:
        """Connect to ``address``: True once connected or waiting, False if it failed."""
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex((str(address), self.port))
        end = End(sock, Watched(self.loop, sock.fileno()))
        if code == 0 or (code == errno.EINPROGRESS and _established(sock)):
            self._connected(end)
        elif code == errno.EINPROGRESS:
            self.attempt = end
            end.watched.wait(Want.WRITE, self._completed)
            self._timer = self.loop.call_later(self.timeout_s, self._timed_out)
        else:
            self._close(end, os.strerror(code))
            return False
        return True

    def _completed(self) -> None:
        end, self.attempt = self.attempt, None
        if end is None:
            return
        self._stop_timer()
        code = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._close(end, os.strerror(code))
            self.start()
        else:
            self._connected(end)

    def _timed_out(self) -> None:
        end, self.attempt = self.attempt, None
        if end is not None:
            self._close(end, "timeout")
            self.start()

    def _connected(self, end: End) -> None:
        end.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.on_connected(end)

    def _close(self, end: End, error: str) -> None:
        end.watched.close()
        end.sock.close()
        self.last_error = error

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def cancel(self) -> None:
        self._stop_timer()
        self.addresses.clear()
        end, self.attempt = self.attempt, None
        if end is not None:
            self._close(end, "cancelled")
