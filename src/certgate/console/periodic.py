"""A console background job: ``tick`` on a daemon thread every ``interval_s`` until
``stop``. A tick that raises is logged once per outage (and its end once), and the next
tick retries: a lost database must not stop the console nor fill its log."""

from __future__ import annotations

import logging
import threading


class Periodic:
    """Subclasses implement ``tick``; ``what`` names the job in the log."""

    what = "a periodic job"

    def __init__(self, interval_s: float, log: logging.Logger) -> None:
        self._interval_s, self._log = interval_s, log
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def tick(self) -> object:
        raise NotImplementedError

    def start(self) -> None:
        name = f"console-{type(self).__name__.lower()}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                self.tick()
            except Exception:
                if not self._failing:
                    every = self._interval_s
                    self._log.exception("%s failed; retrying every %s s", self.what, every)
                self._failing = True
            else:
                if self._failing:
                    self._log.info("%s works again", self.what)
                self._failing = False
