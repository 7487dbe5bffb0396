"""Scenarios 1 and 2: relay throughput and new connections per second, beside the anchors.

Relays run one at a time on the relay core, the load generator and the origin on the other
core. certgate runs three times: with each TLS backend (pyOpenSSL, the default, and Python's
``ssl``) on the stdlib asyncio loop, and with pyOpenSSL on uvloop, which is also the
event-loop comparison. A relay that dies is recorded as a crash, with its exit
status and log tail, and the run goes on.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import env, loadgen, relays
from bench.loadgen import Target
from bench.procs import ProcessDied
from bench.relays import Relay
from bench.world import World

WARMUP_CONNECTIONS = 20
WARMUP_BYTES = 4 * 2**20
PROBE_TIMEOUT_S = 5.0
DIRECTIONS = ("upload", "download")


@dataclass(frozen=True)
class RelaySpec:
    name: str
    start: Callable[[World, int], Relay]
    note: str


def _certgate(
    loop: str, tls_backend: str = "pyopenssl", workers: int = 1
) -> Callable[[World, int], Relay]:
    def start(world: World, _origin: int) -> Relay:
        # One worker keeps to the relay's core; more use every core, the load generator's too.
        cores = world.relay_cores if workers == 1 else world.relay_cores | world.loadgen_cores
        relay = relays.start_certgate(
            world.sup,
            world.relay_state,
            f"certgate-{loop}-{tls_backend}-{workers}",
            loop=loop,
            tls_backend=tls_backend,
            cores=cores,
            workers=workers,
        )
        relays.wait_fresh(relay, 1, 60)
        return relay

    return start


def _haproxy(world: World, origin: int) -> Relay:
    return relays.start_haproxy(world.sup, world.work, world.certs, origin, cores=world.relay_cores)


def _stunnel(world: World, origin: int) -> Relay:
    return relays.start_stunnel(world.sup, world.work, world.certs, origin, cores=world.relay_cores)


def _plain(world: World, origin: int) -> Relay:
    return relays.start_haproxy(world.sup, world.work, None, origin, cores=world.relay_cores)


SPECS = (
    RelaySpec(
        "certgate",
        _certgate("asyncio"),
        "certgate tunnel run, stdlib asyncio, --tls-backend pyopenssl (the defaults)",
    ),
    RelaySpec(
        "certgate-ssl",
        _certgate("asyncio", "ssl"),
        "certgate tunnel run --tls-backend ssl (Python's ssl, the system OpenSSL)",
    ),
    RelaySpec("certgate-uvloop", _certgate("uvloop"), "certgate tunnel run --loop uvloop"),
    RelaySpec(
        "certgate-workers-2",
        _certgate("asyncio", workers=2),
        "certgate tunnel run --workers 2, on both cores (the load generator's too)",
    ),
    RelaySpec("haproxy", _haproxy, "HAProxy, mode tcp, ssl verify required, nbthread 1"),
    RelaySpec("stunnel", _stunnel, "stunnel4, verify = 2"),
    RelaySpec("plain", _plain, "HAProxy, mode tcp, no TLS: the ceiling"),
)


def run(world: World) -> dict[str, dict[str, Any]]:
    """Measure every relay; return the throughput, connection-rate and event-loop results."""
    tls = loadgen.client_context(
        world.certs.server_trust, world.relay_app.cert_path, world.relay_app.key_path
    )
    with relays.origin(world.sup, cores=world.loadgen_cores) as origin:
        measured = {spec.name: _measure(world, spec, origin, tls) for spec in SPECS}
    return {
        "relay_throughput": _throughput_result(world, measured),
        "connection_rate": _rate_result(world, measured),
        "event_loop": _loop_result(measured),
        "workers": _workers_result(measured),
    }


def _measure(world: World, spec: RelaySpec, origin: int, tls: Any) -> dict[str, Any]:
    began = time.monotonic()
    relay = spec.start(world, origin)
    target = Target(
        spec.name, relay.port, origin, tls if relay.tls else None, relay.connect, relay.proc.pid
    )
    result: dict[str, Any] = {"relay": spec.note, "failed": None, "crashed": False}
    try:
        result["open_files_limit"] = env.open_files_limit(relay.proc.pid)
        _warm_up(target)
        result["throughput"] = _throughput(world, target)
        relay.proc.check()
        result["rate"] = _rates(world, target, relay)
        relay.proc.check()
        result["probe_storm"] = _storm(world, target, relay)
        result["rss_mb"] = round(relay.proc.rss_mb(), 1)
    except ProcessDied as exc:
        result["failed"], result["crashed"] = str(exc), True
    except OSError as exc:  # the relay is up but does not relay: record why, go on
        result["failed"] = (
            f"client: {type(exc).__name__}: {exc}; relay: {relay.proc.last_error()}"
            f"\nrelay log tail:\n{relay.proc.log_tail()}"
        )
    finally:
        stopping = time.monotonic()
        result["exit_code"] = world.sup.stop(relay.proc)
        result["seconds"] = round(stopping - began, 1)
        result["stop_seconds"] = round(time.monotonic() - stopping, 1)
    return result


def _warm_up(target: Target) -> None:
    """One tunnel first (a relay that cannot relay fails here, fast), then some of each."""
    with loadgen.open_stream(target, timeout=PROBE_TIMEOUT_S) as sock:
        sock.sendall(b"P")
        if sock.recv(1) != b"!":
            raise ConnectionError(f"{target.name} does not relay")
    loadgen.connection_rate(target, 0.2, 1, resume=False)
    loadgen.transfer(target, WARMUP_BYTES, "download")


def _throughput(world: World, target: Target) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for direction in DIRECTIONS:
        runs = [
            loadgen.transfer(target, world.sizes.transfer_bytes, direction)
            for _ in range(world.sizes.transfer_reps)
        ]
        out[direction] = {
            "mb_per_s": statistics.median(r["mb_per_s"] for r in runs),
            "mb_per_relay_cpu_s": _total_per_cpu(runs),
            "runs": runs,
        }
    out["both"] = {
        "mb_per_relay_cpu_s": _total_per_cpu([*out["upload"]["runs"], *out["download"]["runs"]])
    }
    out["tls"] = {k: out["download"]["runs"][0].get(k) for k in ("tls", "cipher")}
    return out


def _total_per_cpu(runs: list[dict[str, Any]]) -> float | None:
    """MB moved per relay CPU-second over all runs (sums of bytes and of CPU seconds)."""
    cpu = sum(r["relay_cpu_s"] for r in runs)
    return round(sum(r["bytes"] for r in runs) / 1e6 / cpu, 1) if cpu > 0 else None


def _rates(world: World, target: Target, relay: Relay) -> dict[str, Any]:
    sizes = world.sizes
    kinds = {"full": False, "resumed": True} if relay.tls else {"tcp": False}
    out: dict[str, Any] = {}
    for kind, resume in kinds.items():
        out[kind] = loadgen.connection_rate(
            target, sizes.rate_seconds, sizes.rate_threads, resume=resume
        )
        time.sleep(0.5)  # let the relay finish closing before the next window starts
    return out


def _storm(world: World, target: Target, relay: Relay) -> dict[str, Any]:
    """Connect-and-close probes at full speed, then one real tunnel: the relay must live
    through the storm and still relay (the uvloop stability question)."""
    storm = loadgen.probe_storm(target, world.sizes.storm_seconds, world.sizes.rate_threads)
    time.sleep(0.5)
    relay.proc.check()
    with loadgen.open_stream(target, timeout=PROBE_TIMEOUT_S) as sock:
        sock.sendall(b"P")
        storm["relays_after"] = sock.recv(1) == b"!"
    return storm


def _get(measured: dict[str, Any], name: str, *path: str) -> Any:
    value: Any = measured.get(name, {})
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _throughput_result(world: World, measured: dict[str, Any]) -> dict[str, Any]:
    table = {}
    for name, m in measured.items():
        row = {"failed": m["failed"], "tls": _get(measured, name, "throughput", "tls")}
        row |= {k: m.get(k) for k in ("seconds", "stop_seconds", "exit_code", "rss_mb")}
        for direction in (*DIRECTIONS, "both"):
            row[direction] = {
                k: v
                for k, v in (_get(measured, name, "throughput", direction) or {}).items()
                if k != "runs"
            }
        table[name] = row
    per_cpu = {n: _get(measured, n, "throughput", "both", "mb_per_relay_cpu_s") for n in measured}
    return {
        "what": "one mTLS CONNECT tunnel (certgate) or TLS relay (anchors), large transfers",
        "bytes_per_transfer": world.sizes.transfer_bytes,
        "repetitions": world.sizes.transfer_reps,
        "relays": table,
        "runs": {n: _get(measured, n, "throughput") for n in measured},
        "ratio_vs_haproxy": {
            n: {
                d: env.ratio(
                    _get(measured, n, "throughput", d, "mb_per_relay_cpu_s"),
                    _get(measured, "haproxy", "throughput", d, "mb_per_relay_cpu_s"),
                )
                for d in (*DIRECTIONS, "both")
            }
            for n in measured
        },
        "anchor": {"name": "haproxy", "mb_per_relay_cpu_s": per_cpu.get("haproxy")},
        "headline_ratio": env.ratio(per_cpu.get("certgate"), per_cpu.get("haproxy")),
    }


def _rate_result(world: World, measured: dict[str, Any]) -> dict[str, Any]:
    per_cpu = {
        n: {k: (v or {}).get("conns_per_relay_cpu_s") for k, v in (m.get("rate") or {}).items()}
        for n, m in measured.items()
    }
    return {
        "what": (
            "new connections: TCP + TLS 1.3 mTLS handshake (full, or resumed with a session"
            " ticket) + CONNECT (certgate only: the anchors do no CONNECT) + first byte"
        ),
        "seconds_per_window": world.sizes.rate_seconds,
        "client_threads": world.sizes.rate_threads,
        "relays": {
            n: {"failed": m["failed"], **(m.get("rate") or {})} for n, m in measured.items()
        },
        "ratio_vs_haproxy": {
            n: {
                kind: env.ratio(v, (per_cpu.get("haproxy") or {}).get(kind))
                for kind, v in kinds.items()
            }
            for n, kinds in per_cpu.items()
        },
        "anchor": {"name": "haproxy", "conns_per_relay_cpu_s": per_cpu.get("haproxy")},
        "headline_ratio": env.ratio(
            (per_cpu.get("certgate") or {}).get("full"),
            (per_cpu.get("haproxy") or {}).get("full"),
        ),
        "headline_resumed_ratio": env.ratio(
            (per_cpu.get("certgate") or {}).get("resumed"),
            (per_cpu.get("haproxy") or {}).get("resumed"),
        ),
        "tls_backends": {
            backend: {kind: (per_cpu.get(name) or {}).get(kind) for kind in ("full", "resumed")}
            for backend, name in (("pyopenssl", "certgate"), ("ssl", "certgate-ssl"))
        },
    }


def _loop_result(measured: dict[str, Any]) -> dict[str, Any]:
    loops = {}
    for loop, name in (("asyncio", "certgate"), ("uvloop", "certgate-uvloop")):
        m = measured.get(name, {})
        rate = m.get("rate") or {}
        loops[loop] = {
            "failed": m.get("failed"),
            "crashed": m.get("crashed"),
            "exit_code": m.get("exit_code"),
            "mb_per_relay_cpu_s": _get(measured, name, "throughput", "both", "mb_per_relay_cpu_s"),
            "full_conns_per_relay_cpu_s": (rate.get("full") or {}).get("conns_per_relay_cpu_s"),
            "resumed_conns_per_relay_cpu_s": (rate.get("resumed") or {}).get(
                "conns_per_relay_cpu_s"
            ),
            "connection_errors": sum((r or {}).get("errors", 0) for r in rate.values()),
            "probe_storm": m.get("probe_storm"),
        }
    return {"what": "certgate tunnel run on each event loop, same scenarios", "loops": loops}


def _workers_result(measured: dict[str, Any]) -> dict[str, Any]:
    """``--workers 1`` (the "certgate" relay) against ``--workers 2``, per CPU-second of the
    node's processes together."""
    rows = {}
    for workers, name in (("1", "certgate"), ("2", "certgate-workers-2")):
        m = measured.get(name, {})
        rate = m.get("rate") or {}
        rows[workers] = {
            "failed": m.get("failed"),
            "mb_per_relay_cpu_s": _get(measured, name, "throughput", "both", "mb_per_relay_cpu_s"),
            "full_conns_per_relay_cpu_s": (rate.get("full") or {}).get("conns_per_relay_cpu_s"),
            "full_conns_per_s": (rate.get("full") or {}).get("conns_per_s"),
            "resumed_conns_per_relay_cpu_s": (rate.get("resumed") or {}).get(
                "conns_per_relay_cpu_s"
            ),
            "rss_mb": m.get("rss_mb"),
        }
    what = (
        "certgate tunnel run --workers 1 and 2; CPU of the supervisor and its workers"
        " together. On this 2-core machine two workers share the cores with the load"
        " generator, so compare per CPU-second, not per second."
    )
    return {"what": what, "workers": rows}
