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
