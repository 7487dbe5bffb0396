"""The console's audit checkpointer: signs the chain's head into sinks outside the database.

At start (a sink that cannot be written fails the start), every ``interval_s`` when the
head moved, and at clean shutdown, it reads the head (one consistent read), signs it
(``services.checkpoints``) and appends the line to the data directory's
``audit-checkpoints.jsonl`` (``O_APPEND``, fsync'd) and, when configured, to syslog.
Several consoles on one PostgreSQL database each write their own file: every file
checkpoints the same shared chain, and ``audit verify -d DIR`` holds the chain to DIR's
file. The file is append-only by convention only; make it so on disk (``chattr +a``) or
ship the syslog copy to another host for a sink that the database host cannot rewrite.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import threading
from pathlib import Path

from certgate.console.services import audit, ca, checkpoints
from certgate.console.store.db import Database
from certgate.errors import ConfigError

SYSLOG_TAG = "certgate-audit-checkpoint:"
log = logging.getLogger("certgate.console.checkpointer")


class CheckpointSink:
    """The append-only file, plus syslog when ``syslog`` names a socket path or (host, port)."""

    def __init__(self, path: Path, syslog: str | tuple[str, int] | None = None) -> None:
        self.path = path
        self._syslog: logging.Logger | None = None
        if syslog is not None:
            # A logger of our own, outside the logging tree: checkpoints go to syslog only.
            self._syslog = logging.Logger("certgate.audit.checkpoint", logging.INFO)
            self._syslog.addHandler(_syslog_handler(syslog))

    def append(self, line: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._syslog is not None:
            self._syslog.info("%s %s", SYSLOG_TAG, line)

    def close(self) -> None:
        for handler in self._syslog.handlers if self._syslog else ():
            handler.close()


class _SyslogHandler(logging.handlers.SysLogHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        # The file holds the line; say that the syslog copy is missing instead of printing
        # logging's bare traceback.
        log.exception("audit checkpoint not sent to syslog %r", self.address)


def _syslog_handler(address: str | tuple[str, int]) -> logging.Handler:
    try:  # a host name that does not resolve fails here
        handler = _SyslogHandler(address, facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV)
    except OSError as exc:
        raise ConfigError(f"audit syslog {address!r} is not reachable: {exc}") from exc
    sock: socket.socket | None = getattr(handler, "socket", None)
    if sock is None or sock.fileno() == -1:
        # A socket path that fails to connect is only retried at each message; one nobody
        # listens on at start is a misconfiguration: refuse to start without it.
        handler.close()
        raise ConfigError(f"audit syslog {address!r} is not reachable")
    return handler


class Checkpointer:
    def __init__(
        self,
        db: Database,
        pki: ca.InstancePKI,
        sink: CheckpointSink,
        group_id: str,
        interval_s: float,
    ) -> None:
        self._db, self._pki, self._sink = db, pki, sink
        self._group_id, self._interval_s = group_id, interval_s
        self._last: tuple[int, str] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def checkpoint(self) -> audit.Checkpoint | None:
        """Sign and write the head if it moved since this checkpointer's last line."""
        with self._db.read_only() as session:
            head = audit.current(session)
            if (head.count, head.head) == self._last:
                return None
            line = checkpoints.sign_line(session, self._pki, self._group_id, head)
        self._sink.append(line)
        self._last = (head.count, head.head)
        log.info("audit checkpoint: %d entries, head %s", head.count, head.head[:16])
        return head

    def start(self) -> None:
        """Checkpoint now, failing the start if the sink cannot be written; then go on in a
        thread (later failures are logged and retried: they must not stop the console)."""
        self.checkpoint()
        self._thread = threading.Thread(target=self._run, name="audit-checkpointer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after a last checkpoint of whatever was committed before."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        self._sink.close()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            self._tick()
        self._tick()  # clean shutdown: the last writes get their checkpoint

    def _tick(self) -> None:
        try:
            self.checkpoint()
        except Exception:  # a full disk or a lost database must not stop the console
            log.exception("audit checkpoint failed; retrying in %s s", self._interval_s)
