"""Readiness-driven sockets: the thin layer between the tunnel and its event loop.

Why not asyncio transports: asyncio's SSL transport (``asyncio.sslproto``) runs TLS through
memory BIOs in pure Python and allocates and zero-fills a 256 KiB read buffer for every
connection; that shell cost more CPU per new connection than OpenSSL's handshake itself
(bench/FINDINGS.md). Here OpenSSL reads and writes the socket itself (a non-blocking
``ssl.SSLSocket``), and Python only reacts to readiness (``loop.add_reader``/``add_writer``),
which the stdlib loop and uvloop both provide, so the data plane runs on either.

* ``Watched``: one socket's readiness callbacks, registered only while someone waits.
* ``End``/``TLSEnd``: non-blocking reads and writes that raise ``WouldBlock`` naming the
  readiness to wait for.
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
from collections.abc import Callable
from enum import Enum
from typing import Any

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


class TLSEnd(End):
    """The client side: OpenSSL reads and writes the socket itself.

    The socket must be wrapped with ``suppress_ragged_eofs=False``: a TCP close without
    close_notify then sets ``ragged``, and the shell does not answer a client that is
    already gone with a close_notify of its own.
    """

    __slots__ = ("ragged",)

    sock: ssl.SSLSocket

    def __init__(self, sock: ssl.SSLSocket, watched: Watched) -> None:
        super().__init__(sock, watched)
        self.ragged = False

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
