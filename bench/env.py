"""What a result must record about where it was measured, and small /proc readers.

Versions (python, openssl, haproxy, stunnel, certgate commit), CPU model and core count,
per-process CPU seconds (utime + stime from ``/proc/PID/stat``, threads included), resident
memory (``VmRSS``), file-descriptor limits, CPU pinning, and percentiles.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import resource
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_LIBC = ctypes.CDLL(None, use_errno=True)
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# One TLS version, cipher suite and key-exchange group for every relay and client. The load
# generator and certgate read them from PIN_FILE (OPENSSL_CONF, set by bench/run.py);
# HAProxy and stunnel get the same values in their own configuration as well.
PIN_FILE = ROOT / "bench" / "openssl-pin.cnf"
TLS_VERSION = "TLSv1.3"
CIPHER = "TLS_AES_128_GCM_SHA256"
GROUP = "X25519"
KEY_TYPE = "ECDSA P-256 (every CA, the tunnel identity and the client certificates)"


def _run(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


@cache
def versions() -> dict[str, str]:
    haproxy = _run(["haproxy", "-v"]).splitlines()
    stunnel = re.search(r"stunnel \S+", _run(["stunnel4", "-version"]))
    return {
        "python": sys.version.split()[0],
        "openssl": ssl.OPENSSL_VERSION,
        "haproxy": haproxy[0] if haproxy else "missing",
        "stunnel": stunnel.group(0) if stunnel else "missing",
        "certgate_commit": commit(),
        "kernel": platform.release(),
    }


@cache
def commit() -> str:
    head = _run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"]) or "unknown"
    dirty = _run(["git", "-C", str(ROOT), "status", "--porcelain", "-uno", "--", "src", "bench"])
    return head + ("+dirty" if dirty else "")


@cache
def cpu() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"model": model, "cores": os.cpu_count() or 1, "machine": platform.machine()}


def environment() -> dict[str, Any]:
    """The block every result file carries."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": versions(),
        "cpu": cpu(),
        "tls": {"version": TLS_VERSION, "cipher": CIPHER, "group": GROUP, "key_type": KEY_TYPE},
        "load_average": os.getloadavg(),
        "calibration": calibration(),
    }


def calibration() -> dict[str, float]:
    """How fast this (shared, virtual) machine is right now, to read absolute figures by.

    The same Python loop and the same timer call, timed here and now: other tenants of the
    machine slowed them by up to half between runs of this suite.
    """
    clock = time.perf_counter_ns
    started = clock()
    total = 0
    for i in range(200_000):
        total += i & 7
    loop_ns = (clock() - started) / 200_000
    started = clock()
    for _ in range(20_000):
        clock()
    timer_ns = (clock() - started) / 20_000
    return {"python_loop_ns_per_iteration": round(loop_ns, 1), "timer_call_ns": round(timer_ns, 1)}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads, exited ones too) of a process, in seconds.

    Read from the process's CPU-time clock (clock_getcpuclockid(3)), which counts
    nanoseconds: ``/proc/PID/stat`` counts 10 ms ticks, and a relay moving 256 MiB spends
    about 0.2 s, so ticks alone would put 5 % of noise on every transfer.
    """
    clock = ctypes.c_int()
    if _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
        try:
            return time.clock_gettime(clock.value)
        except OSError:
            pass  # the process is gone: its last ticks are all there is
    return _stat_cpu_seconds(pid)


def tree_cpu_seconds(pid: int) -> float:
    """``cpu_seconds`` of ``pid`` and of every live descendant (``tunnel run --workers``
    serves from child processes; a relay with none reads as ``cpu_seconds``)."""
    total = cpu_seconds(pid)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return total
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as children:
                total += sum(tree_cpu_seconds(int(child)) for child in children.read().split())
        except OSError:
            continue
    return total


def _stat_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        # The command name may hold spaces: the fields start after its closing parenthesis.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int | str = "self") -> float:
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int | str = "self") -> float:
    return _status_kib(pid, "VmHWM") / 1024


def _status_kib(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/{pid}/status")


def open_files_limit(pid: int | str = "self") -> int:
    """The soft RLIMIT_NOFILE of a (child) process, as ``ulimit -n`` would print it."""
    with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise RuntimeError(f"no open-files limit in /proc/{pid}/limits")


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft fd limit to the hard one (children inherit it); return both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def pin(pid: int, cores: set[int]) -> None:
    """Pin every thread of ``pid`` to ``cores`` (threads created later inherit the mask)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except OSError:  # the thread ended meanwhile
            continue


def core_plan() -> tuple[set[int], set[int]]:
    """(load generator cores, relay cores): different cores when there are two or more."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return set(cores), set(cores)
    return {cores[0]}, {cores[1]}


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of unsorted ``values`` (0.0 when there are none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def ratio(ours: float | None, anchor: float | None) -> float | None:
    """ours / anchor, or None when either was not measured."""
    return round(ours / anchor, 3) if ours and anchor else None
