"""Group commit: units of work from request handlers run on one writer thread, several to a
transaction, so they share one BEGIN, one fsync'd COMMIT and one hand-over of the write lock.

Profile deliveries serialise on the database anyway (the audit chain's head row, SQLite's
single writer); in one transaction each their commit, the lock was held mostly while the
WAL was synced. A submitter learns its outcome only after the transaction holding its work
has committed, so an answered request is on disk (``synchronous=FULL``). If a unit of work
raises, the batch rolls back, that unit gets its error and the others run again: one
request's failure stays its own, and the effect is that of running them one by one.

Batches form on SQLite only. There the database lock serialises whole transactions; on
PostgreSQL a batch would take row locks of a later unit after the audit row lock of an
earlier one, against the order every other writer keeps, and could deadlock with them.

Units run with autoflush off, so the ORM objects they add (feed events) are flushed once a
batch, at commit. A unit sees what earlier units wrote with Core statements or flushed;
it must not count on an ORM query flushing objects left pending before it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session

from certgate.console.store.db import Database

T = TypeVar("T")
MAX_BATCH = 32
log = logging.getLogger("certgate.console.writer")


class WriterStopped(RuntimeError):
    """The writer is not running (not started yet, or the console is shutting down)."""


@dataclass
class _Job(Generic[T]):
    work: Callable[[Session], T]
    future: Future[T] = field(default_factory=Future)


class Writer:
    """One thread committing submitted units of work in batches of up to ``MAX_BATCH``
    (SQLite; one unit a transaction elsewhere)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._max_batch = MAX_BATCH if db.engine.dialect.name == "sqlite" else 1
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._gate = threading.Lock()  # orders submissions against the stop sentinel
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._gate:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="certgate-writer", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Commit what was submitted, then stop; later submissions raise ``WriterStopped``."""
        with self._gate:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._jobs.put(None)
        if thread is not None:
            thread.join(timeout)

    def submit(self, work: Callable[[Session], T]) -> Future[T]:
        """Queue ``work``; its future resolves after the transaction that ran it committed."""
        job: _Job[T] = _Job(work)
        with self._gate:
            if self._thread is None:
                raise WriterStopped("the console's writer is not running")
            self._jobs.put(job)
        return job.future

    async def run(self, work: Callable[[Session], T]) -> T:
        return await asyncio.wrap_future(self.submit(work))

    def _serve(self) -> None:
        while jobs := self._next_batch():
            self._commit(jobs)

    def _next_batch(self) -> list[_Job[Any]]:
        """The oldest job (waiting for one), then whatever else is queued, up to the limit.
        Jobs whose submitter gave up (cancelled future) are dropped. Empty: stop."""
        batch: list[_Job[Any]] = []
        while len(batch) < self._max_batch:
            try:
                job = self._jobs.get() if not batch else self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                if batch:
                    self._jobs.put(None)  # stop once this batch is committed
                    break
                return []
            if job.future.set_running_or_notify_cancel():
                batch.append(job)
        return batch

    def _commit(self, jobs: list[_Job[Any]]) -> None:
        """Run ``jobs`` in one transaction and answer them once it has committed.

        A unit that raises gets its exception, and the others run again without it, as a
        new batch: it failed after the units before it, as it would have one by one. If
        the commit itself fails, no unit is to blame: each runs again alone."""
        results: list[Any] = []
        running: int | None = None  # the unit at work, if it is a unit that raises
        try:
            with self._db.transaction() as session, session.no_autoflush:
                for job in jobs:
                    running = len(results)
                    results.append(job.work(session))
                running = None
        except Exception as exc:
            self._retry(jobs, running, exc)
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)

    def _retry(self, jobs: list[_Job[Any]], failed: int | None, exc: Exception) -> None:
        if len(jobs) == 1:
            jobs[0].future.set_exception(exc)
            return
        log.debug("batch of %d rolled back (%s: %s)", len(jobs), type(exc).__name__, exc)
        if failed is not None:
            jobs[failed].future.set_exception(exc)
            self._commit(jobs[:failed] + jobs[failed + 1 :])
            return
        for job in jobs:
            self._commit([job])
