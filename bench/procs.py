"""Every process the benchmark starts, and the guarantee that all of them stop.

``Supervisor`` owns the child processes (console, tunnel nodes, HAProxy, stunnel, origin):
each is started in its own process group with its output in a log file, optionally pinned
to cores, and ``stop_all`` ends them (SIGTERM, then SIGKILL after a grace period) whether
the run succeeded or not. Only processes started here are ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import env

CERTGATE = [sys.executable, "-m", "certgate"]
STOP_GRACE_S = 10.0


class ProcessDied(RuntimeError):
    """A benchmarked process exited while it was needed (its log tail says why)."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise ProcessDied(
                f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}"
            )

    def cpu_seconds(self) -> float:
        return env.cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return env.rss_mb(self.pid)

    def last_error(self) -> str:
        """The last line of the log that names an error (a traceback's last line)."""
        lines = self.log_tail(200).splitlines()
        found = [line for line in lines if "Error" in line or "Exception" in line]
        return found[-1].strip() if found else "-"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Supervisor:
    logs: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cores: set[int] | None = None,
        env_extra: Mapping[str, str] | None = None,
    ) -> Proc:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})},
                start_new_session=True,  # its own group: a stop reaches its children too
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        if cores:
            env.pin(proc.pid, cores)
        return proc

    def stop(self, proc: Proc, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; return the exit code."""
        if proc.alive():
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.popen.wait(timeout=grace_s)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)
        return proc.popen.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, grace_s=5.0)

    @contextlib.contextmanager
    def running(self) -> Iterator[Supervisor]:
        """Stop everything on exit, including on SIGTERM/SIGINT of the benchmark itself."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            signal.signal(sig, _raise_exit)
        try:
            yield self
        finally:
            self.stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _signal_group(proc: Proc, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{proc.name}: port {port} not listening after {timeout:g}s")
