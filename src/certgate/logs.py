"""Structured logging for every component: text or JSON on stderr, RFC 5424 syslog.

Call sites attach a structured event with ``extra=logs.event("deny", reason=..., ...)``;
every output carries the same stable field set (``FIELDS``, null when a record has none),
so a SIEM can take denials, audit events and service events without parsing messages.

Log injection is impossible by construction: JSON output is one ``json.dumps`` line;
syslog SD-PARAM values escape ``"``, ``\\`` and ``]`` (RFC 5424 section 6.3.3) and every
message has its control characters escaped, so no value can start a forged line or
record. The syslog handler sends from its own thread through a bounded queue: a slow or
absent collector never blocks the tunnel's event loop (records past the bound are dropped
and counted).
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import os
import queue
import socket
import ssl
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

# The stable field set, always present in JSON and syslog output (null when unknown).
FIELDS = ("event", "reason", "device_uid", "thumbprint", "app", "destination", "node", "group")
# Further fields a call site may add; anything else is a programming error.
OPTIONAL_FIELDS = (
    "status",
    "listener",
    "cause",
    "detail",
    "action",
    "actor",
    "outcome",
    "peer",
    "transport",
)
_ALLOWED = frozenset(FIELDS + OPTIONAL_FIELDS)
_RECORD_KEY = "certgate_fields"
SERVICE_EVENT = "service"  # the event of a record logged without one

# RFC 5424 section 7.2.2: a private SD-ID is NAME@<enterprise number>; 32473 is the number
# RFC 5612 reserves for documentation and examples (certgate has none of its own).
SD_ID = "certgate@32473"
SYSLOG_QUEUE_MAX = 10_000
SYSLOG_APP_NAME = "certgate"
_FACILITY_LOCAL0 = 16
_SEVERITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def event(name: str, **fields: object) -> dict[str, Any]:
    """The ``extra=`` of a structured event; refuses a field outside the contract."""
    unknown = set(fields) - _ALLOWED
    if unknown:
        raise ValueError(f"log fields outside the contract: {sorted(unknown)}")
    return {_RECORD_KEY: {"event": name, **fields}}


_context: dict[str, object] = {}


def set_context(**fields: object) -> None:
    """Process-wide fields (a tunnel's node and group) added to every record."""
    unknown = set(fields) - _ALLOWED
    if unknown:
        raise ValueError(f"log fields outside the contract: {sorted(unknown)}")
    _context.update(fields)


def fields_of(record: logging.LogRecord) -> dict[str, object]:
    """The record's structured fields: the stable set first (null if absent), then extras."""
    given: Mapping[str, object] = getattr(record, _RECORD_KEY, None) or {}
    merged = {**_context, **given}
    out: dict[str, object] = {name: merged.get(name) for name in FIELDS}
    if out["event"] is None:
        out["event"] = SERVICE_EVENT
    out.update((k, v) for k, v in merged.items() if k not in out and v is not None)
    return out


def escape_controls(text: str) -> str:
    """Control characters as visible escapes: a value can never start a new log line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _message(record: logging.LogRecord) -> str:
    message = record.getMessage()
    if record.exc_info:
        message = f"{message}\n{logging.Formatter().formatException(record.exc_info)}"
    return escape_controls(message)


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """One line per record: time, level, logger, message (control characters escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record)
        return f"{stamp} {record.levelname} {record.name} {_message(record)}"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _message(record),
        }
        body.update(fields_of(record))
        # ASCII only: U+2028 and friends end a line for some readers.
        return json.dumps(body, ensure_ascii=True, default=str)


def sd_escape(value: str) -> str:
    """RFC 5424 section 6.3.3: inside PARAM-VALUE, '"', '\\' and ']' are escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_token(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces (RFC 5424 section 6), or '-'."""
    token = "".join(ch for ch in value if "!" <= ch <= "~")[:limit]
    return token or "-"


class RFC5424Formatter(logging.Formatter):
    """``<PRI>1 TIMESTAMP HOST APP PROCID MSGID [certgate@32473 k="v" ...] MSG``.

    MSGID is the event name; the structured data carries the fields (only those with a
    value: RFC 5424 has no null); MSG is the escaped message, UTF-8 after a BOM (6.4)."""

    def __init__(self, hostname: str | None = None) -> None:
        super().__init__()
        self.hostname = _header_token(hostname or socket.gethostname(), 255)

    def format(self, record: logging.LogRecord) -> str:
        fields = fields_of(record)
        pri = _FACILITY_LOCAL0 * 8 + _SEVERITY.get(record.levelname, 6)
        params = " ".join(
            f'{name}="{sd_escape(escape_controls(str(value)))}"'
            for name, value in fields.items()
            if value is not None
        )
        msgid = _header_token(str(fields["event"]), 32)
        header = f"<{pri}>1 {_timestamp(record)} {self.hostname} {SYSLOG_APP_NAME}"
        return f"{header} {os.getpid()} {msgid} [{SD_ID} {params}] \ufeff{_message(record)}"


