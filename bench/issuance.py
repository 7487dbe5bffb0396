"""Scenario 6: certificates per second, in the PKI layer alone and through the console API.

* PKI layer: ``Authority.issue_from_csr`` with the console's own Device Root (CSR parsed and
  its signature checked, certificate built from the device profile, signed). CSRs are
  built beforehand; the keys stay with the "devices".
* API: Per-App Tunnel profile delivery, ``POST /api/v1/device/profile`` with a device CSR,
  from several enrolled devices at once over keep-alive mTLS connections. Each delivery
  authenticates the device, revokes its previous certificate, signs, records the
  certificate and the delivery, appends to the feed and the audit chain, and commits (the
  console commits concurrent deliveries together; each answer follows its commit). The
  clients run on the console's core: their CPU per certificate is recorded beside its.
"""

from __future__ import annotations

import secrets
import threading
import time
from itertools import cycle
from typing import Any

import httpx

from bench import env, fixture
from bench.world import RELAY_GROUP, World
from certgate.console.services import ca
from certgate.pki import identity
from certgate.pki.authority import Names
from certgate.pki.csr import build_csr
from certgate.pki.keys import generate_key
from certgate.pki.profiles import DEVICE_CLIENT

CSR_POOL = 512  # distinct device keys; reused round-robin when a run issues more


def run(world: World) -> dict[str, Any]:
    csrs = [build_csr(generate_key(), "bench device") for _ in range(CSR_POOL)]
    return {
        "what": "device certificates from CSRs: PKI layer alone, and profile delivery (API)",
        "key_type": env.KEY_TYPE,
        "pki": _pki_layer(world, csrs),
        "api": _api(world, csrs),
    }


def _pki_layer(world: World, csrs: list[bytes]) -> dict[str, Any]:
    with world.console.local() as (_, pki):
        issuer, authority = pki.issuer(ca.DEVICE_ROOT), pki.authority
    count = world.sizes.issuance_pki
    names = [_device_names() for _ in range(count)]
    started = time.perf_counter()
    for csr, name in zip(cycle(csrs), names, strict=False):
        authority.issue_from_csr(issuer, DEVICE_CLIENT, name, csr)
    seconds = time.perf_counter() - started
    return {"certificates": count, "seconds": round(seconds, 3), "per_s": round(count / seconds)}


def _device_names() -> Names:
    uid = secrets.token_hex(16)
    return Names(f"device {uid}", identity.device(uid, RELAY_GROUP))


class _Client(threading.Thread):
    def __init__(self, api: httpx.Client, csrs: list[str], stop_at: float) -> None:
        super().__init__(daemon=True)
        self.api, self.csrs, self.stop_at = api, csrs, stop_at
        self.issued = 0
        self.failures: dict[int, int] = {}
        self.latencies: list[float] = []

    def run(self) -> None:
        for csr in cycle(self.csrs):
            if time.monotonic() >= self.stop_at:
                return
            started = time.perf_counter()
            response = self.api.post("/api/v1/device/profile", json={"csr": csr})
            if response.status_code == 201:
                self.issued += 1
                self.latencies.append(time.perf_counter() - started)
            else:
                self.failures[response.status_code] = self.failures.get(response.status_code, 0) + 1


def _api(world: World, csrs: list[bytes]) -> dict[str, Any]:
    sizes = world.sizes
    devices = [
        fixture.enroll(world.console, world.relay_user) for _ in range(sizes.issuance_devices)
    ]
    pems = [c.decode() for c in csrs]
    clients = [world.console.client(bearer=credential) for _, credential in devices]
    try:
        for api in clients:  # open each keep-alive connection before the clock starts
            api.get("/api/v1/device").raise_for_status()
        stop_at = time.monotonic() + sizes.issuance_api_seconds
        workers = [
            _Client(clients[i % len(clients)], pems[i :: sizes.issuance_api_clients], stop_at)
            for i in range(sizes.issuance_api_clients)
        ]
        cpu, started = world.console.proc_cpu(), time.perf_counter()
        # The clients share the console's core: their CPU bounds the rate too, so it is shown.
        client_cpu = time.process_time()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        seconds, cpu = time.perf_counter() - started, world.console.proc_cpu() - cpu
        client_cpu = time.process_time() - client_cpu
    finally:
        for api in clients:
            api.close()
    issued = sum(w.issued for w in workers)
    latencies = [x for w in workers for x in w.latencies]
    return {
        "clients": sizes.issuance_api_clients,
        "devices": len(devices),
        "certificates": issued,
        "failures": _merge(w.failures for w in workers),
        "seconds": round(seconds, 3),
        "per_s": round(issued / seconds, 1),
        "p50_ms": round(env.percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(env.percentile(latencies, 0.99) * 1000, 1),
        "console_cpu_s": round(cpu, 2),
        "console_cpu_ms_per_cert": round(cpu * 1000 / issued, 2) if issued else None,
        "client_cpu_ms_per_cert": round(client_cpu * 1000 / issued, 2) if issued else None,
    }


def _merge(counts: Any) -> dict[str, int]:
    merged: dict[str, int] = {}
    for count in counts:
        for status, n in count.items():
            merged[str(status)] = merged.get(str(status), 0) + n
    return merged
