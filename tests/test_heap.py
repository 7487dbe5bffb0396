"""``certgate.heap``: what start-up made is left out of full collections; later garbage is
still collected. The test process unfreezes its heap afterwards."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from certgate.heap import freeze_startup_heap


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # this test process must collect its own garbage again


def test_start_up_is_spared_and_later_garbage_still_collected(unfrozen: None) -> None:
    dropped = weakref.ref(_Cycle())  # cyclic garbage made during start-up
    start_up = _Cycle()  # an object start-up made and keeps
    kept = weakref.ref(start_up)
    assert freeze_startup_heap() > 0
    assert dropped() is None, "start-up garbage is collected before the freeze"
    del start_up
    gc.collect()
    assert kept() is not None, "a full collection no longer traverses what start-up made"
    later = weakref.ref(_Cycle())  # cyclic garbage made while serving
    gc.collect()
    assert later() is None
