"""The heap of a long-running process: what start-up made stays out of garbage collection.

A console or tunnel node builds most of its objects once, at start-up (modules, routes,
schemas, compiled statements, the trust configuration), and keeps them for its lifetime.
CPython's cyclic collector traversed them all again on every full collection. Serving the
feed promotes many short-lived objects (a batch of 5,000 entries as dicts) to the oldest
generation, which runs a full collection about once a second; at 1,000,000 devices each
one stopped every thread of the console for 0.2-0.4 s, and of a node for up to 0.47 s,
so a change that arrived then waited that long (bench/FINDINGS.md, "Time to enforce").
"""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_heap"]


def freeze_startup_heap() -> int:
    """Collect start-up's garbage, then move every object still alive out of reach of the
    cyclic collector (``gc.freeze``); returns how many objects are frozen.

    Frozen objects are still freed when their last reference goes; only a reference cycle
    among them would never be, so call this once start-up is done. What is made later is
    collected as before."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
