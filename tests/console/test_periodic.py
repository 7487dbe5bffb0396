"""Tests for certgate.console.periodic: a job whose ticks fail is logged once per outage,
and once when it works again; it keeps ticking and stops when told."""

from __future__ import annotations

import logging
import threading

import pytest

from certgate.console.periodic import Periodic

log = logging.getLogger("tests.periodic")
WAIT_S = 30.0


class Flaky(Periodic):
    what = "the flaky job"

    def __init__(self, outcomes: list[bool]) -> None:
        super().__init__(0.01, log)
        self.outcomes, self.done = outcomes, threading.Event()

    def tick(self) -> None:
        if not self.outcomes:
            self.done.set()
            return
        if not self.outcomes.pop(0):
            raise RuntimeError("database lost")


def test_an_outage_is_logged_once_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    job = Flaky([False, False, False, True, False, True])
    with caplog.at_level(logging.INFO, logger=log.name):
        job.start()
        assert job.done.wait(WAIT_S)
        job.stop()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == log.name]
    failed = ("ERROR", "the flaky job failed; retrying every 0.01 s")
    back = ("INFO", "the flaky job works again")
    assert lines == [failed, back, failed, back]
