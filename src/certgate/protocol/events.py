"""Events shared by every sans-IO codec in this package (h11's sentinel style)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class NeedData(Enum):
    """Sentinel type: the parser needs more bytes before it can produce an event."""

    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection cleanly, between messages."""


class ReceiveBuffer:
    """Input side shared by the codecs: bytes in via ``receive_data``, EOF as ``b""``."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Buffer ``data``; ``b""`` means the peer closed its side (EOF)."""
        if self._eof:
            raise RuntimeError("receive_data after EOF")
        if data:
            self._buffer += data
        else:
            self._eof = True