@dataclass(frozen=True, slots=True)
class SyslogTarget:
    """Where syslog goes: ``udp://H:P``, ``tcp://H:P`` or ``tls://H:P``."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> SyslogTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("udp", "tcp", "tls"):
            raise ValueError(f"syslog target {url!r}: scheme must be udp, tcp or tls")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"syslog target {url!r}: {exc}") from exc
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ValueError(f"syslog target {url!r}: expected {parts.scheme}://HOST:PORT")
        return cls(parts.scheme, parts.hostname, port)


class SyslogSender(logging.Handler):
    """Sends formatted RFC 5424 messages: one datagram each over UDP; over TCP and TLS
    with octet-counting framing (RFC 6587 section 3.4.1, RFC 5425 section 4.3), so a
    message can never be split or joined by its content. After a failure, messages are
    dropped for ``RETRY_S`` before the next attempt (said once on stderr: logging it would
    loop back here), so an absent collector costs no connect timeout per record."""

    RETRY_S = 5.0

    def __init__(self, target: SyslogTarget, tls: ssl.SSLContext | None = None) -> None:
        super().__init__()
        self.target, self.tls = target, tls
        self._sock: socket.socket | None = None
        self._retry_at = 0.0
        self._failing = False

    def emit(self, record: logging.LogRecord) -> None:
        if time.monotonic() < self._retry_at:
            return
        data = record.getMessage().encode("utf-8", "replace")
        try:
            if self.target.scheme == "udp":
                self._socket().send(data)
            else:
                self._socket().sendall(b"%d %s" % (len(data), data))
        except OSError as exc:
            self._failed(exc)
        else:
            self._failing = False

    def _failed(self, exc: OSError) -> None:
        self.close_socket()
        self._retry_at = time.monotonic() + self.RETRY_S
        if not self._failing:
            self._failing = True
            target = f"{self.target.scheme}://{self.target.host}:{self.target.port}"
            sys.stderr.write(f"certgate: syslog {target} failed ({exc}); dropping records\n")

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = self._connect()
        return self._sock

    def _connect(self) -> socket.socket:
        address = (self.target.host, self.target.port)
        if self.target.scheme == "udp":
            family = socket.getaddrinfo(*address, type=socket.SOCK_DGRAM)[0][0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.connect(address)
            return sock
        sock = socket.create_connection(address, timeout=5.0)
        if self.target.scheme == "tls":
            context = self.tls or ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=self.target.host)
        return sock

    def close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        self.close_socket()
        super().close()


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Formats on the caller's thread, queues for the sender; full queue: drop, count."""

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            type(self).dropped += 1


@dataclass(frozen=True, slots=True)
class LogOptions:
    format: LogFormat = LogFormat.TEXT
    level: LogLevel = LogLevel.INFO
    syslog: str | None = None
    syslog_ca: str | None = None  # CA file for tls:// (default: the system's)


_listener: logging.handlers.QueueListener | None = None
_lock = threading.Lock()
_in_force = LogOptions()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not to the stream that
    was stderr at configuration: code that swaps stderr (a test runner capturing a CLI, an
    embedding program) must not leave the root logger writing to a closed file."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure(options: LogOptions) -> None:
    """(Re)configure the root logger: stderr in the chosen format, plus syslog if asked.

    Raises ``ValueError`` for a bad syslog target before changing anything."""
    global _listener, _in_force
    target = SyslogTarget.parse(options.syslog) if options.syslog else None
    tls = ssl.create_default_context(cafile=options.syslog_ca) if options.syslog_ca else None
    stderr = _StderrHandler()
    stderr.setFormatter(JSONFormatter() if options.format is LogFormat.JSON else TextFormatter())
    handlers: list[logging.Handler] = [stderr]
    with _lock:
        if _listener is not None:
            _listener.stop()
            for old in _listener.handlers:
                old.close()
            _listener = None
        if target is not None:
            forward = _DroppingQueueHandler(queue.Queue(SYSLOG_QUEUE_MAX))
            forward.setFormatter(RFC5424Formatter())
            _listener = logging.handlers.QueueListener(forward.queue, SyslogSender(target, tls))
            _listener.start()
            atexit.register(shutdown)
            handlers.append(forward)
        root = logging.getLogger()
        for old in root.handlers[:]:
            root.removeHandler(old)
            old.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(options.level.value.upper())
        _in_force = options


def inherited() -> dict[str, Any]:
    """What a child process (a tunnel worker) needs to log as this one does: the options
    in force and the process-wide fields (``from_inherited``)."""
    return {"options": asdict(_in_force), "context": dict(_context)}


def from_inherited(given: Mapping[str, Any]) -> None:
    """Configure a child process from its parent's ``inherited()``."""
    raw = given["options"]
    configure(
        LogOptions(
            LogFormat(raw["format"]), LogLevel(raw["level"]), raw["syslog"], raw["syslog_ca"]
        )
    )
    set_context(**given["context"])


def shutdown() -> None:
    """Flush the syslog queue (at exit: queued records are sent, then the socket closed)."""
    global _listener
    with _lock:
        if _listener is not None:
            _listener.stop()
            for handler in _listener.handlers:
                handler.close()
            _listener = None
